"""Sampling and the object ``raygpt.load()`` returns. No Ray here: this runs on a bare inference box.

    gen = raygpt.load("runs/demo/step_001500")
    gen.generate("def main(", max_new_tokens=100, temperature=0.8, top_k=50)
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch

from raygpt.checkpoint import CheckpointError, load_checkpoint
from raygpt.config import Config, check_sampling
from raygpt.model import GPT, KVCache
from raygpt.quantize import precision_for
from raygpt.quantize import quantize as quantize_model
from raygpt.tokenizer import CharTokenizer, Tokenizer
from raygpt.train import autocast, resolve_device

T = TypeVar("T")
PerRow = Union[T, Sequence[T]]  # one value for every row of a batch, or one per row


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf. logits (B, V)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, [-1]]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens before it already reach p; the first token always stays.
    drop = probs.cumsum(dim=-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """The distribution sample_next draws from: last-position logits (B, V) to probabilities (B, V), each row
    on its own (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return logits.softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[Optional[int]],
                top_p: Sequence[Optional[float]], generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """Next ids of every row of last-position logits (B, V), row i with its own settings and generators[i]:
    for each row the id sample_next draws for that row alone. Temperature, top-k, top-p and softmax are
    arithmetic within a row, so rows that share settings (the usual case) are filtered in one go; only the
    draws go row by row, each from its row's generator as if the row were alone (one draw over the batch
    would change every seeded text). The ids come to the host once per call, not once per row: on a GPU
    each read is a sync that stalls the queue."""
    if all(t == 0 for t in temperature):
        return logits.float().argmax(dim=-1).tolist()
    settings = set(zip(temperature, top_k, top_p))
    if len(settings) == 1:
        probs = sampling_probs(logits, *settings.pop())  # (B, V)
        ids = [torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze(-1) for i, g in enumerate(generators)]
    else:
        ids = [sample_next(logits[i:i + 1], *row) for i, row in enumerate(zip(temperature, top_k, top_p, generators))]
    return torch.cat(ids).tolist()


def generate_tokens(model: GPT, ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, use_cache: bool = True,
                    precision: str = "fp32") -> Iterator[int]:
    """Yield up to max_new_tokens ids continuing ``ids``: generate_batch with one row. The one decoding path
    of raygpt.load().generate, the eval samples and the benchmarks."""
    for ((_, next_id),) in generate_batch(model, [ids], max_new_tokens, temperature, top_k, top_p, [generator],
                                          use_cache, precision):
        yield next_id


# inference_mode, not no_grad: no autograd bookkeeping at all (views, version counters), about 9% of a
# 10M-parameter model's time per token on a CPU; nothing made here ever meets autograd.
@torch.inference_mode()
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: Optional[int],
                   temperature: PerRow[float] = 1.0, top_k: PerRow[Optional[int]] = None,
                   top_p: PerRow[Optional[float]] = None,
                   generators: Optional[Sequence[Optional[torch.Generator]]] = None, use_cache: bool = True,
                   precision: str = "fp32", finished: Optional[set] = None,
                   incoming: Optional[Callable[[], list[tuple]]] = None) -> Iterator[list[tuple[int, int]]]:
    """Continue several prompts together, one forward pass per new token for all of them, under
    ``precision``'s autocast (fp32, bf16, fp16) with the KV cache in the dtype attention computes in.

    Yields, per step, ``(row, id)`` for every row still going (row: the prompt's index). A caller ends a row
    (end of text, a stop string) by adding its index to ``finished``; the row leaves the batch and its cache
    before the next step. Prompts of different lengths are left-padded (GPT.forward's ``pad``). Each row
    samples with its own generator (``generators[row]``), so a row's ids are those of the same prompt alone
    with the same generator, up to float rounding between batch shapes, as long as the longest prompt and
    the new tokens fit in block_size (past it the window below slides for every row at once, when the
    longest row fills it). ``temperature``, ``top_k`` and ``top_p`` are one value for every row or a
    sequence of one per row (a server's requests differ).

    ``incoming`` (a server's continuous batching) is called after each step: the rows it returns, each
    ``(ids, temperature, top_k, top_p, generator)``, join the batch as rows len(prompts), len(prompts) + 1,
    ...: their prompts but the last token are prefilled into the cache beside the others' (one forward pass
    over the new rows only; the others' slots move right when a new prompt is longer), and they decode from
    the next step on. ``max_new_tokens`` None: steps until every row has finished.

    The context is the last block_size tokens. With the KV cache each new token costs one position;
    when the cache is full the window slides: the cache is refilled from each row's last 3/4 block_size
    tokens (learned positions cannot be shifted), so a context stays between 3/4 and a full block (less its
    row's padding) and the refill cost is paid once every block_size/4 tokens."""
    block = model.config.block_size
    device = next(model.parameters()).device
    amp = lambda: autocast(device, precision)  # noqa: E731 (entered anew for each token)
    rows: list[int] = []  # the prompt index of each batch row
    tokens: list[list[int]] = []  # each batch row's tokens (its context is the last block_size of them)
    temperatures, top_ks, top_ps, gens = [], [], [], []  # by prompt index
    finished = finished if finished is not None else set()
    keep = max(1, block - block // 4)
    # The dtype attention computes in (bf16 under autocast): a cache in fp32 would cost twice the memory and a
    # cast of the whole cache per layer per token.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, next(model.parameters()).dtype)

    def add(new: Sequence[tuple]) -> list[list[int]]:  # register rows; their contexts
        contexts = [list(ids)[-block:] for ids, *_ in new]
        if any(not c for c in contexts):
            raise ValueError("every prompt needs at least one token id")
        for ids, t, k, p, g in new:
            rows.append(len(temperatures))
            temperatures.append(t), top_ks.append(k), top_ps.append(p), gens.append(g)
        tokens.extend(contexts)
        return contexts

    def padded(contexts: list[list[int]], width: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        width = max(len(c) for c in contexts) if width is None else width
        pad = [width - len(c) for c in contexts]
        x = torch.tensor([[0] * n + c for n, c in zip(pad, contexts)], dtype=torch.long, device=device)
        return x, torch.tensor(pad, device=device) if any(pad) else None

    def start() -> tuple[Optional[KVCache], torch.Tensor, Optional[torch.Tensor]]:  # every row from its context
        cache = KVCache.empty(model.config, len(rows), device, dtype) if use_cache else None
        return (cache, *padded([t[-block:] for t in tokens]))

    def join(cache: KVCache, pad: Optional[torch.Tensor], next_ids: list[int], new: Sequence[tuple]):
        """The rows of ``new`` into a running batch whose next input is ``next_ids``."""
        before = [c[:-1] for c in add(new)]  # prefilled now; each last token goes in with the next step
        width = max(cache.pos, max(len(b) for b in before))
        old = len(next_ids)
        pad = pad if pad is not None else torch.zeros(old, dtype=torch.long, device=device)
        if width > cache.pos:  # the running rows' slots move right (positions come from slot - pad)
            shift = width - cache.pos
            for kv in (cache.k, cache.v):
                for i, t in enumerate(kv):
                    kv[i] = torch.cat([torch.zeros_like(t[:, :, :shift]), t[:, :, :-shift]], dim=2)
            cache.pos, pad = width, pad + shift
        fresh = KVCache.empty(model.config, len(new), device, dtype)
        xb, padb = padded(before, width)
        if width > 0:
            with amp():
                model(xb, cache=fresh, pad=padb)
        fresh.pos = width
        for kv, more in ((cache.k, fresh.k), (cache.v, fresh.v)):
            for i, t in enumerate(more):
                kv[i] = torch.cat([kv[i], t])
        pad = torch.cat([pad, padb if padb is not None else torch.zeros(len(new), dtype=torch.long, device=device)])
        x = torch.tensor(next_ids + [t[-1] for t in tokens[old:]], dtype=torch.long, device=device)[:, None]
        return x, pad if bool(pad.any()) else None

    add([(ids, *(v[i] if isinstance(v, (list, tuple)) else v for v in (temperature, top_k, top_p)),
          generators[i] if generators is not None else None) for i, ids in enumerate(prompts)])
    if not rows:
        return
    cache, x, pad = start()
    step = 0
    while max_new_tokens is None or step < max_new_tokens:
        step += 1
        with amp():
            logits, _ = model(x, cache=cache, pad=pad)
        next_ids = sample_rows(logits[:, -1, :], [temperatures[r] for r in rows], [top_ks[r] for r in rows],
                               [top_ps[r] for r in rows], [gens[r] for r in rows])
        for t, n in zip(tokens, next_ids):
            t.append(n)
        yield list(zip(rows, next_ids))
        going = [i for i, r in enumerate(rows) if r not in finished]
        new = incoming() if incoming is not None else []
        if len(going) < len(rows):  # finished rows leave the batch
            rows, tokens, next_ids = ([a[i] for i in going] for a in (rows, tokens, next_ids))
            index = torch.tensor(going, device=device)
            if cache is not None and going:
                cache.keep_rows(index)
            if pad is not None:
                pad = pad[index] if going and bool(pad[index].any()) else None
        if not rows and not new:
            return
        if not rows or cache is None:  # start afresh from every row's context (no cache: every step)
            add(new)
            cache, x, pad = start()
        elif cache.pos >= block:  # the window slides for the running rows; new rows come whole
            contexts = [t[-keep:] for t in tokens] + add(new)
            cache = KVCache.empty(model.config, len(rows), device, dtype) if new else cache
            cache.reset()
            x, pad = padded(contexts)
        elif new:
            x, pad = join(cache, pad, next_ids, new)
        else:
            x = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]  # (B, 1)


def check_prompt(tokenizer: Tokenizer, prompt: str, name: str, fix: str) -> None:
    """A prompt the tokenizer cannot encode is one ValueError that names it (``name``: sample.prompt,
    PROMPT), says which characters, and ends with what to do (``fix``)."""
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        what = str(e)
        if isinstance(tokenizer, CharTokenizer):
            missing = sorted(set(prompt) - set(tokenizer.chars))
            what = (", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
                    + f" not in the char vocabulary ({len(tokenizer.chars)} characters of the training corpus)")
        shown = repr(prompt) if len(prompt) <= 40 else repr(prompt[:40]) + "..."
        raise ValueError(f"{name}={shown} cannot be encoded: {what}; {fix}") from None


class TextGenerator:
    """A trained model with its tokenizer and config: what ``raygpt.load`` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: Config, device: torch.device, quantize: str = "none"):
        self.params = model.num_params()  # before quantizing: int8 Linear layers hold no nn.Parameter
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.quantize = quantize
        # int8 / bf16 / fp16 weights in memory only (raygpt/quantize.py), generated without autocast
        self.model = quantize_model(model.eval(), quantize, device)
        self.precision = precision_for(quantize, device)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"TextGenerator({self.params / 1e6:.2f}M params, {m.n_layer} layers, {self.tokenizer!r}, "
                f"device={self.device}" + (f", quantize={self.quantize}" if self.quantize != "none" else "") + ")")

    def generate(self, prompt: Union[str, list[str]], max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Union[int, None, Sequence[Optional[int]]] = None, stop: Union[str, list[str], None] = None,
                 stream: bool = False, use_cache: bool = True, batch_size: int = 32):
        """Continue ``prompt``. A string gives a string, a list gives a list, ``stream=True`` gives an
        iterator of text pieces (one prompt). Stops after max_new_tokens, at the end-of-text token, or
        before the first ``stop`` string (not included). Same seed, same text; prompts longer than
        block_size keep their last block_size tokens. A list is generated ``batch_size`` prompts at a time,
        each batch in one forward pass per token, and each prompt's text is the one it gets alone with its
        seed (``seed``: one for every prompt, or a list of one per prompt). Every argument is checked (see
        check) before any token is generated."""
        if stream and not isinstance(prompt, str):
            raise ValueError("stream=True takes one prompt string, not a list")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer of at least 1")
        stops = self.check(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop)
        args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stops=stops)
        if isinstance(prompt, str):
            pieces = self._stream(prompt, seed=seed, use_cache=use_cache, **args)
            return pieces if stream else "".join(pieces)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompt)
        rows = [Row(self.prompt_ids(p), generator=self.generator(s), **args) for p, s in zip(prompt, seeds)]
        return [text for i in range(0, len(rows), batch_size) for text in self._batch(rows[i:i + batch_size],
                                                                                       use_cache)]

    def check(self, prompt: Union[str, list[str]], max_new_tokens: int = 200, temperature: float = 1.0,
              top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
              stop: Union[str, list[str], None] = None, num_samples: int = 1, name=lambda key: key) -> list[str]:
        """The arguments of generate() checked, all of them, before any output: a ValueError naming the first
        bad one (``name`` turns an argument's name into what the user wrote, e.g. ``--top-p``). The numeric
        rules are raygpt.config.check_sampling's, shared with the sample.* keys. Returns the stop strings."""
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        if isinstance(seed, (list, tuple)) and (isinstance(prompt, str) or len(seeds) != len(prompt)):
            raise ValueError(f"{name('seed')}: a list of seeds needs a list of prompts of the same length "
                             f"({len(seeds)} seeds)")
        for one in seeds:
            check_sampling(name, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=one, num_samples=num_samples)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"{name('stop')} strings must be non-empty strings, got {stops!r}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{name('prompt')} must be a string or a list of strings, got {prompt!r}"[:300])
        for p in prompts:
            check_prompt(self.tokenizer, p, name("prompt"), "leave those characters out: a char-level model "
                         "knows only the characters of its training corpus")
        return stops

    def generator(self, seed: Optional[int]) -> torch.Generator:
        """A generator on the model's device seeded with ``seed`` (None: a random seed)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        return generator

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids of a prompt; the empty prompt is the end-of-text token (a new document)."""
        return self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]

    def _stream(self, prompt: str, seed: Optional[int], use_cache: bool, **args) -> Iterator[str]:
        rows = [Row(self.prompt_ids(prompt), generator=self.generator(seed), **args)]
        for ((_, piece, _),) in decode_rows(self.model, self.tokenizer, rows, use_cache, self.precision):
            if piece:
                yield piece

    def _batch(self, rows: list[Row], use_cache: bool) -> list[str]:
        pieces: list[list[str]] = [[] for _ in rows]
        for group in exact_groups(rows, self.config.model.block_size):
            for step in decode_rows(self.model, self.tokenizer, [rows[i] for i in group], use_cache, self.precision):
                for j, piece, _ in step:
                    pieces[group[j]].append(piece)
        return ["".join(p) for p in pieces]


