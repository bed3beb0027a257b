"""Quantized inference side by side: fp32 against int8 (torch.ao and torchao) and bf16, speed and quality.

    python bench/quantize.py [--text FILE | --checkpoint CKPT] [--steps N] [--gen-tokens N] [--batch N]
                             [--windows N] [--repeats N] [--shape CONFIG ...] [--device cpu|cuda] [--out FILE]

    python bench/quantize.py                                         # about 2-3 minutes on 2 CPU cores
    python bench/quantize.py --text ../shared/data/tinyshakespeare.txt
    python bench/quantize.py --checkpoint runs/demo --shape configs/shakespeare_char.yaml --shape configs/gpt2_124m.yaml

Quality needs a trained model (random weights make agreement with fp32 meaningless): --checkpoint takes a raygpt
checkpoint (val text: --text's last 10%, else its own data.source's val split), otherwise a small char-level
model (the default config's) is trained here first with raygpt.local.train_local for --steps steps, on --text or
on the embedded default corpus (python-stdlib, no download). The val text is cut into non-overlapping
teacher-forced windows of block_size; each variant's logits are compared with fp32's at every position: max and
mean absolute difference, top-1 agreement (the share of positions whose argmax equals fp32's) and val loss.

Speed: greedy generation with the KV cache through raygpt.generate.generate_batch (the serving path), batch 1
and --batch (prompts of 8 to 36 tokens; past block_size the window slides as when serving), the median of
--repeats runs, the variants alternating so that they share the machine's noise.
"greedy = fp32": whether batch 1's greedy ids equal fp32's (else the first token that differs). --shape adds
speed rows for random-init models of a config's shape (vocab 65 when the config leaves it to the tokenizer).
Every variant is generated without autocast (precision "fp32"): its weights' dtype decides. Prints figures;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core_speed import device_name, sync, table  # noqa: E402  (bench/ is on sys.path when run as a script)
from raygpt.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from raygpt.config import load_config  # noqa: E402
from raygpt.data.corpus import prepare_arrays  # noqa: E402
from raygpt.generate import generate_batch  # noqa: E402
from raygpt.local import train_local  # noqa: E402
from raygpt.model import GPT  # noqa: E402
from raygpt.quantize import int8_dynamic, int8_torchao, quantize  # noqa: E402

MAX_CHARS = 2_000_000  # of the corpus read for training and val: enough for both, quick to tokenize
CHAR_VOCAB = 65  # --shape configs that leave the vocabulary to the tokenizer (Tiny Shakespeare's chars)


def variants(device: torch.device) -> dict[str, Callable]:
    """name -> function that turns an fp32 model into that variant (in place)."""
    if device.type == "cuda":
        return {"fp32": lambda m: m, "bf16": lambda m: quantize(m, "bf16", device),
                "fp16": lambda m: quantize(m, "fp16", device)}
    rows = {"fp32": lambda m: m, "int8 (torch.ao)": lambda m: quantize(m, "int8", device),
            "int8 (torch.ao), head fp32": lambda m: int8_dynamic(m, head=False)}
    if importlib.util.find_spec("torchao"):
        rows["int8 (torchao)"] = int8_torchao
    else:
        print("note: torchao is not installed: no torchao row (pip install torchao)")
    rows["bf16"] = lambda m: quantize(m, "bf16", device)
    return rows


def build(model: GPT, device: torch.device) -> dict[str, GPT]:
    """Every variant of ``model``, each its own copy."""
    return {name: make(copy.deepcopy(model)).eval() for name, make in variants(device).items()}


def trained_model(args, device: torch.device, workdir: str) -> tuple[GPT, list[int], str]:
    """(fp32 model, val ids, what it is): from --checkpoint, or trained here."""
    text = [f"data.source={args.text}", "data.split=tail", "data.val_fraction=0.1"] if args.text else []
    if args.checkpoint:
        path = resolve_checkpoint(Path(args.checkpoint))
        model, cfg, tokenizer, _ = load_checkpoint(path, device=device)
        data = load_config(None, text).data if args.text else cfg.data
        _, _, val = prepare_arrays(dataclasses.replace(data, max_chars=MAX_CHARS), tokenizer)
        return model, val.tolist(), f"checkpoint {path}"
    # The default config's model (0.8M parameters), one eval and one checkpoint at the end, no eval samples.
    cfg = load_config(None, [*text, f"data.max_chars={MAX_CHARS}", f"train.max_steps={args.steps}",
                             f"optim.warmup_steps={min(100, args.steps // 5)}", f"train.device={device}",
                             f"train.out_dir={workdir}", "train.run_name=quantize-bench",
                             f"train.log_interval={max(1, args.steps // 4)}", f"train.eval_interval={args.steps}",
                             f"train.checkpoint_interval={args.steps}", "sample.eval_tokens=0"])
    arrays = prepare_arrays(cfg.data, None, print)
    start = time.perf_counter()
    result = train_local(cfg, arrays, print_fn=lambda line: print(f"train: {line}"))
    model, _, tokenizer, _ = load_checkpoint(result.checkpoint, device=device)
    return model, arrays[2].tolist(), (f"trained here: {args.steps} steps on {cfg.data.source} in "
                                       f"{time.perf_counter() - start:.0f} s, {tokenizer!r}")


@torch.no_grad()
def quality(models: dict[str, GPT], val: list[int], windows: int, device: torch.device) -> dict[str, dict]:
    """Teacher-forced logits over ``windows`` non-overlapping block_size windows of ``val``, every variant
    against fp32, a few windows at a time (GPT-2's 50k-wide logits of all windows would not fit)."""
    block = models["fp32"].config.block_size
    n = min(windows, (len(val) - 1) // block)
    if n < 1:
        raise SystemExit(f"quantize: the val text has {len(val)} tokens, less than one block of {block}")
    ids = torch.tensor(val[:n * block + 1], device=device)
    sums = {name: {"max": 0.0, "abs": 0.0, "agree": 0, "loss": 0.0} for name in models}
    scale = 0.0
    for first in range(0, n, 8):
        rows = range(first, min(first + 8, n))
        x = torch.stack([ids[i * block:(i + 1) * block] for i in rows])
        y = torch.stack([ids[i * block + 1:(i + 1) * block + 1] for i in rows])
        ref = models["fp32"](x, y)[0].float()
        scale += ref.std().item() * len(rows)
        for name, model in models.items():
            logits = model(x, y)[0].float()
            s = sums[name]
            s["max"] = max(s["max"], (logits - ref).abs().max().item())
            s["abs"] += (logits - ref).abs().sum().item()
            s["agree"] += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            s["loss"] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    positions = n * block
    out = {name: {"max_abs_drift": s["max"], "mean_abs_drift": s["abs"] / (positions * ref.size(-1)),
                  "top1_agreement": s["agree"] / positions, "val_loss": s["loss"] / positions}
           for name, s in sums.items()}
    out["_windows"] = {"windows": n, "positions": positions, "fp32_logit_std": scale / n}
    return out


def speed(models: dict[str, GPT], prompts: dict[int, list[list[int]]], n_tokens: int, repeats: int,
          device: torch.device) -> dict[str, dict]:
    """Greedy tokens/s with the KV cache, per variant and batch size; batch 1's ids for the fp32 comparison."""
    def run(model, batch_prompts) -> tuple[float, list[list[int]]]:
        out = [[] for _ in batch_prompts]
        sync(device)
        start = time.perf_counter()
        for step in generate_batch(model, batch_prompts, n_tokens, temperature=0, precision="fp32"):
            for row, token in step:
                out[row].append(token)
        sync(device)
        return len(batch_prompts) * n_tokens / (time.perf_counter() - start), out

    for model in models.values():  # warm-up: allocator, kernel selection, int8 weight packing caches
        for batch_prompts in prompts.values():
            list(generate_batch(model, batch_prompts, 4, temperature=0, precision="fp32"))
    speeds = {name: {b: [] for b in prompts} for name in models}
    ids = {}
    for _ in range(repeats):
        for b, batch_prompts in prompts.items():
            for name, model in models.items():  # alternating: every variant sees the same noise
                tps, out = run(model, batch_prompts)
                speeds[name][b].append(tps)
                if b == 1:
                    ids[name] = out[0]
    result = {}
    for name in models:
        first = next((i for i, (a, r) in enumerate(zip(ids[name], ids["fp32"])) if a != r), None)
        result[name] = {"tokens_per_s": {b: statistics.median(v) for b, v in speeds[name].items()},
                        "greedy_first_difference": first}
    return result


def shape_speed(config_path: str, args, device: torch.device) -> dict:
    """Speed rows for a random-init model of ``config_path``'s shape (no training: speed does not depend on
    the weights)."""
    cfg = load_config(config_path, [])
    shape = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or CHAR_VOCAB, dropout=0.0)
    torch.manual_seed(0)
    models = build(GPT(shape).to(device), device)
    g = torch.Generator().manual_seed(0)
    prompts = {b: [torch.randint(0, shape.vocab_size, (8 + 4 * i,), generator=g).tolist() for i in range(b)]
               for b in (1, args.batch)}
    n = args.gen_tokens
    return {"config": config_path, "model": dataclasses.asdict(shape), "gen_tokens": n,
            "params": models["fp32"].num_params(), "rows": speed(models, prompts, n, args.repeats, device)}


def speed_cells(r: dict, batch: int) -> list[str]:
    return [f"{r['tokens_per_s'][1]:,.1f}", f"{r['tokens_per_s'][batch]:,.1f}"]


def greedy_text(r: dict) -> str:
    first = r["greedy_first_difference"]
    return "yes" if first is None else f"from token {first}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a raygpt checkpoint or run folder to measure (no training)")
    p.add_argument("--text", help="a text file: trained on (without --checkpoint) and its last 10%% the val text")
    p.add_argument("--steps", type=int, default=600, help="training steps of the model trained here")
    p.add_argument("--gen-tokens", type=int, default=200, help="new tokens per generation (capped by the block)")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together in the batched speed column")
    p.add_argument("--windows", type=int, default=32, help="val windows of block_size for the quality figures")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and batch size (median)")
    p.add_argument("--shape", action="append", default=[], help="also time random-init models of this config's "
                   "shape (repeatable), e.g. configs/gpt2_124m.yaml")
    p.add_argument("--device", default="cpu", help="cpu (int8 and bf16 rows) or cuda (bf16 and fp16 rows)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.gen_tokens < 1 or args.batch < 2 or args.windows < 1 or args.repeats < 1:
        p.error("--steps, --gen-tokens, --windows and --repeats must be positive, --batch at least 2")
    device = torch.device(args.device)
    try:
        import torchao
        ao_version = torchao.__version__
    except ImportError:
        ao_version = "not installed"
    print(f"device {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) | torch "
          f"{torch.__version__} | torchao {ao_version} | {datetime.date.today().isoformat()}")
    result = {"date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
              "torchao": ao_version, "threads": torch.get_num_threads(), "shapes": []}

    with tempfile.TemporaryDirectory(prefix="raygpt-quantize-") as workdir:
        try:
            model, val, what = trained_model(args, device, workdir)
        except ValueError as e:  # a bad --checkpoint or --text (CheckpointError, ConfigError, PrepareError)
            print(f"quantize: error: {e}", file=sys.stderr)
            return 2
    model.eval()
    models = build(model, device)
    c = model.config
    g = val[:args.batch * 48]
    prompts = {1: [g[:16]], args.batch: [g[48 * i:48 * i + 8 + 4 * i] for i in range(args.batch)]}
    n = args.gen_tokens  # past block_size the window slides (the cache is refilled), as when serving
    q = quality(models, val, args.windows, device)
    s = speed(models, prompts, n, args.repeats, device)
    w = q.pop("_windows")
    result.update(model=dataclasses.asdict(c), source=what, params=model.num_params(), gen_tokens=n, windows=w,
                  rows={name: {**q[name], **s[name]} for name in models})
    print(f"\nmodel: {what}\n{model.num_params() / 1e6:.2f}M params, {c.n_layer} layers, {c.n_embd} wide, "
          f"{c.n_head} heads, block {c.block_size}, vocab {c.vocab_size}")
    print(f"quality over {w['windows']} val windows x {c.block_size} = {w['positions']:,} positions "
          f"(fp32 logits' std {w['fp32_logit_std']:.2f}); speed: greedy, KV cache, {n} new tokens, "
          f"median of {args.repeats}")
    print(table(["variant", "tok/s b1", f"tok/s b{args.batch}", "greedy = fp32", "max |dlogit|", "mean |dlogit|",
                 "top-1 agree", "val loss"],
                [[name, *speed_cells(r, args.batch), greedy_text(r), f"{r['max_abs_drift']:.4f}",
                  f"{r['mean_abs_drift']:.5f}", f"{100 * r['top1_agreement']:.2f}%", f"{r['val_loss']:.4f}"]
                 for name, r in result["rows"].items()]))

    for path in args.shape:
        sh = shape_speed(path, args, device)
        result["shapes"].append(sh)
        m = sh["model"]
        print(f"\nspeed, random init, {path}'s shape: {sh['params'] / 1e6:.1f}M params, {m['n_layer']} layers, "
              f"{m['n_embd']} wide, vocab {m['vocab_size']}; greedy, KV cache, {sh['gen_tokens']} new tokens, "
              f"median of {args.repeats}")
        fp32 = sh["rows"]["fp32"]["tokens_per_s"]
        print(table(["variant", "tok/s b1", f"tok/s b{args.batch}", "b1 vs fp32", f"b{args.batch} vs fp32"],
                    [[name, *speed_cells(r, args.batch),
                      *(f"{r['tokens_per_s'][b] / fp32[b]:.2f}x" for b in (1, args.batch))]
                     for name, r in sh["rows"].items()]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
