"""Generation at sizes people use: KV cache against recompute, and where a cached token's time goes.

    python bench/generation_sizes.py [--tokens N] [--repeats N] [--batch N ...] [--shape NAME ...]
                                     [--recompute-steps N] [--no-profile] [--quick] [--out FILE]

    python bench/generation_sizes.py                  # about 10 minutes on 2 CPU cores
    python bench/generation_sizes.py --quick          # a minute or two: 100 tokens, 1 repeat
    python bench/generation_sizes.py --shape gpt2_124m --batch 1 --recompute-steps 50

Two random-init models (speed does not depend on the weights): configs/shakespeare_char.yaml's (6 layers,
6 heads, 384 wide, block 256, no bias; vocab 65, Tiny Shakespeare's characters) and configs/gpt2_124m.yaml's
(12 layers, 12 heads, 768 wide, block 1024; vocab 50257, GPT-2's tokenizer, where the config pads to 50304
for training). Each row decodes through raygpt.generate.generate_batch (the path of raygpt.load().generate and
the server) from 8-token random prompts, sampling as a user would (temperature 0.8, top_k 200, one seeded
generator per row), with use_cache True and False, alternating, the median of --repeats runs.

Recompute (use_cache False) costs one forward pass over the whole context per token, so a run of 500 tokens
at GPT-2 size takes many minutes on a CPU. Where --recompute-steps is below the run's tokens, recompute is
timed over that many steps in 5 segments spread evenly over the run, each from a prompt as long as the run's
context at that point (random ids; the cost does not depend on them): the mean time per step over the
segments estimates the whole run's (the midpoint rule over a cost that grows with the context), so its
tokens/s compares with the cache's over the full run. The output says which rows were estimated.

The profile (torch.profiler, CPU) is of one cached run of the same tokens: self CPU time per op, so a parent
(aten::linear) never counts its child (aten::addmm) again. "matmul" is the self time of aten::mm, addmm,
bmm, baddbmm, mv, addmv, matmul, linear and every aten::*scaled_dot_product* op (the fused attention
kernel included); "other ops" every other ATen op (LayerNorm, GELU, adds, copies, the sampling ops);
"outside ops" the rest of the wall time (Python, and under the profiler its own bookkeeping). The share
outside matmuls is 1 - matmul / the unprofiled time per step (the timed runs' median: the profiler slows
the small ops, not the matmuls). Imports only the raygpt core (no Ray). Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from core_speed import device_name, sync, table  # noqa: E402  (bench/ is on sys.path when run as a script)
from raygpt.config import load_config  # noqa: E402
from raygpt.generate import generate_batch  # noqa: E402
from raygpt.model import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"shakespeare_char": ("configs/shakespeare_char.yaml", 65),  # name -> (config, vocabulary)
          "gpt2_124m": ("configs/gpt2_124m.yaml", 50257)}
# Recompute steps timed per (shape, batch) when --recompute-steps is not given: the whole run where it takes
# seconds, a sample where it would take many minutes (GPT-2 size on 2 cores: about 0.25 s a step at batch 1,
# 1.6 s at batch 8).
RECOMPUTE_STEPS = {("shakespeare_char", 1): 500, ("shakespeare_char", 8): 50, ("gpt2_124m", 1): 25,
                   ("gpt2_124m", 8): 5}
SEGMENTS = 5
PROMPT_TOKENS = 8
SAMPLING = dict(temperature=0.8, top_k=200)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::matmul",
              "aten::linear"}


def is_matmul(name: str) -> bool:
    return name in MATMUL_OPS or name.startswith("aten::") and "scaled_dot_product" in name


def build(name: str, device: torch.device) -> GPT:
    path, vocab = SHAPES[name]
    shape = dataclasses.replace(load_config(ROOT / path, []).model, vocab_size=vocab, dropout=0.0)
    torch.manual_seed(0)
    return GPT(shape).to(device).eval()


def decode(model: GPT, prompts: list[list[int]], n: int, use_cache: bool, device: torch.device) -> float:
    """Seconds for ``n`` steps of generate_batch over ``prompts``, each row with its own seeded generator."""
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(len(prompts))]
    sync(device)
    start = time.perf_counter()
    for _ in generate_batch(model, prompts, n, generators=gens, use_cache=use_cache, **SAMPLING):
        pass
    sync(device)
    return time.perf_counter() - start


def recompute_step_s(model: GPT, prompts: list[list[int]], n: int, steps: int, device: torch.device,
                     filler: torch.Generator) -> float:
    """Seconds per step without the cache over an ``n``-token run: the run itself when steps >= n, else
    SEGMENTS segments of steps // SEGMENTS tokens, each from the context the run has at its midpoint."""
    if steps >= n:
        return decode(model, prompts, n, False, device) / n
    segments = min(SEGMENTS, steps)
    each = steps // segments
    total = 0.0
    for j in range(segments):
        made = max(0, round((j + 0.5) * n / segments - each / 2))  # tokens the run has made at the segment
        extra = torch.randint(0, model.config.vocab_size, (made,), generator=filler).tolist()
        total += decode(model, [p + extra for p in prompts], each, False, device)
    return total / (segments * each)


