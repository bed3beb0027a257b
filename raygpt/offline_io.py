"""Offline generation and evaluation, the parts without Ray: every input checked whole before any work
(plan_generate, plan_eval), a batch of prompts each with its own seed, the perplexity windows and their
scores, BLEU, atomic output and the eval table. raygpt/offline.py runs them on Ray Data; everything here also
runs in one plain process, and `raygpt generate --input` / `raygpt eval` refuse bad input before Ray is imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raygpt.checkpoint import TOKENIZER, load_config_of, read_meta, resolve_checkpoint
from raygpt.config import Config, check_sampling
from raygpt.data.corpus import encode_documents, read_documents
from raygpt.data.sources import Skipped
from raygpt.generate import check_prompt
from raygpt.tokenizer import Tokenizer, load_tokenizer
from raygpt.train import autocast

# Sampling settings are options for the whole file; a line that sets one is refused rather than ignored.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
MORE_LISTED = 5  # further bad lines named after the first one
LOGITS_PER_PASS = 1 << 26  # logits (floats) a scoring forward pass makes at most, unless one window needs more


@dataclass
class PromptLine:
    """One line of a prompt file: its 1-based line number, its prompt, its reference (pairs) and its "id"
    (any JSON value, passed through; ``has_id`` tells an absent id from a null one)."""
    line: int
    prompt: str
    reference: Optional[str] = None
    id: Any = None
    has_id: bool = False


def open_checkpoint(path: str) -> tuple[Path, dict, Config, Tokenizer]:
    """(checkpoint folder, meta.json, config, tokenizer) of a checkpoint or run folder, read without loading
    the weights: what the driver needs to check every input before any actor starts."""
    folder = resolve_checkpoint(Path(os.path.expanduser(path)))
    meta = read_meta(folder)  # one clear CheckpointError for a folder that is not a checkpoint
    return folder.resolve(), meta, load_config_of(folder), load_tokenizer(folder / TOKENIZER)


def read_prompt_lines(path: str, tokenizer: Tokenizer, option: str = "--input",
                      fields: Sequence[str] = ("prompt",)) -> tuple[list[PromptLine], int]:
    """The lines of a JSONL prompt file, every one checked before any work: each must be a JSON object with
    a string for every name in ``fields`` ("prompt", and "reference" for BLEU pairs), no per-line sampling
    setting, and a prompt the tokenizer can encode. Returns (lines, blank lines skipped). A bad line is one
    ValueError naming the file, its line number and what to fix, and the numbers of the other bad lines."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise ValueError(f"{option} {path}: no such file")
    rows, bad, blank = [], [], 0
    # Split on b"\n" only (not splitlines): JSON strings may hold U+2028 raw, and line numbers must be an editor's.
    raw_lines = file.read_bytes().split(b"\n")
    if raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()  # the newline that ends the last line starts no line of its own
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            blank += 1
            continue
        try:
            rows.append(parse_line(raw, number, tokenizer, fields))
        except ValueError as e:
            bad.append((number, str(e)))
    if bad:
        others = [str(n) for n, _ in bad[1:]]
        more = (f" (also bad: line{'s' if len(others) > 1 else ''} {', '.join(others[:MORE_LISTED])}"
                f"{', ...' if len(others) > MORE_LISTED else ''})" if others else "")
        raise ValueError(f"{option} {path} line {bad[0][0]}: {bad[0][1]}{more}; nothing was run")
    if not rows:
        raise ValueError(f"{option} {path} holds no lines; give one JSON object with a \"prompt\" per line")
    return rows, blank


