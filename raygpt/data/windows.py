"""Training windows from token units, and the fixed val windows every path evaluates on.

Pure numpy/torch (no Ray): the Ray workers feed these functions the rows of their dataset shard, the
local loop and tests feed them arrays.

Train stream. A prepared split is a list of units (Parquet row groups of a few thousand tokens), in the
order of the split's token stream. Every epoch the units are permuted (seeded by seed and epoch) and dealt
round-robin to the workers; each unit gets a random offset below block_size, and its windows of
block_size + 1 tokens start at that offset and every block_size tokens after it, up to where the next
unit's first window starts: the last ones run on into the next unit of the stream (read with it: its
head, HEAD(block) tokens), so an epoch's windows cover every token but the stream's very ends, and a
window only ever crosses into the text that truly follows. A worker shuffles its windows in a seeded
buffer and batches them. Everything is a function of (seed, epoch, rank, world size): a worker finds its
place in the stream from a count of batches alone, which is what makes a resumed run draw exactly the
batches the uninterrupted one would have, and nothing has to be listed ahead: an epoch's deal is
computed when the stream reaches it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch from host memory to ``device``. On CUDA through pinned memory: a non_blocking copy from
    ordinary (pageable) memory is synchronous, so the host would wait for it instead of queueing work."""
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def head(block_size: int) -> int:
    """Tokens of the next unit a unit's windows may need: its first window starts below block_size and is
    block_size + 1 long."""
    return 2 * block_size + 1


@lru_cache(maxsize=16)
def epoch_order(seed: int, epoch: int, n_units: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of all units, start offset of every unit) for one epoch: all a read task needs to know
    which unit a worker reads next (cached: consecutive reads fall in the same epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n_units), rng.integers(0, block_size, n_units)