def measure(model: GPT, batch: int, n: int, steps: int, repeats: int, device: torch.device) -> dict:
    """Tokens/s with and without the cache, the two alternating, the median of ``repeats`` each."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
               for _ in range(batch)]
    decode(model, prompts, 4, True, device)  # warm-up: the allocator, first kernel choices
    decode(model, prompts, 2, False, device)
    cached, plain = [], []
    for _ in range(repeats):
        cached.append(decode(model, prompts, n, True, device) / n)
        plain.append(recompute_step_s(model, prompts, n, steps, device, g))
    c, p = statistics.median(cached), statistics.median(plain)
    return {"batch": batch, "tokens": n, "recompute_steps": min(steps, n), "cache_ms_per_step": 1000 * c,
            "recompute_ms_per_step": 1000 * p, "cache_tokens_per_s": batch / c, "recompute_tokens_per_s": batch / p,
            "speedup": p / c, "cache_runs_ms_per_step": [1000 * t for t in cached]}


def profile_cached(model: GPT, batch: int, n: int, wall_ms: float, device: torch.device) -> dict:
    """One cached run of ``n`` tokens under torch.profiler: ms per step by kind. ``wall_ms``: the unprofiled
    ms per step (measure's median), against which the share outside matmuls is taken."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
               for _ in range(batch)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled_s = decode(model, prompts, n, True, device)
    ops = {e.key: e.self_cpu_time_total / 1000 / n for e in prof.key_averages()}  # ms per step, self time
    matmul = {k: v for k, v in ops.items() if is_matmul(k)}
    other = {k: v for k, v in ops.items() if not is_matmul(k)}
    m, o = sum(matmul.values()), sum(other.values())
    wall, profiled = wall_ms, 1000 * profiled_s / n
    return {"batch": batch, "tokens": n, "ms_per_step": wall, "profiled_ms_per_step": profiled,
            "matmul_ms": m, "other_ops_ms": o, "outside_ops_ms": profiled - m - o,
            "outside_matmul_share": 1 - m / wall,
            "matmul_ops": dict(sorted(matmul.items(), key=lambda kv: -kv[1])),
            "top_other_ops": dict(sorted(other.items(), key=lambda kv: -kv[1])[:8])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=500, help="new tokens per row per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows decoded together")
    p.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--recompute-steps", type=int, help="recompute steps timed per run, in 5 segments when below "
                   "--tokens (default: the whole run at shakespeare_char batch 1; 50, 25 and 5 steps elsewhere)")
    p.add_argument("--no-profile", action="store_true", help="skip the profile")
    p.add_argument("--quick", action="store_true", help="100 tokens, 1 repeat, recompute over 10 steps at most")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 100, 1
    if args.tokens < 1 or args.repeats < 1 or min(args.batch) < 1 or (args.recompute_steps or 1) < 1:
        p.error("--tokens, --repeats, --batch and --recompute-steps must be positive")
    device = torch.device(args.device)
    date = datetime.date.today().isoformat()
    print(f"device {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) | torch "
          f"{torch.__version__} | Python {platform.python_version()} | {date} | load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"generate_batch, {PROMPT_TOKENS}-token prompts, {args.tokens} new tokens a row, temperature "
          f"{SAMPLING['temperature']}, top_k {SAMPLING['top_k']}, a seeded generator per row, fp32")
    result = {"date": date, "device": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "tokens": args.tokens, "repeats": args.repeats, "shapes": []}
    speed_rows, profile_rows, op_lines = [], [], []
    for name in args.shape:
        model = build(name, device)
        c = model.config
        print(f"\n{name}: {model.num_params() / 1e6:.1f}M params, {c.n_layer} layers, {c.n_head} heads, "
              f"{c.n_embd} wide, block {c.block_size}, vocab {c.vocab_size}, bias {str(c.bias).lower()}")
        shape = {"name": name, "model": dataclasses.asdict(c), "params": model.num_params(), "speed": [],
                 "profile": []}
        for b in args.batch:
            steps = args.recompute_steps or RECOMPUTE_STEPS.get((name, b), 25)
            if args.quick:
                steps = min(steps, 10)
            r = measure(model, b, args.tokens, steps, args.repeats, device)
            shape["speed"].append(r)
            how = "whole run" if r["recompute_steps"] >= args.tokens else f"{r['recompute_steps']} steps sampled"
            speed_rows.append([name, b, args.tokens, f"{r['cache_tokens_per_s']:,.1f}",
                               f"{r['recompute_tokens_per_s']:,.1f}", how, f"{r['speedup']:.1f}x",
                               f"{r['cache_ms_per_step']:.2f}"])
            print(f"  batch {b}: cache {r['cache_tokens_per_s']:,.1f} tok/s, recompute "
                  f"{r['recompute_tokens_per_s']:,.1f} tok/s ({how}), {r['speedup']:.1f}x")
            if args.no_profile:
                continue
            pr = profile_cached(model, b, args.tokens, r["cache_ms_per_step"], device)
            shape["profile"].append(pr)
            profile_rows.append([name, b, f"{pr['ms_per_step']:.2f}", f"{pr['ms_per_step'] / b:.2f}",
                                 f"{pr['matmul_ms']:.2f}", f"{pr['other_ops_ms']:.2f}", f"{pr['outside_ops_ms']:.2f}",
                                 f"{pr['profiled_ms_per_step']:.2f}", f"{100 * pr['outside_matmul_share']:.0f}%"])
            op_lines.append(f"{name} batch {b}: matmul " + ", ".join(
                f"{k.removeprefix('aten::')} {v:.2f}" for k, v in pr["matmul_ops"].items() if v >= 0.005)
                + " | other " + ", ".join(f"{k.removeprefix('aten::')} {v:.2f}"
                                          for k, v in pr["top_other_ops"].items()))
        result["shapes"].append(shape)

    print(f"\ntokens/s, median of {args.repeats} alternating runs (recompute 'sampled': {SEGMENTS} segments spread "
          "over the run, see the docstring)")
    print(table(["shape", "batch", "tokens", "cache tok/s", "recompute tok/s", "recompute measured", "speed-up",
                 "cache ms/step"], speed_rows))
    if profile_rows:
        print("\nprofile of one cached run (ms per step, a step makes one token per row; self CPU time)")
        print(table(["shape", "batch", "ms/step", "ms/token", "matmul", "other ops", "outside ops",
                     "profiled ms/step", "outside matmuls"], profile_rows))
        print("\nms per step by op (self CPU):")
        for line in op_lines:
            print(f"  {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
