"""Continuous batching for the server: every row in flight decodes in one forward pass per token, and rows
that arrive while a batch runs join it at the next step. asyncio and the core only (no Ray), so it is tested
without a cluster.

One loop per replica runs raygpt.generate.decode_rows over the rows in flight, a step at a time in a thread (the
event loop keeps taking requests meanwhile). Between two steps it hands the rows that arrived, up to
max_batch_size in flight, to decode_rows, which prefills their prompts beside the running rows' KV cache
(generate_batch's ``incoming``) and decodes them from the next step on. A row that ends (its finish, or its
client gone) leaves at once. On an idle replica the first rows wait ``wait_s`` for the rest of a burst.

Ray Serve's @serve.batch was the first choice, and measured poorly for generation: while a batch runs, its loop
keeps forming the next batches from the requests that arrive (each from one batch_wait_s window), so under
load the replica decoded 1.4 rows per batch, one small batch after another (bench/RESULTS.md, serving).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from raygpt.generate import Row, TextGenerator, decode_rows


@dataclass
class Pending:
    """A row waiting for, or in, a batch; the generator its prompt was tokenized with goes with it (a
    checkpoint move between its arrival and its batch must not change its tokenizer)."""
    row: Row
    gen: TextGenerator
    cancelled: bool = False  # the client went away: the row leaves its batch
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (piece, finish, tokens so far), or an error


class Batcher:
    def __init__(self, max_batch_size: int, wait_s: float):
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.waiting: list[Pending] = []
        self.arrived = asyncio.Event()
        self.loop_task: Optional[asyncio.Task] = None
        # for /healthz: batches (decode_rows runs), rows taken, rows that joined a running batch, the most rows
        # in flight, steps, the seconds in the model's steps (forward, sampling, joins) and with rows in flight
        self.stats = {"batches": 0, "rows": 0, "joined": 0, "largest": 0, "steps": 0, "step_s": 0.0, "busy_s": 0.0}

    async def decode(self, p: Pending) -> AsyncIterator[tuple[str, Optional[str], int]]:
        """The row's (piece, finish, tokens so far) as they are made, up to the one with its finish. Closing
        the iterator early (the client went away) takes the row out of its batch."""
        self.waiting.append(p)
        self.arrived.set()
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())
        try:
            while True:
                item = await p.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is not None:
                    return
        finally:
            p.cancelled = True  # a no-op once the row ended

    async def _loop(self) -> None:
        while True:
            self.waiting = [p for p in self.waiting if not p.cancelled]
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            await asyncio.sleep(self.wait_s)  # the first rows wait a moment for the others of a burst
            batch = self._take(None, self.max_batch_size)
            try:
                await self._run(batch)
            except Exception as e:  # the model failed: every row of the batch gets the error, the loop goes on
                for p in batch:
                    p.out.put_nowait(e)

    def _take(self, gen: Optional[TextGenerator], room: int) -> list[Pending]:
        """Up to ``room`` waiting rows of ``gen`` (None: of the first waiting row's), out of the queue."""
        self.waiting = [p for p in self.waiting if not p.cancelled]
        gen = gen or (self.waiting[0].gen if self.waiting else None)
        taken = [p for p in self.waiting if p.gen is gen][:max(0, room)]
        self.waiting = [p for p in self.waiting if p not in taken]
        self.stats["rows"] += len(taken)
        return taken

    async def _run(self, batch: list[Pending]) -> None:
        """Decode ``batch`` and the rows that join it until every one has ended."""
        s, gen = self.stats, batch[0].gen
        s["batches"] += 1
        started, ended, joining = time.perf_counter(), set(), []

        def incoming() -> list[Row]:  # called by decode_rows in the step's thread: only hands over a list
            nonlocal joining
            rows, joining = joining, []
            return rows

        steps = decode_rows(gen.model, gen.tokenizer, [p.row for p in batch], precision=gen.precision,
                            cancelled=lambda j: batch[j].cancelled, incoming=incoming)
        try:
            while True:
                s["largest"] = max(s["largest"], len(batch) - len(ended))
                t = time.perf_counter()
                step = await asyncio.to_thread(next, steps, None)  # a thread: the event loop keeps serving
                s["step_s"] += time.perf_counter() - t
                if step is None:
                    return
                s["steps"] += 1
                for j, piece, finish in step:
                    batch[j].out.put_nowait((piece, finish, batch[j].row.made))
                    if finish is not None:
                        ended.add(j)
                ended.update(j for j, p in enumerate(batch) if p.cancelled)
                # the rows that came meanwhile join at the next step (in the event loop: no thread touches
                # the queue); decode_rows numbers them on, as batch does
                new = self._take(gen, self.max_batch_size - (len(batch) - len(ended)))
                s["joined"] += len(new)
                batch.extend(new)
                joining = [p.row for p in new]
        finally:
            s["busy_s"] += time.perf_counter() - started
