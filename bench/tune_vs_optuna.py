"""Tune against Optuna alone: `jobs/tune.py --samples N`, then the same search in one process without Ray.

    python bench/tune_vs_optuna.py [--samples 32] [--columns tune,tune1,optuna,optuna2] [TUNE_CONFIG]

1. raygpt: `python jobs/tune.py CONFIG --samples N` as a user runs it (a subprocess, its own local Ray cluster),
   timed start to end; each trial's line says its start-up (Tune starting it -> its first step) and training
   time (its loop, evals included). Column `tune`: as configured (two trials at once on 2 cores, 1 CPU and
   1 thread each); column `tune1`: one trial at a time on every core (tune.max_concurrent=1,
   ray.cpus_per_worker=cores), the like-for-like run for Optuna one trial at a time.
2. Optuna alone, the plain alternative: one process, the tune config's search space as Optuna distributions,
   TPESampler(seed=tune.seed), Optuna's SuccessiveHalvingPruner with ASHA's rungs (min_resource =
   tune.grace_steps, the same reduction factor) judging the same val-loss reports (every train.eval_interval
   steps, never at the last step, as ASHA's max_t = max_steps - 1), the same N trials and train.max_steps;
   each trial is raygpt's in-process loop (train_local, the `--local` path) on the text tokenized once,
   trials one after another with torch using every core; then the same with two trials at once (Optuna's
   n_jobs=2, threads in one process) and one torch thread each, as Tune's trials run (columns `optuna`,
   `optuna2`).
Prints, for each: wall time, trials pruned, steps run, best val loss, trial start-up median, and the share of
the wall time spent training (sum of the trials' training time / (wall x trials at once)). Asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
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

from raygpt.cluster import local_cluster_env  # noqa: E402 (no Ray import)

TRIAL_LINE = re.compile(r"^tune: trial \w+ \(\d+/\d+\) .*\| start-up ([\d.]+) s, training ([\d.]+) s$", re.M)


def run_tune(config: str, samples: int, out: Path, overrides: tuple = ()) -> dict:
    common = [f"train.out_dir={out}/runs", f"data.prepared_dir={out}/prepared", *overrides]
    env = {**os.environ, **local_cluster_env(str(out))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/tune.py"), config, "--samples", str(samples),
                           "tune.experiment=bench", *common], cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    (out.parent / f"tune_vs_optuna.tune{len(overrides)}.log").write_text(proc.stdout + proc.stderr)  # beside the temp folder
    with open(out / "runs/tune/bench/trials.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if not r["val_loss"]:
            print(f"trial {r['trial']}: no val loss ({r['stopped']})")
    rows = [r for r in rows if r["val_loss"]]
    times = [(float(a), float(b)) for a, b in TRIAL_LINE.findall(proc.stdout)]
    concurrent = int(re.search(r"up to (\d+) at once", proc.stdout)[1])
    return {"wall": wall, "trials": len(rows), "pruned": sum(r["stopped"] != "finished" for r in rows),
            "steps": sum(int(r["steps"]) for r in rows), "best": min(float(r["val_loss"]) for r in rows),
            "startup": [a for a, _ in times], "training": [b for _, b in times], "concurrent": concurrent,
            "lines": len(times)}


def run_optuna(config: str, samples: int, out: Path, jobs: int = 1) -> dict:
    """Optuna alone in this process; ``jobs`` trials at once (Optuna's threads), each with cores / jobs torch
    threads (torch's thread count is per process: with 2 at once, 1 thread each, as Tune's trials have)."""
    import optuna
    import torch

    from raygpt.data.corpus import prepare_arrays
    from raygpt.local import train_local
    from raygpt.tune_space import load_tune_config, trial_config

    t0 = time.perf_counter()
    base, settings = load_tune_config(config, [f"train.out_dir={out}/optuna", f"data.prepared_dir={out}/prepared"])
    base.logging.wandb = False
    base.train.threads = max(1, (os.cpu_count() or 1) // jobs)
    arrays = prepare_arrays(base.data, None, print_fn=lambda s: None)  # once, as Tune prepares once
    max_steps = base.train.max_steps
    trials: list[dict] = []

    def suggest(trial, key: str, kind: str, args):
        if kind == "loguniform":
            return trial.suggest_float(key, *args, log=True)
        if kind == "uniform":
            return trial.suggest_float(key, *args)
        if kind == "randint":
            return trial.suggest_int(key, *args)
        return trial.suggest_categorical(key, list(args))

    def objective(trial) -> float:
        params = {key: suggest(trial, key, kind, args) for key, (kind, args) in settings.space.items()}
        cfg = trial_config(base, settings, params)
        cfg.train.run_name = f"trial-{jobs}-{trial.number}"
        start, seen = time.time(), {"steps": 0, "training": 0.0}
        trials.append(seen)

        def on_report(m: dict) -> None:
            seen.update(steps=m["step"], training=m["elapsed_s"])
            seen.setdefault("startup", time.time() - m["elapsed_s"] - start)
            if "val_loss" in m:
                trial.report(m["val_loss"], m["step"])
                if m["step"] < max_steps and trial.should_prune():
                    raise optuna.TrialPruned()

        result = train_local(cfg, arrays=arrays, print_fn=lambda s: None, on_report=on_report)
        return [m["val_loss"] for m in result.metrics if "val_loss" in m][-1]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=settings.seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(
                                    min_resource=settings.grace_steps or base.train.eval_interval,
                                    reduction_factor=settings.reduction_factor))
    study.optimize(objective, n_trials=samples, n_jobs=jobs)
    wall = time.perf_counter() - t0
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"wall": wall, "trials": len(study.trials), "pruned": pruned, "steps": sum(t["steps"] for t in trials),
            "best": study.best_value, "startup": [t["startup"] for t in trials if "startup" in t],
            "training": [t["training"] for t in trials], "concurrent": jobs, "threads": torch.get_num_threads()}


COLUMNS = {"tune": "jobs/tune.py", "tune1": "jobs/tune.py, 1 at once", "optuna": "Optuna alone",
           "optuna2": "Optuna, 2 at once"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs/tune/default.yaml"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--columns", default="tune,tune1,optuna,optuna2",
                    help="which runs, comma-separated (tune: as configured; tune1: one trial at a time on every core; "
                         "optuna: one at a time on every core; optuna2: two at once, one thread each)")
    a = ap.parse_args()
    columns = a.columns.split(",")
    if not set(columns) <= COLUMNS.keys():
        sys.exit(f"--columns: one of {', '.join(COLUMNS)} each, comma-separated; got {a.columns!r}")
    import optuna
    import ray
    import torch

    cores = os.cpu_count() or 1
    runs = {}
    for name in COLUMNS:
        if name not in columns:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if name == "tune":
                runs[name] = run_tune(a.config, a.samples, Path(tmp))
            elif name == "tune1":
                runs[name] = run_tune(a.config, a.samples, Path(tmp), ("tune.max_concurrent=1", f"ray.cpus_per_worker={cores}"))
            else:
                runs[name] = run_optuna(a.config, a.samples, Path(tmp), jobs=1 if name == "optuna" else 2)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nTune against Optuna alone: {cpu}, {os.cpu_count()} cores; {a.config}, {a.samples} trials; "
          f"Ray {ray.__version__}, Optuna {optuna.__version__}, torch {torch.__version__}")
    print(f"{'':34}" + "".join(f"{COLUMNS[name]:>22}" for name in runs))

    def row(name: str, f) -> None:
        print(f"{name:34}" + "".join(f"{f(r):>22}" for r in runs.values()))

    row("wall time", lambda r: f"{r['wall'] / 60:.2f} min")
    row("trials at once", lambda r: f"{r['concurrent']}")
    row("trials pruned / run", lambda r: f"{r['pruned']} / {r['trials']}")
    row("steps run", lambda r: f"{r['steps']:,}")
    row("best val loss", lambda r: f"{r['best']:.4f}")
    row("trial start-up, median", lambda r: f"{statistics.median(r['startup']):.1f} s" if r["startup"] else "-")
    row("training share of the wall time", lambda r: f"{100 * sum(r['training']) / (r['wall'] * r['concurrent']):.0f}%")
    row("wall time per step run", lambda r: f"{1000 * r['wall'] / r['steps']:.0f} ms")
    print()
    for tune, against in (("tune", "optuna"), ("tune", "optuna2"), ("tune1", "optuna")):
        if tune in runs and against in runs:
            print(f"wall time, {COLUMNS[tune]} / {COLUMNS[against]}: {runs[tune]['wall'] / runs[against]['wall']:.2f}x "
                  "(target: 1.3x or less)")
    for name in ("tune", "tune1"):
        if name in runs and runs[name]["lines"] != runs[name]["trials"]:
            print(f"{COLUMNS[name]}: {runs[name]['trials'] - runs[name]['lines']} trial lines without times "
                  "(resumed or failed trials)")


if __name__ == "__main__":
    main()
