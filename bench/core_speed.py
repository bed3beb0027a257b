"""Core speed: training step time, tokens/s and MFU, and generation with and without the KV cache.

    python bench/core_speed.py [CONFIG] [key=value ...] [--steps N] [--warmup N] [--gen-tokens N]
                               [--gen-batch N] [--matrix] [--out results.json]

    python bench/core_speed.py configs/default.yaml
    python bench/core_speed.py configs/gpt2_124m.yaml --matrix --out gpt2_124m.json     # on a GPU

It times the real raygpt.train.train_step and raygpt.generate.generate_tokens on random token ids (and
generate_batch: N prompts of mixed lengths decoded together against one at a time), so it
needs no corpus and no tokenizer, and imports only the raygpt core (never Ray): it runs from a checkout
on a bare GPU box with torch, numpy, pyyaml and safetensors. It prints figures; it asserts no speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raygpt.checkpoint import unwrap  # noqa: E402
from raygpt.cli import split_config_args  # noqa: E402
from raygpt.config import Config, ConfigError, grad_accum_steps, load_config  # noqa: E402
from raygpt.generate import generate_batch, generate_tokens  # noqa: E402
from raygpt.model import GPT  # noqa: E402
from raygpt.runs import build_training, device_for  # noqa: E402
from raygpt.train import (TokenBatches, autocast, has_native_bf16, lr_at, peak_flops, resolve_precision,  # noqa: E402
                          train_step)

DEFAULT_VOCAB = 256  # when model.vocab_size is left to the tokenizer: a byte-sized vocabulary
DATA_TOKENS = 2_000_000  # random ids to draw windows from; speed does not depend on the text
GEN_REPEATS = 3  # generation timings are short bursts: the median of 3 per path
CHUNK = 5  # training steps timed together, the device waited for once per chunk
# --matrix rows: overrides on top of the command line's.
MATRIX = {"fp32": ["train.precision=fp32", "train.compile=false"],
          "bf16": ["train.precision=bf16", "train.compile=false"],
          "bf16+compile": ["train.precision=bf16", "train.compile=true"]}


def bench_config(path, overrides) -> Config:
    cfg = load_config(path, overrides)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or DEFAULT_VOCAB)
    return cfg


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's (often vaguer) answer below
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs ahead of Python: wait before reading the clock


def measure_training(cfg: Config, device: torch.device, steps: int, warmup: int,
                     host_sync_each_step: bool = False) -> dict:
    """Time ``steps`` optimizer steps of the real train_step after ``warmup`` untimed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = build_training(cfg, device)  # the model, optimizer, scaler and compile exactly as a run builds them
    tc, block = cfg.train, cfg.model.block_size
    grad_accum = grad_accum_steps(tc)
    tokens_per_step = tc.batch_size * grad_accum * block
    ids = np.random.default_rng(tc.seed).integers(0, cfg.model.vocab_size, max(DATA_TOKENS, 4 * tokens_per_step))
    batches = TokenBatches(ids, block, tc.batch_size, tc.seed, device)
    amp = lambda: autocast(device, t.precision)  # noqa: E731 (a factory: each micro-step enters it anew)
    t.model.train()

    def run(first: int, n: int) -> tuple[list[float], dict]:
        """Per-step times over chunks of CHUNK steps, as train_loop runs them: the host queues step after step
        and waits for the device once per chunk (train_loop: once per report). With host_sync_each_step the
        loss is read after every step instead, as raygpt did before: the host then never runs ahead."""
        times, metrics = [], {}
        for chunk_start in range(first, first + n, CHUNK):
            steps = range(chunk_start, min(chunk_start + CHUNK, first + n))
            sync(device)
            start = time.perf_counter()
            for step in steps:
                lr = lr_at(step, cfg.optim, tc.max_steps)
                metrics = train_step(t.model, t.optimizer, t.scaler, batches, grad_accum, lr, cfg.optim.grad_clip,
                                     amp)
                if host_sync_each_step:
                    float(metrics["loss"])
            sync(device)
            times += [(time.perf_counter() - start) / len(steps)] * len(steps)
        return times, metrics

    sync(device)
    warmup_times, _ = run(0, warmup)  # allocator, kernel selection and, with train.compile, tracing + codegen
    times, metrics = run(warmup, steps)
    # The median step: a shared machine's bursts of other work land in a few steps and would skew the mean
    # (kept in the JSON; a mean far above the median says the figures were taken on a busy machine).
    step_s = statistics.median(times)
    peak = peak_flops(device, t.precision, tc.peak_flops)
    return {"precision": t.precision, "compile": tc.compile, "params": unwrap(t.model).num_params(),
            "batch_size": tc.batch_size, "grad_accum": grad_accum, "block_size": block,
            "tokens_per_step": tokens_per_step, "warmup_steps": warmup, "warmup_s": sum(warmup_times),
            "steps": steps, "ms_per_step": 1000 * step_s, "mean_ms_per_step": 1000 * statistics.mean(times),
            "tokens_per_s": tokens_per_step / step_s,
            # The same MFU as train_loop reports: model FLOPs per token x tokens/s over the device's peak.
            "mfu": t.flops_per_token * tokens_per_step / step_s / peak if peak else None,
            "peak_flops": peak, "final_loss": float(metrics["loss"]),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def measure_generation(cfg: Config, device: torch.device, precision: str, n_tokens: int,
                       sliding: bool = True) -> list[dict]:
    """Greedy generation from a 1-token prompt with and without the KV cache: once inside the window
    (both paths see the same context, so the ids must agree) and once over 2 x block_size (the window
    slides: the cache is refilled every block_size/4 tokens, the uncached path re-reads a full block)."""
    torch.manual_seed(cfg.train.seed)
    # The plain model even with train.compile: generation changes shapes every token, and the cache path is
    # what is measured here, not compiled decoding.
    model = GPT(cfg.model).to(device).eval()  # random weights: the cost per token does not depend on them
    block = cfg.model.block_size

    def timed(n: int, use_cache: bool) -> tuple[list[int], float]:
        sync(device)
        start = time.perf_counter()
        # generate_tokens yields int(id): a sync per token, so the clock stops after the last one.
        ids = list(generate_tokens(model, [0], n, temperature=0, use_cache=use_cache, precision=precision))
        return ids, n / (time.perf_counter() - start)

    for use_cache in (True, False):  # warm-up: first kernel launches, the allocator
        timed(min(8, block), use_cache)
    rows = []
    lengths = [("within block", min(n_tokens, block))] + ([("2 x block (sliding)", 2 * block)] if sliding else [])
    for label, n in lengths:
        # Alternate the two paths and keep the median of each: one short burst is at the mercy of whatever
        # else runs on the machine, and alternating exposes both paths to the same noise.
        ids, speeds = {}, {True: [], False: []}  # keyed by use_cache
        for _ in range(GEN_REPEATS):
            for use_cache in (True, False):
                ids[use_cache], tps = timed(n, use_cache)
                speeds[use_cache].append(tps)
        cached, plain = ids[True], ids[False]
        cached_tps, plain_tps = statistics.median(speeds[True]), statistics.median(speeds[False])
        row = {"measurement": label, "tokens": n, "cache_tokens_per_s": cached_tps,
               "no_cache_tokens_per_s": plain_tps, "speedup": cached_tps / plain_tps, "same_ids": None}
        if n <= block:
            row["same_ids"] = cached == plain
            first = next((i for i, (a, b) in enumerate(zip(cached, plain)) if a != b), None)
            # fp32 differs only by summation order, far below the gaps between logits: a mismatch is a bug.
            # bf16/fp16 rounding can flip a near tie of random weights, so there it is reported, not fatal.
            if first is not None and precision == "fp32":
                raise AssertionError(f"greedy ids with and without the KV cache differ at token {first}")
            row["first_difference"] = first
        rows.append(row)
    return rows


def measure_batched_generation(cfg: Config, device: torch.device, precision: str, n_tokens: int,
                               batch: int) -> dict:
    """``batch`` prompts of mixed lengths (1 to block/2 tokens), greedy, n_tokens each: generate_batch (one
    forward pass per token for all of them) against generate_tokens one prompt after another."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device).eval()
    n = min(n_tokens, cfg.model.block_size // 2)
    g = np.random.default_rng(cfg.train.seed)
    prompts = [g.integers(0, cfg.model.vocab_size, int(g.integers(1, cfg.model.block_size // 2 + 1))).tolist()
               for _ in range(batch)]

    def together() -> list[list[int]]:
        out = [[] for _ in prompts]
        for step in generate_batch(model, prompts, n, temperature=0, precision=precision):
            for row, t in step:
                out[row].append(t)
        return out

    def one_by_one() -> list[list[int]]:
        return [list(generate_tokens(model, p, n, temperature=0, precision=precision)) for p in prompts]

    speeds: dict = {"batched": [], "one at a time": []}
    ids: dict = {}
    for fn in (together, one_by_one):
        fn()  # warm-up
    for _ in range(GEN_REPEATS):
        for name, fn in (("batched", together), ("one at a time", one_by_one)):
            sync(device)
            start = time.perf_counter()
            ids[name] = fn()
            speeds[name].append(batch * n / (time.perf_counter() - start))
    same = sum(a == b for a, b in zip(ids["batched"], ids["one at a time"]))
    return {"prompts": batch, "tokens_each": n, "batched_tokens_per_s": statistics.median(speeds["batched"]),
            "one_at_a_time_tokens_per_s": statistics.median(speeds["one at a time"]),
            "speedup": statistics.median(speeds["batched"]) / statistics.median(speeds["one at a time"]),
            "rows_with_same_ids": same}


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def train_row(name: str, r: dict) -> list[str]:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (set train.peak_flops)"
    mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
    return [name, r["precision"], str(r["compile"]).lower(), f"{r['params'] / 1e6:.2f}M",
            f"{r['tokens_per_step']:,}", f"{r['ms_per_step']:.1f}", f"{r['mean_ms_per_step']:.1f}",
            f"{r['tokens_per_s']:,.0f}", mfu, mem, f"{r['final_loss']:.3f}", f"{r['warmup_s']:.1f}"]


def same_ids_text(g: dict) -> str:
    if g["same_ids"] is None:  # past block_size the cache keeps 3/4 of a block, the uncached path a full one
        return "- (contexts differ)"
    return "yes" if g["same_ids"] else f"no (from token {g['first_difference']})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="*", help="[CONFIG] [key=value ...] as for raygpt train")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (include compile)")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens for the within-block measurement "
                   "(capped at block_size; 0 skips generation)")
    p.add_argument("--gen-batch", type=int, default=8, help="prompts for the batched-generation measurement "
                   "(0 skips it)")
    p.add_argument("--no-sliding", action="store_true", help="skip the 2 x block_size generation row (at GPT-2 "
                   "size it takes minutes on one GPU: 2,048 tokens x 2 paths x 3 repeats, launch-bound)")
    p.add_argument("--matrix", action="store_true", help="train rows for fp32, bf16 and bf16+compile")
    p.add_argument("--host-sync", action="store_true", help="each row twice: as train_loop runs (the device "
                   "waited for at reports) and reading the loss after every step (raygpt before 2026-11-29)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.gen_tokens < 0 or args.gen_batch < 0:
        p.error("--steps must be positive, --warmup, --gen-tokens and --gen-batch not negative")
    path, overrides = split_config_args(args.config)
    try:
        cfg = bench_config(path, overrides)
        device = device_for(cfg)
        precision = resolve_precision(cfg.train.precision, device)
    except (ConfigError, ValueError) as e:  # a user mistake: one line that says what to fix
        print(f"core_speed: error: {e}", file=sys.stderr)
        return 2
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    m = cfg.model
    result = {"date": datetime.date.today().isoformat(), "config": path, "overrides": overrides,
              "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": dataclasses.asdict(m), "train": [], "notes": []}
    print(f"device {result['device']} ({device.type}, {result['threads']} threads) | torch {torch.__version__}\n"
          f"config {' '.join([path or '(defaults)', *overrides])} | {m.n_layer} layers, {m.n_head} heads, "
          f"{m.n_embd} wide, block {m.block_size}, vocab {m.vocab_size}, batch {cfg.train.batch_size}, "
          f"synthetic tokens")

    # One row for the config as given, or the matrix's rows; each is named by its precision and compile.
    single = {precision + ("+compile" if cfg.train.compile else ""): []}
    rows = []
    for name, extra in (MATRIX if args.matrix else single).items():
        # The matrix's bf16 rows are GPU figures; asked for by name (train.precision=bf16) a row always runs.
        if args.matrix and "bf16" in name and (device.type != "cuda" or not has_native_bf16(device)):
            result["notes"].append(f"{name}: skipped (bf16 rows are GPU measurements; this device is {device.type})")
            continue
        for each_step in (False, True) if args.host_sync else (False,):
            label = name + (" + host sync each step" if each_step else "")
            r = measure_training(bench_config(path, overrides + extra), device, args.steps, args.warmup, each_step)
            result["train"].append({"name": label, "host_sync_each_step": each_step, **r})
            rows.append(train_row(label, r))
            if not math.isfinite(r["final_loss"]):
                result["notes"].append(f"{label}: loss is {r['final_loss']} (precision trouble, not a speed figure)")
    print(f"\ntraining: median of {args.steps} timed steps (in chunks of {CHUNK}) after {args.warmup} warm-up steps")
    print(table(["run", "precision", "compile", "params", "tokens/step", "ms/step", "(mean)", "tokens/s", "MFU",
                 "peak mem", "loss", "warm-up s"], rows))

    if args.gen_tokens:
        gen = measure_generation(cfg, device, precision, args.gen_tokens, sliding=not args.no_sliding)
        result["generation"] = {"precision": precision, "rows": gen}
        print(f"\ngeneration: greedy, 1-token prompt, batch 1, {precision}")
        print(table(["measurement", "tokens", "cache tok/s", "no-cache tok/s", "speed-up", "same ids"],
                    [[g["measurement"], g["tokens"], f"{g['cache_tokens_per_s']:,.0f}",
                      f"{g['no_cache_tokens_per_s']:,.0f}", f"{g['speedup']:.2f}x",
                      same_ids_text(g)] for g in gen]))
    if args.gen_tokens and args.gen_batch:
        b = measure_batched_generation(cfg, device, precision, args.gen_tokens, args.gen_batch)
        result["batched_generation"] = b
        print(f"\nbatched generation: {b['prompts']} prompts of 1 to block/2 tokens, greedy, {b['tokens_each']} "
              f"tokens each, {precision}")
        print(table(["path", "tokens/s", "speed-up", "rows with the same ids"],
                    [["generate_batch", f"{b['batched_tokens_per_s']:,.0f}", f"{b['speedup']:.2f}x",
                      f"{b['rows_with_same_ids']}/{b['prompts']}"],
                     ["generate_tokens, one prompt at a time", f"{b['one_at_a_time_tokens_per_s']:,.0f}", "1.00x",
                      ""]]))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
