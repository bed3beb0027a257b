"""Sampling and the object ``raygpt.load()`` returns. No Ray here: this runs on a bare inference box.

    gen = raygpt.load("runs/demo/step_001500")
    gen.generate("def main(", max_new_tokens=100, temperature=0.8, top_k=50)
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from raygpt.checkpoint import CheckpointError, load_checkpoint
from raygpt.config import Config, check_sampling
from raygpt.model import GPT, KVCache
from raygpt.tokenizer import CharTokenizer, Tokenizer
from raygpt.train import autocast, resolve_device, resolve_precision


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


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, use_cache: bool = True,
                    precision: str = "fp32") -> Iterator[int]:
    """Yield up to max_new_tokens ids continuing ``ids``, under ``precision``'s autocast (fp32, bf16, fp16)
    with the KV cache in the dtype attention computes in: the one decoding path of raygpt.load().generate,
    the eval samples and the benchmarks.

    The context is the last block_size tokens. With the KV cache each new token costs one position;
    when the cache is full the window slides: the cache is refilled from the last 3/4 block_size tokens
    (learned positions cannot be shifted), so the context stays between 3/4 and a full block and the
    refill cost is paid once every block_size/4 tokens."""
    block = model.config.block_size
    device = next(model.parameters()).device
    amp = lambda: autocast(device, precision)  # noqa: E731 (entered anew for each token)
    tokens = list(ids)[-block:]
    cache = None
    if use_cache:
        # The dtype attention computes in (bf16 under autocast): a cache in fp32 would cost twice the
        # memory and a cast of the whole cache per layer per token.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, next(model.parameters()).dtype)
        cache = KVCache.empty(model.config, 1, device, dtype)
    keep = max(1, block - block // 4)
    context = tokens
    for _ in range(max_new_tokens):
        x = torch.tensor([context], dtype=torch.long, device=device)  # (1, T)
        with amp():
            logits, _ = model(x, cache=cache)
        next_id = int(sample_next(logits[:, -1, :], temperature, top_k, top_p, generator))
        yield next_id
        tokens.append(next_id)
        if cache is None:
            context = tokens[-block:]
        elif cache.pos < block:
            context = [next_id]
        else:
            cache.reset()
            context = tokens[-keep:]


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

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: Config, device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.precision = resolve_precision("auto", device)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"TextGenerator({self.model.num_params() / 1e6:.2f}M params, {m.n_layer} layers, "
                f"{self.tokenizer!r}, device={self.device})")

    def generate(self, prompt: Union[str, list[str]], max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stop: Union[str, list[str], None] = None, stream: bool = False, use_cache: bool = True):
        """Continue ``prompt``. A string gives a string, a list gives a list, ``stream=True`` gives an
        iterator of text pieces (one prompt). Stops after max_new_tokens, at the end-of-text token, or
        before the first ``stop`` string (not included). Same seed, same text; prompts longer than
        block_size keep their last block_size tokens. Every argument is checked (see check) before any
        token is generated."""
        if stream and not isinstance(prompt, str):
            raise ValueError("stream=True takes one prompt string, not a list")
        stops = self.check(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop)
        args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stops=stops, use_cache=use_cache)
        if isinstance(prompt, str):
            pieces = self._stream(prompt, **args)
            return pieces if stream else "".join(pieces)
        return ["".join(self._stream(p, **args)) for p in prompt]

    def check(self, prompt: Union[str, list[str]], max_new_tokens: int = 200, temperature: float = 1.0,
              top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
              stop: Union[str, list[str], None] = None, num_samples: int = 1, name=lambda key: key) -> list[str]:
        """The arguments of generate() checked, all of them, before any output: a ValueError naming the first
        bad one (``name`` turns an argument's name into what the user wrote, e.g. ``--top-p``). The numeric
        rules are raygpt.config.check_sampling's, shared with the sample.* keys. Returns the stop strings."""
        check_sampling(name, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, num_samples=num_samples)
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

    def _stream(self, prompt: str, max_new_tokens, temperature, top_k, top_p, seed, stops,
                use_cache) -> Iterator[str]:
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]  # empty: a new document
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        new_ids: list[int] = []
        emitted = 0
        for next_id in generate_tokens(self.model, ids, max_new_tokens, temperature, top_k, top_p,
                                       generator, use_cache, self.precision):
            if next_id == self.tokenizer.eot_id:
                break
            new_ids.append(next_id)
            text = self.tokenizer.decode(new_ids)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = _safe_length(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self.tokenizer.decode(new_ids)
        if len(text) > emitted:
            yield text[emitted:]


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be shown now: not a trailing partial UTF-8 character (decoded as U+FFFD,
    it may still complete) and not a tail that could be the start of a stop string."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                n -= k
                break
    return n


def load(path, device: Union[str, torch.device, None] = None, check: bool = True) -> TextGenerator:
    """Load a raygpt checkpoint for generation.

    ``path``: a checkpoint directory, a run directory (its latest checkpoint), or a Ray ``Checkpoint``
    (anything with ``to_directory()``, e.g. ``result.checkpoint``). ``device``: None picks CUDA, then
    MPS, then CPU."""
    device = resolve_device("auto" if device is None else str(device))
    path = _local_path(path)
    from raygpt.checkpoint import latest_checkpoint, META

    if path.is_dir() and not (path / META).exists():
        found = latest_checkpoint(path)
        if found is not None:
            path = found
    model, config, tokenizer, _ = load_checkpoint(path, device=device, check=check)
    return TextGenerator(model, tokenizer, config, device)


def _local_path(path) -> Path:
    if hasattr(path, "to_directory"):  # a Ray Checkpoint, duck-typed: this module never imports Ray
        if getattr(path, "filesystem", None) is not None and getattr(path.filesystem, "type_name", "") == "local":
            return Path(path.path)
        return Path(path.to_directory(tempfile.mkdtemp(prefix="raygpt-ckpt-")))
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    return path