class EpochPlan:
    """Which units each of ``world`` workers reads in each epoch, and how many batches that makes."""

    def __init__(self, unit_tokens: Sequence[int], block_size: int, batch_size: int, seed: int, world: int = 1):
        self.unit_tokens = np.asarray(unit_tokens, dtype=np.int64)
        self.block_size, self.batch_size, self.seed, self.world = block_size, batch_size, seed, max(1, world)
        # The length of each unit's successor's head, as read (the last unit has none).
        self.next_head = np.minimum(np.append(self.unit_tokens[1:], 0), head(block_size))

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_order(self.seed, epoch, len(self.unit_tokens), self.block_size)

    def units(self, epoch: int, rank: int) -> np.ndarray:
        """The units ``rank`` reads in ``epoch``, in order."""
        return self.order(epoch)[0][rank::self.world]

    def per_epoch(self, rank: int) -> int:
        """How many units ``rank`` reads in every epoch."""
        return len(range(rank, len(self.unit_tokens), self.world))

    def windows_per_unit(self, epoch: int) -> np.ndarray:
        """Windows of every unit in ``epoch``: starts at its offset o, then every block_size, while they start
        before the next unit's first window (its length + the next offset) and fit in the unit and the head
        of the next one read with it."""
        offsets = self.order(epoch)[1]
        block, n = self.block_size, self.unit_tokens
        owned = np.append(n[:-1] + offsets[1:], np.iinfo(np.int64).max // 4)  # where the next unit's windows start
        fit = (n + self.next_head - offsets - block - 1) // block + 1  # windows that end within unit + head
        upto = -((offsets - owned) // block)  # ceil((owned - offset) / block): windows starting before owned
        return np.maximum(0, np.minimum(fit, upto))

    def batches_in_epoch(self, epoch: int, rank: int) -> int:
        """Batches ``rank`` gets from ``epoch`` (known without reading: windows per unit follow from sizes)."""
        return int(self.windows_per_unit(epoch)[self.units(epoch, rank)].sum()) // self.batch_size

    def locate(self, rank: int, batches_done: int) -> tuple[int, int]:
        """(epoch, batch within it) of ``rank``'s next batch after ``batches_done`` batches."""
        epoch = 0
        while True:
            n = self.batches_in_epoch(epoch, rank)
            if n == 0:
                raise ValueError(self.too_small())
            if batches_done < n:
                return epoch, batches_done
            batches_done -= n
            epoch += 1

    def epochs_for(self, rank: int, epoch: int, skip: int, batches: int) -> int:
        """An upper bound on the epochs ``rank`` reads from ``epoch`` (of which it skips ``skip`` batches) to
        draw ``batches`` more, without walking them: every epoch gives at least the batches of its smallest
        possible deal, each unit at least its windows with the worst offsets (its own below block_size,
        the next unit's 0)."""
        n, block = self.unit_tokens, self.block_size
        worst = np.minimum(-(-(n - block + 1) // block), (n + self.next_head - 2 * block) // block + 1)
        least = np.sort(np.maximum(0, worst))
        floor = int(least[:self.per_epoch(rank)].sum()) // self.batch_size
        if floor == 0:  # units too small for a bound: walk the epochs (only tiny splits get here)
            end = self.locate(rank, sum(self.batches_in_epoch(e, rank) for e in range(epoch)) + skip
                              + max(0, batches - 1))[0]
            return end - epoch + 1
        return -(-(skip + batches) // floor) + 1

    def coverage(self, epoch: int = 0) -> float:
        """The share of the split's tokens that some window of ``epoch`` holds (a window holds its
        block_size + 1 tokens, the last one being a target only)."""
        offsets, windows = self.order(epoch)[1], self.windows_per_unit(epoch)
        starts = np.concatenate([[0], np.cumsum(self.unit_tokens)[:-1]]) + offsets  # first window, stream position
        ends = starts + np.maximum(0, windows - 1) * self.block_size + self.block_size + 1
        covered, reach = 0, 0
        for start, end, w in zip(starts, ends, windows):  # the windows of consecutive units touch: merge runs
            if w == 0:
                continue
            covered += max(0, end - max(start, reach))
            reach = max(reach, end)
        return covered / max(1, int(self.unit_tokens.sum()))

    def too_small(self) -> str:
        need = self.batch_size * (self.block_size + 1)
        return (f"the train split ({int(self.unit_tokens.sum()):,} tokens) gives a worker less than one batch of "
                f"{self.batch_size} x {self.block_size + 1} tokens (= {need:,}) per epoch with {self.world} "
                f"worker(s); use more text, fewer workers, or a smaller train.batch_size or model.block_size")


# Each worker's shuffle buffer holds about this many tokens of windows (at least MIN_SHUFFLE_WINDOWS windows).
# A run that reads a fraction of an epoch draws its windows from the units in its buffer and those read since.
# On the demo corpus (1,438 units of 8192 tokens), 450 steps of batch 12 at block 64, over 5 seeds: with 4096
# windows (32 units) each run drew from 74-75 units and reached val 2.109 +- 0.053 (worst 2.189), against
# 2.061 +- 0.004 for random windows from everywhere; with 4M tokens (512 units), 553-554 units and 2.057 +-
# 0.013 (bench/shuffle_buffer.py). Filling it reads 16 MB, about half a second here.
SHUFFLE_TOKENS = 1 << 22
MIN_SHUFFLE_WINDOWS = 1024


def shuffle_windows(block_size: int) -> int:
    """The windows each worker's shuffle buffer holds at block_size."""
    return max(MIN_SHUFFLE_WINDOWS, SHUFFLE_TOKENS // block_size)


def epoch_batches(units: Iterable[tuple[int, np.ndarray]], plan: EpochPlan, epoch: int, rank: int, skip: int = 0,
                  shuffle_buffer: int | None = None, device: torch.device | str = "cpu") -> Iterator[Batch]:
    """``rank``'s batches of ``epoch`` from its units' tokens, given as (unit id, tokens) in plan order, each
    unit's tokens followed by the head of the next unit of the stream (as the read stage delivers them).

    Windows pass through a buffer of ``shuffle_buffer`` windows (None: ``shuffle_windows(block_size)``); a
    random one leaves as each new one enters (seeded by seed, epoch, rank); at the end of the epoch the rest
    leave in random order and a last partial batch is dropped. The first ``skip`` batches are drawn but not
    built (resume)."""
    expected = plan.units(epoch, rank)
    offsets = plan.order(epoch)[1]
    counts = plan.windows_per_unit(epoch)
    total = plan.batches_in_epoch(epoch, rank)
    block, size = plan.block_size, plan.batch_size
    rng = np.random.default_rng([plan.seed, epoch, rank, 1])
    device = torch.device(device)
    buffer: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    emitted = 0
    capacity = max(shuffle_windows(block) if shuffle_buffer is None else shuffle_buffer, size)

    def take(window: np.ndarray):
        nonlocal emitted, pending
        pending.append(window)
        if len(pending) < size:
            return None
        rows, pending = pending, []
        emitted += 1
        if emitted <= skip:
            return None
        arr = to_device(torch.from_numpy(np.stack(rows).astype(np.int64)), device)  # (B, T + 1)
        return arr[:, :-1], arr[:, 1:]

    seen = 0
    for want, (unit, tokens) in zip(expected, units):
        if unit != want:
            raise RuntimeError(f"train stream out of order: got unit {unit}, the plan says {want} (epoch {epoch}, "
                               f"rank {rank}); the dataset must preserve order")
        need = int(plan.unit_tokens[unit] + plan.next_head[unit])
        if len(tokens) != need:
            raise RuntimeError(f"unit {unit} came with {len(tokens)} tokens, its own and the next unit's head make "
                               f"{need}: the read stage and the plan disagree")
        seen += 1
        start = int(offsets[unit])
        for i in range(int(counts[unit])):
            buffer.append(tokens[start + i * block:start + (i + 1) * block + 1])
            if len(buffer) >= capacity:
                j = int(rng.integers(len(buffer)))  # swap a random window out: a reservoir-style shuffle
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                batch = take(buffer.pop())
                if batch is not None:
                    yield batch
    if seen != len(expected):
        raise RuntimeError(f"train stream ended after {seen} of {len(expected)} units of epoch {epoch} (rank {rank})")
    rng.shuffle(buffer)
    for window in buffer:
        batch = take(window)
        if batch is not None:
            yield batch
    assert emitted == total, (emitted, total)  # the plan's count is what resume relies on


# --------------------------------------------------------------------------- val


def windows(chunks: Iterable[np.ndarray], block_size: int) -> Iterator[np.ndarray]:
    """Consecutive (block_size + 1)-token windows over the concatenated chunks; window i starts at
    i * block_size, so its last token is the next window's first (the target of its last position)."""
    carry = np.zeros(0, dtype=np.int64)
    for chunk in chunks:
        buf = np.concatenate([carry, np.asarray(chunk, dtype=np.int64)])
        n = (len(buf) - 1) // block_size  # full windows available
        for i in range(n):
            yield buf[i * block_size:(i + 1) * block_size + 1]
        carry = buf[n * block_size:]


def fixed_batches(chunks: Iterable[np.ndarray], total_tokens: int, block_size: int, batch_size: int, steps: int,
                  seed: int, device: torch.device | str = "cpu") -> list[Batch]:
    """``steps`` batches of windows picked at random (seeded) from the whole stream: the val set.

    The local loop and every Ray worker evaluate on the same windows of the same split, so their val
    losses compare. Memory holds only the picked windows, however long the stream."""
    available = (total_tokens - 1) // block_size
    count = min(steps * batch_size, available) // batch_size * batch_size
    if count == 0:
        raise ValueError(f"the val split ({total_tokens:,} tokens) holds less than one batch of {batch_size} x "
                         f"{block_size + 1} tokens; raise data.val_fraction or lower train.batch_size")
    picked = np.random.default_rng(seed).choice(available, size=count, replace=False)
    slot = {int(w): i for i, w in enumerate(picked)}  # window index -> place in the val set
    rows: list = [None] * count
    for i, w in enumerate(windows(chunks, block_size)):
        if i in slot:
            rows[slot[i]] = w
    if any(r is None for r in rows):
        raise ValueError(f"the val stream was shorter than the {total_tokens:,} tokens it was said to hold")
    arr = torch.from_numpy(np.stack(rows)).to(device)  # (count, T + 1)
    return [(b[:, :-1], b[:, 1:]) for b in arr.split(batch_size)]