def parse_line(raw: bytes, number: int, tokenizer: Tokenizer, fields: Sequence[str] = ("prompt",)) -> PromptLine:
    """One checked line (see read_prompt_lines); a ValueError says what is wrong with it and what to do."""
    shape = "every line must be one JSON object such as " + json.dumps({f: "..." for f in fields})
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}); {shape}") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {json_type(record)}, not an object; {shape}")
    for key in fields:
        if key not in record:
            raise ValueError(f"no \"{key}\" field (its fields: {', '.join(record) or 'none'}); {shape}")
        if not isinstance(record[key], str):
            raise ValueError(f"\"{key}\" is a JSON {json_type(record[key])}, not a string; {shape}")
    setting = next((k for k in SAMPLING_KEYS if k in record), None)
    if setting is not None:
        raise ValueError(f"sets \"{setting}\", but sampling settings apply to the whole file: give them as "
                         f"options (--{setting.replace('_', '-')}) and leave them out of the lines")
    check_prompt(tokenizer, record["prompt"], "prompt", "leave those characters out: a char-level model knows "
                 "only the characters of its training corpus")
    return PromptLine(number, record["prompt"], record.get("reference"), record.get("id"), "id" in record)


def json_type(value) -> str:
    """What JSON calls the type of a parsed value."""
    return ("null" if value is None else "boolean" if isinstance(value, bool) else "number"
            if isinstance(value, (int, float)) else {dict: "object", list: "array", str: "string"}[type(value)])


def check_generation(**sampling) -> list[str]:
    """The sampling options checked as TextGenerator.check does, on the driver, before any actor loads a
    model; returns the stop strings."""
    stop = sampling.pop("stop", None)
    check_sampling(lambda key: "--" + key.replace("_", "-"), **sampling)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"--stop strings must be non-empty strings, got {stops!r}")
    return stops


def check_batch_size(batch_size) -> None:
    """--batch-size: rows per actor call, at least 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size={batch_size!r} must be an integer of at least 1")


def check_output(path: str, overwrite: bool, option: str = "--output") -> Path:
    """The output file's path, checked before any work: a file that exists is replaced only with
    ``overwrite``; its folder must exist."""
    out = Path(os.path.expanduser(path))
    if out.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name in it")
    if out.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it, or give another name")
    if not out.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {out.parent} does not exist; create it first")
    return out


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write ``lines`` (each ending without a newline) to ``path`` through a temporary file in the same
    folder, renamed into place once complete and synced: a run that fails never leaves a partial ``path``,
    and one that exists stays as it was until then."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_record(row: PromptLine, completion: str) -> str:
    """One line of the output JSONL: the input's line number, its id (when it has one), prompt and completion."""
    record = {"line": row.line, **({"id": row.id} if row.has_id else {}), "prompt": row.prompt,
              "completion": completion}
    return json.dumps(record, ensure_ascii=False)


# --------------------------------------------------------------------------- perplexity


def corpus_stream(source: str, tokenizer: Tokenizer, max_chars: Optional[int] = None, text_field: str = "text",
                  skipped: Optional[list[Skipped]] = None) -> np.ndarray:
    """Every document of ``source`` (any data.source) as one token stream, as training sees text: each
    document's ids followed by end-of-text, and one end-of-text first so that the first document's first
    token is predicted too. A document the tokenizer cannot encode is one ValueError that names it."""
    docs = read_documents(source, max_chars, text_field, skipped)
    try:
        ids = encode_documents((d.text for d in docs), tokenizer)
    except ValueError:
        for d in docs:  # name the document (the tokenizer's own message names only a position)
            check_prompt(tokenizer, d.text, f"--data {source}: document {d.name}",
                         "a char-level model cannot score characters outside its training corpus: leave them out")
        raise
    return np.concatenate([np.array([tokenizer.eot_id], dtype=np.int32), ids])