def exact_groups(rows: Sequence[Row], block_size: int) -> list[list[int]]:
    """Rows that decode_rows can decode together so that each text is the one its row gets alone: the rows of
    a batch share one KV cache, whose window slides when the longest row fills it, so past block_size a row's
    context would depend on the rows beside it. Rows whose prompt and new tokens fit in block_size form one
    group; the others, groups of one prompt length (cropped to block_size), which slide as each would alone."""
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        n = min(len(row.ids), block_size)
        groups.setdefault(-1 if n + row.max_new_tokens <= block_size else n, []).append(i)
    return list(groups.values())


@dataclass
class Row:
    """One continuation of a batch: its prompt's token ids and how to sample it."""
    ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None
    stops: Sequence[str] = ()
    # Where decode_rows left it: ids holds the new tokens too, made counts them, text holds the text not yet
    # shown. Decoding the row again (a server rebuilding its batch) continues it exactly where it stopped.
    made: int = 0
    text: Optional["TextStream"] = field(default=None, repr=False)


def decode_rows(model: GPT, tokenizer: Tokenizer, rows: Sequence[Row], use_cache: bool = True,
                precision: str = "fp32", cancelled: Callable[[int], bool] = lambda row: False,
                incoming: Optional[Callable[[], list[Row]]] = None) -> Iterator[list[tuple[int, str, Optional[str]]]]:
    """Continue several rows together (generate_batch: one forward pass per token for all of them), as text.

    Yields, per step, ``(row, piece, finish)`` for every row still going: ``piece`` the text that can be
    shown now ('' while a character or a possible stop string is incomplete), ``finish`` None, or why the
    row ended: "stop" (the end-of-text token or a stop string, which is not shown) or "length" (its
    max_new_tokens). Every row ends exactly once. A row for which ``cancelled(row)`` turns true (a client
    that went away) leaves the batch before the next step, without a finish. ``incoming`` (continuous
    batching) is called after each step; the rows it returns join, numbered on from the last. Each row's
    ids, made and text move on with it (a row can be decoded on in another call)."""
    rows = list(rows)
    live: list[int] = []  # generate_batch's row j is rows[live[j]]
    empty: list[tuple[int, str, Optional[str]]] = []  # rows that come with nothing left to make

    def take(first: int) -> list[tuple]:
        out = []
        for i in range(first, len(rows)):
            row = rows[i]
            if row.text is None:
                row.text = TextStream(tokenizer, row.stops)
            if row.made >= row.max_new_tokens:
                empty.append((i, "", "length"))
            else:
                live.append(i)
                out.append((row.ids, row.temperature, row.top_k, row.top_p, row.generator))
        return out

    def more() -> list[tuple]:
        first = len(rows)
        rows.extend(incoming())
        return take(first)

    start = take(0)
    if empty:
        yield list(empty)
        empty.clear()
    if not start:
        return
    finished: set[int] = set()
    steps = generate_batch(model, [r[0] for r in start], None, [r[1] for r in start], [r[2] for r in start],
                           [r[3] for r in start], [r[4] for r in start], use_cache, precision, finished,
                           more if incoming is not None else None)
    for step in steps:
        out = list(empty)
        empty.clear()
        for j, next_id in step:
            i = live[j]
            row, text = rows[i], rows[i].text
            row.ids.append(next_id)
            row.made += 1
            if next_id == tokenizer.eot_id:
                piece, finish = text.finish(), "stop"
            else:
                piece = text.push(next_id)
                finish = ("stop" if text.done else "length" if row.made >= row.max_new_tokens else None)
                if finish == "length":
                    piece += text.finish()
            if finish is not None or cancelled(i):
                finished.add(j)
            out.append((i, piece, finish))
        yield out
    if empty:  # rows that joined with nothing to make as the last ones ended
        yield list(empty)


