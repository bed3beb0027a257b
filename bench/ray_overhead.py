"""Ray overhead per step: raygpt's training loop with and without Ray, side by side in one run.

    python bench/ray_overhead.py [--steps N] [--repeats N]

Both sides are `python jobs/train.py` on the embedded corpus with the same model, data, seed and steps
(char-level, 4 layers, 4 heads, 128 wide, block 64, batch 12, fp32, one eval at the end):

- core: `--local`, raygpt's loop in this process's child, no Ray at all;
- ray:  one TorchTrainer worker on a local Ray cluster the command starts (Ray Data shards, reports).

Each pair runs twice: with 2 intra-op threads (every core of a 2-core machine) and with 1 (a core left
for Ray's own processes). The runs alternate core/ray/core/ray so the machine's drift hits both sides.
During each run it also counts, over the steady part, the CPU time that processes other than the training
process took (raylet, GCS, dashboard, Ray Train's controller actors, the driver) and how often any thread on
the machine woke up (voluntary context switches, a wake-up each): that is what the step's threads compete
with. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygpt.cluster import local_cluster_env  # noqa: E402 (no Ray import)

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.dropout=0.0",
         "train.batch_size=12", "train.precision=fp32", "train.log_interval=25", "train.checkpoint_interval=100000",
         "sample.num_samples=1", "sample.max_new_tokens=20", "sample.eval_tokens=20"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (name, user+system ticks) for every process on the machine."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def wakeups() -> int:
    """Voluntary context switches so far, summed over every thread of every process on the machine."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/task/*/status"):
        try:
            total += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status.read_text(), re.M)[1])
        except (OSError, TypeError):
            continue  # the thread ended while we looked
    return total


def run(mode: str, threads: int, steps: int, out: Path, repeat: int) -> tuple[float, float, float]:
    """One training run; returns (median ms/step after step 50, share of the cores other processes took,
    wake-ups per second on the whole machine), the last two between the first and last progress line."""
    name = f"{mode}-t{threads}-{repeat}"  # a new run each time (the same name would resume the finished one)
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), *MODEL, f"train.max_steps={steps}",
           f"train.eval_interval={steps}", f"train.out_dir={out}", f"train.run_name={name}",
           f"data.prepared_dir={out}/data"]
    cmd += ["--local", f"train.threads={threads}"] if mode == "core" else \
        ["ray.num_workers=1", "ray.local_mode=false", "ray.cpus_per_worker=2", f"ray.threads_per_worker={threads}"]
    times, marks = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out,
                          env={**os.environ, **local_cluster_env(str(out))}) as proc:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"step\s+(\d+)/\d+ .*?([\d.]+) ms/step", line)
            if m and int(m[1]) > 50:
                times.append(float(m[2]))
                if not marks or f"/{steps} " in line:  # the first and the last progress line
                    marks.append((os.times().elapsed, cpu_ticks(), wakeups()))
    if proc.returncode:
        sys.exit("".join(lines[-30:]) + f"\n{name} failed (exit {proc.returncode})")
    (t0, a, w0), (t1, b, w1) = marks[0], marks[-1]
    used = sorted(((ticks - a.get(pid, ("", 0))[1], pid) for pid, (_, ticks) in b.items()), reverse=True)
    other = sum(u for u, _ in used[1:]) / TICK / (t1 - t0) / (os.cpu_count() or 1)  # all but the busiest
    return statistics.median(times), other, (w1 - w0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (2, 1):
            for repeat in range(args.repeats):
                for mode in ("core", "ray"):
                    ms, other, wake = run(mode, threads, args.steps, Path(tmp), repeat)
                    print(f"{mode:<5} threads={threads}: {ms:.1f} ms/step, other processes {100 * other:.1f}% of "
                          f"the cores, {wake:.0f} wake-ups/s", flush=True)
                    rows.append((threads, mode, ms, other, wake))
    print(f"\nRay overhead per step: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"4L/4H/128, block 64, batch 12, fp32, {args.steps} steps, median of steps after 50")
    print(f"{'threads':>7}{'core ms/step':>14}{'ray ms/step':>13}{'ray/core':>10}{'other CPU core/ray':>20}"
          f"{'wake-ups/s core/ray':>21}")
    for threads in (2, 1):
        def median(mode: str, col: int) -> float:
            return statistics.median(r[col] for r in rows if r[0] == threads and r[1] == mode)
        core, ray = median("core", 2), median("ray", 2)
        other = f"{100 * median('core', 3):.1f}% / {100 * median('ray', 3):.1f}%"
        wake = f"{median('core', 4):.0f} / {median('ray', 4):.0f}"
        print(f"{threads:>7}{core:>14.1f}{ray:>13.1f}{ray / core:>10.3f}{other:>20}{wake:>21}")


if __name__ == "__main__":
    main()