def windows(stream: np.ndarray, block_size: int) -> np.ndarray:
    """The scoring windows of a token stream, (n, block_size + 1): window k holds stream[kB : kB + B + 1], its
    inputs the first B and its targets the last B, so the targets of the windows are every token after the
    first exactly once. The last window is partial when the tokens do not fill it: padded with -1 (an
    ignored target; its inputs there are filler after every real token, which causal attention keeps from
    changing the real positions' scores). Each window starts without context from the one before."""
    targets = len(stream) - 1
    if targets < 1:
        raise ValueError("the corpus holds no tokens to score")
    n = -(-targets // block_size)
    padded = np.full(n * block_size + 1, -1, dtype=np.int32)
    padded[:len(stream)] = stream
    return np.lib.stride_tricks.sliding_window_view(padded, block_size + 1)[::block_size].copy()


@torch.no_grad()
def score_windows(model, batch: np.ndarray, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(sum of the negative log-likelihoods in nats, scored tokens) of each window (rows of ``windows``), in
    float64: the parts of a token-weighted mean that add up exactly however the windows are split up."""
    device = next(model.parameters()).device
    w = torch.from_numpy(np.array(batch, dtype=np.int64)).to(device)  # a copy: Ray's batches are read-only
    x, y = w[:, :-1].clamp(min=0), w[:, 1:]  # -1: padding (filler input, ignored target)
    # The logits of a window are block_size x vocab_size floats (GPT-2: 200 MB): a few windows at a time.
    step = max(1, LOGITS_PER_PASS // (x.shape[1] * model.config.vocab_size))
    sums = []
    for i in range(0, len(x), step):
        with autocast(device, precision):
            logits, _ = model(x[i:i + step], y[i:i + step])  # (n, B, V): with targets, every position's
        nll = F.cross_entropy(logits.float().transpose(1, 2), y[i:i + step], ignore_index=-1, reduction="none")
        sums.append(nll.double().sum(dim=1))  # (n,)
    return torch.cat(sums).cpu().numpy(), (y >= 0).sum(dim=1).cpu().numpy()


def perplexity_result(nll: Sequence[float], tokens: Sequence[int], block_size: int) -> dict:
    """The token-weighted mean NLL and its exp from per-window sums, in any order (math.fsum: exact)."""
    total, count = math.fsum(nll), int(sum(tokens))
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": count,
            "blocks": len(tokens), "block_size": block_size,
            "last_block_tokens": count - (len(tokens) - 1) * block_size, "nll_sum": total}


# --------------------------------------------------------------------------- BLEU and the report


def check_sacrebleu() -> None:
    """BLEU needs sacrebleu: say so before any work."""
    if importlib.util.find_spec("sacrebleu") is None:
        raise ValueError("--pairs (BLEU) needs sacrebleu: pip install sacrebleu")


def reference_tokens(references: Sequence[str], tokenizer: Tokenizer) -> int:
    """Tokens of the longest reference: the default --max-new-tokens of BLEU, enough to reach every one. A
    reference a char-level tokenizer cannot encode counts its characters."""
    def tokens(text: str) -> int:
        try:
            return len(tokenizer.encode(text))
        except ValueError:
            return len(text)
    return max(tokens(r) for r in references)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacrebleu's corpus BLEU (one reference per hypothesis, its default 13a tokenization) with its
    signature, so a score can be compared with another only when the settings match."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": result.score, "precisions": result.precisions, "brevity_penalty": result.bp,
            "hyp_len": result.sys_len, "ref_len": result.ref_len, "signature": str(metric.get_signature())}


def format_table(report: dict) -> str:
    """The eval report as one table: metric, value, what it is over."""
    rows = []
    ppl = report.get("perplexity")
    if ppl:
        last = ppl["last_block_tokens"]
        over = (f"{ppl['tokens']:,} tokens in {ppl['blocks']:,} blocks of {ppl['block_size']}"
                + ("" if last == ppl["block_size"] else f" (the last one {last})") + f" from {ppl['source']}")
        rows += [("loss", f"{ppl['loss']:.4f}", "nats per token over " + over),
                 ("perplexity", f"{ppl['perplexity']:.4f}", "exp(loss)")]
    b = report.get("bleu")
    if b:
        how = "greedy" if b["temperature"] == 0 else f"temperature {b['temperature']}, pair i seeded {b['seed']} + i"
        rows.append(("BLEU", f"{b['bleu']:.2f}", f"{b['pairs']:,} pairs from {b['file']} ({how}, at most "
                     f"{b['max_new_tokens']} new tokens; {b['signature']})"))
    width = max(len(v) for _, v, _ in rows)
    return "\n".join([f"{'metric':<10}  {'value':>{width}}  over"]
                     + [f"{name:<10}  {value:>{width}}  {over}".rstrip() for name, value, over in rows])


# --------------------------------------------------------------------------- the jobs, checked whole


@dataclass
class GenerateJob:
    """`raygpt generate --input`, its every input checked: what raygpt.offline.generate_file runs."""
    checkpoint: Path
    rows: list[PromptLine]
    blank_lines: int
    input: str
    output: Path
    seed: Optional[int]
    batch_size: int
    sampling: dict  # max_new_tokens, temperature, top_k, top_p, stop (a list)


def plan_generate(checkpoint: str, input_path: str, output_path: str, *, overwrite: bool = False,
                  batch_size: int = 32, seed: Optional[int] = None, **sampling) -> GenerateJob:
    """Check all that `raygpt generate --input` is given (the checkpoint, the sampling options, where the
    output goes, every line of the input) before any work; the first mistake is one ValueError."""
    folder, _, _, tokenizer = open_checkpoint(checkpoint)
    sampling["stop"] = check_generation(seed=seed, **sampling)
    check_batch_size(batch_size)
    out = check_output(output_path, overwrite)
    rows, blank = read_prompt_lines(input_path, tokenizer)
    return GenerateJob(folder, rows, blank, input_path, out, seed, batch_size, sampling)


@dataclass
class EvalJob:
    """`raygpt eval`, its every input checked and read: what raygpt.offline.run_eval runs."""
    checkpoint: Path
    step: int
    block_size: int
    json_path: Path
    batch_size: int
    data: Optional[str] = None
    stream: Optional[np.ndarray] = None  # --data as one token stream (corpus_stream)
    skipped: list[Skipped] = field(default_factory=list)  # --data files and records that could not be read
    pairs: Optional[str] = None
    pair_rows: Optional[list[PromptLine]] = None
    seed: int = 0
    sampling: dict = field(default_factory=dict)


def plan_eval(checkpoint: str, *, data: Optional[str] = None, pairs: Optional[str] = None,
              json_path: str = "eval.json", batch_size: int = 32, max_chars: Optional[int] = None,
              text_field: str = "text", seed: int = 0, max_new_tokens: Optional[int] = None, **sampling) -> EvalJob:
    """Check all that `raygpt eval` is given and read its inputs (--data tokenized whole, so a document the
    tokenizer cannot encode is named now); the first mistake is one ValueError. BLEU generates at most
    ``max_new_tokens`` (None: the longest reference's tokens)."""
    if not data and not pairs:
        raise ValueError("give --data SOURCE (perplexity), --pairs FILE (BLEU), or both")
    folder, meta, cfg, tokenizer = open_checkpoint(checkpoint)
    check_batch_size(batch_size)
    job = EvalJob(folder, meta["step"], cfg.model.block_size, check_output(json_path, True, "--json"), batch_size,
                  data=data, pairs=pairs, seed=seed)
    if pairs:  # first: it is quick, and --data may be a big read
        check_sacrebleu()
        job.pair_rows, _ = read_prompt_lines(pairs, tokenizer, "--pairs", ("prompt", "reference"))
        if max_new_tokens is None:
            max_new_tokens = reference_tokens([r.reference for r in job.pair_rows], tokenizer)
        sampling["stop"] = check_generation(max_new_tokens=max_new_tokens, seed=seed, **sampling)
        job.sampling = dict(max_new_tokens=max_new_tokens, **sampling)
    if data:
        job.stream = corpus_stream(data, tokenizer, max_chars, text_field, job.skipped)
    return job