class TextStream:
    """Token ids in, text out, one id at a time, in time independent of how much came before: each id
    decodes only the few ids since the last complete character (the way streaming servers detokenize), and
    stop strings are looked for only in text not yet shown. A partial UTF-8 character (decoded as U+FFFD)
    waits for the ids that complete it, and a tail that could begin a stop string waits for the next text."""

    WINDOW = 8  # ids a partial character may span before it is shown as it is (UTF-8: at most 4 bytes)

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []  # the ids of the last piece shown, then those not shown yet
        self.read = 0  # ids[:read] are shown; decoding ids[:read] too gives the context for the next piece
        self.pending = ""  # decoded, not shown: it may be the start of a stop string
        self.done = False  # a stop string was reached: nothing more to show

    def push(self, token_id: int) -> str:
        """The text that can be shown now that ``token_id`` came ('' while it waits, and after a stop)."""
        if self.done:
            return ""
        self.ids.append(token_id)
        shown = self.tokenizer.decode(self.ids[:self.read])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and len(self.ids) - self.read < self.WINDOW:
            return ""  # the next id may complete the character
        del self.ids[:self.read]  # the ids just decoded are the next piece's context
        self.read = len(self.ids)
        return self._show(text[len(shown):])

    def finish(self) -> str:
        """What is left to show when generation ends (max_new_tokens, end of text)."""
        if self.done:
            return ""
        text = self._show(self.tokenizer.decode(self.ids)[len(self.tokenizer.decode(self.ids[:self.read])):])
        if self.done:
            return text
        rest, self.pending, self.ids, self.read = self.pending, "", [], 0
        return text + rest

    def _show(self, piece: str) -> str:
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            shown, self.pending, self.done = self.pending[:cut], "", True
            return shown
        n = len(self.pending) - _stop_start(self.pending, self.stops)
        shown, self.pending = self.pending[:n], self.pending[n:]
        return shown


