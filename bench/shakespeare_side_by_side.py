"""Tiny Shakespeare, side by side: a plain single-process PyTorch loop against raygpt under Ray.

    python bench/shakespeare_side_by_side.py [PATH]    # default ../shared/data/tinyshakespeare.txt

The brief's reference run: char-level, 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps, fp32,
lr 1e-3 warming up 100 steps then cosine to 1e-4, AdamW (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout
(nanoGPT's shakespeare_char settings shrunk for a CPU). The last 10% of the text is val, for both.

1. plain: nanoGPT's loop written out here with torch alone (random windows from one tensor, AdamW), on
   raygpt's model class so both sides train the same network; no Ray, in this process.
2. raygpt: `python jobs/train.py configs/shakespeare_char.yaml ...` with one TorchTrainer worker
   (ray.local_mode=false: a local Ray cluster, prepare in Ray tasks, shards streamed through Ray Data to the
   worker), in a subprocess;
3. the same in local mode (what `jobs/train.py` does by default for one worker on a cluster it starts): the
   train function in the driver, reading its stream in-process (the same local cluster and prepare; no
   worker group).

Both final models are then scored on the same thing: every non-overlapping block of the val text. Step
times are medians of steady-state steps (evals excluded). Skips cleanly (exit 0) when the text is absent.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import raygpt  # noqa: E402
from raygpt.cluster import local_cluster_env  # noqa: E402
from raygpt.config import ModelConfig  # noqa: E402
from raygpt.model import GPT  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, STEPS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, BETAS, WEIGHT_DECAY, CLIP, SEED = 1e-3, 1e-4, 100, (0.9, 0.99), 0.1, 1.0, 1337


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def plain(text: str, steps: int = STEPS) -> tuple[GPT, dict, float]:
    """nanoGPT's loop: returns the model, its char -> id table, and the median ms per step."""
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text[:int(len(text) * 0.9)]], dtype=torch.long)
    model = GPT(ModelConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK, vocab_size=len(stoi),
                            dropout=0.0, bias=False))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([data[i:i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + BLOCK] for i in ix])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT syncs once per step for its log line too
        times.append(time.perf_counter() - t0)
        if step % 500 == 0:
            print(f"plain: step {step} loss {loss.item():.4f}", flush=True)
    return model, stoi, 1000 * statistics.median(times[50:])


def raygpt_run(path: Path, out: Path, workers: int = 1) -> tuple[raygpt.generate.TextGenerator, float, float, str]:
    """jobs/train.py under Ray (``workers``: ray.num_workers; 0 is Ray Train's local mode, the train function in
    the driver); returns the loaded model, median ms/step, its last val loss and data-wait range."""
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), str(ROOT / "configs/shakespeare_char.yaml"),
           f"data.source={path}", f"data.prepared_dir={out}/data", f"train.out_dir={out}", f"train.run_name=ray{workers}",
           f"model.n_layer={N_LAYER}", f"model.n_head={N_HEAD}", f"model.n_embd={N_EMBD}", f"model.block_size={BLOCK}",
           "model.dropout=0.0", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}", "train.eval_interval=500",
           "train.eval_steps=20", "train.log_interval=50", "train.checkpoint_interval=2000", "train.precision=fp32",
           f"train.seed={SEED}", f"ray.num_workers={workers}", f"ray.local_mode={'false' if workers else 'true'}",
           "sample.num_samples=1", "sample.max_new_tokens=100"]
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out,
                          env={**os.environ, **local_cluster_env(str(out))}) as proc:
        for line in proc.stdout:
            if "ms/step" in line or line.startswith(("train", "prepare", "run ")):
                print("raygpt:", line.rstrip()[:160], flush=True)
            lines.append(line)
    if proc.returncode:
        sys.exit("".join(lines[-40:]) + f"\nraygpt run failed (exit {proc.returncode})")
    steps = [(int(m[1]), float(m[2]), float(m[3])) for m in
             (re.search(r"step\s+(\d+)/\d+ .*?([\d.]+) ms/step \| data (\d+)%", s) for s in lines) if m]
    steady = [ms for step, ms, _ in steps if step > 50]
    vals = [float(m[1]) for m in (re.search(r"\| val ([\d.]+)", s) for s in lines) if m]
    waits = [w for step, _, w in steps if step > 50]
    return raygpt.load(out / f"ray{workers}"), statistics.median(steady), vals[-1], f"{min(waits):.0f}-{max(waits):.0f}%"


@torch.no_grad()
def score(model: GPT, ids: list[int]) -> float:
    """Mean loss over every non-overlapping block of ``ids`` (the same windows for every model)."""
    model.eval()
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(data) - BLOCK - 1, BLOCK))
    losses = []
    for i in range(0, len(starts) - 63, 64):
        ix = starts[i:i + 64]
        x = torch.stack([data[j:j + BLOCK] for j in ix])
        y = torch.stack([data[j + 1:j + 1 + BLOCK] for j in ix])
        losses.append(model(x, y)[1].item())
    return statistics.mean(losses)


def main(argv: list[str]) -> None:
    path = Path(argv[0] if argv else ROOT.parent / "shared/data/tinyshakespeare.txt").resolve()
    if not path.is_file():
        print(f"skipped: {path} does not exist (give the Tiny Shakespeare text as the first argument)")
        return
    text = path.read_text(encoding="utf-8")
    val_text = text[int(len(text) * 0.9):]
    t0 = time.perf_counter()
    model, stoi, plain_ms = plain(text)
    plain_wall = time.perf_counter() - t0
    plain_val = score(model, [stoi[c] for c in val_text])
    runs = {}
    for workers in (1, 0):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            gen, ms, reported, waits = raygpt_run(path, Path(tmp), workers)
            wall = time.perf_counter() - t0
            runs[workers] = (ms, score(gen.model.float().cpu(), gen.tokenizer.encode(val_text)), wall, reported, waits)
    # The machine's speed drifts over minutes (other tenants): time the plain loop again after the Ray run
    # and compare against both.
    plain_after = plain(text, STEPS // 2)[2]
    print(f"\nTiny Shakespeare side by side: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {N_LAYER}L/{N_HEAD}H/{N_EMBD}, block {BLOCK}, batch {BATCH}, {STEPS} steps, fp32")
    print(f"{'run':<30}{'ms/step':>9}{'val loss (all val blocks)':>27}{'wall s':>8}")
    print(f"{'plain PyTorch loop':<30}{plain_ms:>9.1f}{plain_val:>27.4f}{plain_wall:>8.0f}")
    for workers, name in ((1, "raygpt, Ray, 1 worker"), (0, "raygpt, Ray, local mode")):
        ms, val, wall, _, _ = runs[workers]
        print(f"{name:<30}{ms:>9.1f}{val:>27.4f}{wall:>8.0f}")
    print(f"{'plain PyTorch loop, again':<30}{plain_after:>9.1f}{'(timing only)':>27}")
    for workers, name in ((1, "1 worker"), (0, "local mode")):
        ms, _, wall, reported, waits = runs[workers]
        print(f"raygpt {name} / plain: step time {ms / plain_ms:.3f} (before), {ms / plain_after:.3f} (after), wall "
              f"{wall / plain_wall:.2f}; its own last val loss (20 batches) {reported:.4f}; data wait per log window {waits}")


if __name__ == "__main__":
    main(sys.argv[1:])
