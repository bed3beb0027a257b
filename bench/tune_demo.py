"""The tuning demo's figures: `python jobs/tune.py --samples 32` on this machine, then the default config.

    python bench/tune_demo.py [--samples 32] [TUNE_CONFIG]

1. Runs the experiment exactly as a user would (a subprocess, its own local Ray cluster) and times it.
2. Trains the tune config's base training config, untuned (the values the search replaced: optim.lr,
   warmup, model size), for the same train.max_steps, and reads its last val loss, measured the same way
   (train.eval_steps val batches).
Prints: wall time, steps run against steps possible (what ASHA saved), best val loss against the default's.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygpt.cluster import local_cluster_env  # noqa: E402 (no Ray import)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs/tune/default.yaml"))
    ap.add_argument("--samples", type=int, default=32)
    a = ap.parse_args()
    from raygpt.tune_space import load_tune_config

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common = [f"train.out_dir={out}/runs", f"data.prepared_dir={out}/prepared"]
        env = {**os.environ, **local_cluster_env(tmp)}
        t0 = time.perf_counter()
        tune = subprocess.run([sys.executable, str(ROOT / "jobs/tune.py"), a.config, "--samples", str(a.samples),
                               "tune.experiment=demo", *common], cwd=out, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print("\n".join(line for line in tune.stdout.splitlines() if line.startswith(("tune:", "prepare:"))))
        if tune.returncode:
            sys.exit(tune.stdout[-3000:] + tune.stderr[-3000:])
        with open(out / "runs/tune/demo/trials.csv") as f:
            rows = list(csv.DictReader(f))
        base, _ = load_tune_config(a.config, common)
        base.save(out / "default.yaml")
        t1 = time.perf_counter()
        default = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), str(out / "default.yaml"),
                                  "train.run_name=default"], cwd=out, env=env, capture_output=True, text=True)
        default_wall = time.perf_counter() - t1
        if default.returncode:
            sys.exit(default.stdout[-3000:] + default.stderr[-3000:])
        vals = re.findall(r"\| val ([\d.]+)", default.stdout)
    steps = sum(int(r["steps"]) for r in rows)
    possible = len(rows) * base.train.max_steps
    finished = sum(r["stopped"] == "finished" for r in rows)
    best = rows[0]
    print(f"\nTuning demo: {platform.machine()}, {os.cpu_count()} cores; {a.config}, --samples {a.samples}")
    print(f"wall time:       {wall / 60:.1f} min for {len(rows)} trials ({finished} ran to the end)")
    print(f"steps run:       {steps:,} of {possible:,} possible: ASHA saved {100 * (1 - steps / possible):.0f}%")
    print(f"best val loss:   {float(best['val_loss']):.4f} (trial {best['trial']}: lr {float(best['optim.lr']):.3g}, "
          + ", ".join(f"{k} {v}" for k, v in best.items() if k.startswith(("optim.warmup", "model."))) + ")")
    print(f"default config:  {float(vals[-1]):.4f} after {base.train.max_steps} steps (lr {base.optim.lr:g}, warmup "
          f"{base.optim.warmup_steps}, {base.model.n_layer}L/{base.model.n_head}H/{base.model.n_embd}; "
          f"{default_wall:.0f} s)")


if __name__ == "__main__":
    main()