def _stop_start(text: str, stops: list[str]) -> int:
    """The length of the longest tail of ``text`` that begins some stop string (0: none)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def load(path, device: Union[str, torch.device, None] = None, check: bool = True,
         quantize: str = "none") -> TextGenerator:
    """Load a raygpt checkpoint for generation.

    ``path``: a checkpoint directory, a run directory (its latest checkpoint), or a Ray ``Checkpoint``
    (anything with ``to_directory()``, e.g. ``result.checkpoint``). ``device``: None picks CUDA, then
    MPS, then CPU. ``quantize``: none, or int8 / bf16 / fp16 weights in memory (raygpt.quantize)."""
    device = resolve_device("auto" if device is None else str(device))
    from raygpt.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(_local_path(path))
    model, config, tokenizer, _ = load_checkpoint(path, device=device, check=check)
    return TextGenerator(model, tokenizer, config, device, quantize)


def _local_path(path) -> Path:
    if hasattr(path, "to_directory"):  # a Ray Checkpoint, duck-typed: this module never imports Ray
        if getattr(path, "filesystem", None) is not None and getattr(path.filesystem, "type_name", "") == "local":
            return Path(path.path)
        return Path(path.to_directory(tempfile.mkdtemp(prefix="raygpt-ckpt-")))
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    return path
