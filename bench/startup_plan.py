"""Start-up at any run length: time to the first step and the driver's peak memory for train.max_steps 1,000
and 1,000,000, at GPT-2 124M's tokens per step (block 1024, 480 sequences a step: 491,520 tokens).

    python bench/startup_plan.py [--steps 1000 1000000] [--workers 1]

Each run is `jobs/train.py` on a local Ray cluster of its own (the real command: prepare, checks, the data
plan, TorchTrainer, the workers' first batches), with a tiny model so the step itself is short. The script
reads the "start-up:" line rank 0 prints at step 1, takes the driver's peak resident memory (VmHWM) at that
moment, and stops the run with Ctrl-C (SIGINT), which raygpt answers by aborting it cleanly. The run's data
plan is the only thing that grows with max_steps; before 2026-11-29 the driver listed every (epoch, unit)
pair of the run up front. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygpt.cluster import end_session, local_cluster_env  # noqa: E402 (no Ray import)

MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=1024",
         "train.batch_size=12", "train.global_batch_size=480", "optim.warmup_steps=10", "train.log_interval=1",
         "train.compile=false", "train.precision=fp32"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def run(max_steps: int, workers: int, work: Path) -> dict:
    name = f"plan-{max_steps}"
    args = [sys.executable, str(ROOT / "jobs/train.py"), *MODEL, f"train.max_steps={max_steps}",
            f"train.eval_interval={max_steps}", f"train.checkpoint_interval={max_steps}",
            f"ray.num_workers={workers}", "ray.local_mode=false", f"train.run_name={name}", f"train.out_dir={work / 'runs'}",
            f"data.prepared_dir={work / 'data'}"]
    env = {**os.environ, **local_cluster_env(str(work / "ray")), "PYTHONUNBUFFERED": "1"}
    (work / "ray").mkdir(exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    out, figures = [], {}
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("train:") and "train tokens" in line:
                figures["coverage"] = line.strip()
            m = re.search(r"\(to the first step: ([\d.]+) s\)", line)
            if m:
                figures.update(first_step_s=float(m.group(1)), wall_to_step_s=time.monotonic() - start,
                               driver_peak_mb=peak_rss_mb(proc.pid), startup=line.strip())
                proc.send_signal(signal.SIGINT)  # Ctrl-C: raygpt aborts the run and exits 130
                break
        figures["exit"] = proc.wait(timeout=300)
    finally:
        end_session(proc.pid, timeout=10, reap=proc)  # whatever the run left of its local cluster
    if "first_step_s" not in figures:
        sys.exit(f"startup_plan: the run with max_steps={max_steps} ended before its first step:\n" + "".join(out[-30:]))
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 1000000], help="train.max_steps values")
    p.add_argument("--workers", type=int, default=1, help="ray.num_workers")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rg-plan-", dir="/tmp") as tmp:
        work = Path(tmp)
        run(a.steps[0], a.workers, work)  # once untimed: prepares the shards, warms the file cache
        rows = [(steps, run(steps, a.workers, work)) for steps in a.steps]
    print(f"\nstart-up at GPT-2 124M's tokens per step (491,520), {a.workers} worker(s), tiny model, char-level "
          f"default corpus")
    print(f"{'max_steps':>12}  {'to first step (s)':>17}  {'wall to step 1 (s)':>18}  {'driver peak RSS (MB)':>20}  exit")
    for steps, f in rows:
        print(f"{steps:>12,}  {f['first_step_s']:>17.1f}  {f['wall_to_step_s']:>18.1f}  {f['driver_peak_mb']:>20.0f}  "
              f"{f['exit']}")
    for steps, f in rows:
        print(f"  {steps:,}: {f['startup']}")
    print(f"  {rows[0][1]['coverage']}")
    b, last = rows[0][1], rows[-1][1]
    print(f"ratio of the last to the first: time {last['first_step_s'] / b['first_step_s']:.2f}x, "
          f"driver memory {last['driver_peak_mb'] - b['driver_peak_mb']:+.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
