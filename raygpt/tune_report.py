"""After a tune experiment: the table of trials (printed and trials.csv), best.yaml, curves.png. No Ray here:
it reads the ResultGrid that raygpt.tune hands it."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raygpt.config import Config, ConfigError
from raygpt.runs import error_line
from raygpt.tune_space import TuneSettings, trial_config

METRIC = "val_loss"


@dataclass
class TrialRow:
    """One line of the results table."""
    trial: str
    params: dict
    val_loss: Optional[float]  # the last val loss the trial reported (what ASHA and Optuna compared)
    steps: int
    time_s: float
    stopped: str  # finished | stopped early by ASHA at step N | error: ...
    checkpoint: Optional[str]
    curve: list  # [(step, val_loss)]


@dataclass
class TuneOutcome:
    experiment_dir: Path
    rows: list  # TrialRow, best first
    best_config: Optional[Path]
    best_checkpoint: Optional[str]
    plot: Optional[Path]


def format_value(value) -> str:
    """A sampled value for a line or a table: 4 significant digits, or 3 for the very small and large."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def ending(steps: int, max_steps: int) -> str:
    """How a trial that did not fail ended, for its line and the table."""
    return "finished" if steps >= max_steps else f"stopped early by ASHA at step {steps}"


def _rows(results, max_steps: int) -> list[TrialRow]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        records = [] if df is None else df.to_dict("records")
        curve = [(int(m["step"]), float(m[METRIC])) for m in records
                 if m.get(METRIC) is not None and not math.isnan(m[METRIC])]
        ckpts = [m["checkpoint_path"] for m in records if isinstance(m.get("checkpoint_path"), str)]
        steps = max((int(m["step"]) for m in records if isinstance(m.get("step"), (int, float)) and not math.isnan(m["step"])), default=0)
        stopped = f"error: {error_line(r.error)}" if r.error is not None else ending(steps, max_steps)
        trial = (r.metrics or {}).get("trial_id") or (records[-1].get("trial_id") if records else None)
        rows.append(TrialRow(trial=trial or (Path(r.path).name if r.path else "?"), params=dict(r.config or {}),
                             val_loss=curve[-1][1] if curve else None, steps=steps,
                             time_s=max((float(m.get("time_total_s") or 0) for m in records), default=0.0),
                             stopped=stopped, checkpoint=ckpts[-1] if ckpts else None, curve=curve))
    return sorted(rows, key=lambda row: (row.val_loss is None, row.val_loss or 0.0))


def write_table(rows: list[TrialRow], keys: list[str], path: Path, print_fn) -> None:
    head = ["trial", *keys, "val_loss", "steps", "time_s", "stopped", "checkpoint"]
    table = [[row.trial, *(row.params.get(k) for k in keys), row.val_loss, row.steps, round(row.time_s, 1),
              row.stopped, row.checkpoint or ""] for row in rows]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([head, *table])
    shown = [[format_value(v) if v is not None else "-" for v in line[:-1]] for line in table]  # no checkpoint column
    widths = [max(len(h), *(len(line[i]) for line in shown)) for i, h in enumerate(head[:-1])]
    print_fn("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in shown:
        print_fn("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def plot(rows: list[TrialRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (curves, by_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        if row.curve:
            curves.plot(*zip(*row.curve), marker=".", linewidth=1, alpha=0.8)
    curves.set(xlabel="step", ylabel="val loss", title=f"val loss of {len(rows)} trials")
    points = [(row.params["optim.lr"], row.val_loss, row.stopped == "finished") for row in rows
              if row.val_loss is not None and "optim.lr" in row.params]
    for finished, style in ((True, dict(marker="o", label="finished")), (False, dict(marker="x", label="stopped early"))):
        chosen = [(lr, loss) for lr, loss, f in points if f == finished]
        if chosen:
            by_lr.scatter(*zip(*chosen), **style)
    by_lr.set(xscale="log", xlabel="learning rate", ylabel="last val loss", title="val loss against learning rate")
    if points:
        by_lr.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(results, base: Config, settings: TuneSettings, exp_dir: Path, print_fn=print) -> TuneOutcome:
    """Table, best config and plot of a finished experiment; raises ConfigError when every trial failed."""
    rows = _rows(results, base.train.max_steps)
    keys = list(settings.space)
    print_fn(f"\ntune: {len(rows)} trials, best first (val_loss = the last val loss each reported)")
    write_table(rows, keys, exp_dir / "trials.csv", print_fn)
    good = [row for row in rows if row.val_loss is not None]
    if not good:
        first = next((row for row in rows if row.stopped.startswith("error")), None)
        raise ConfigError(f"all {len(rows)} trials failed; the first error: "
                          f"{first.stopped[len('error: '):] if first else 'no trial reported a val loss'} "
                          f"(each trial's log is under {exp_dir})")
    best = good[0]
    cfg = trial_config(base, settings, {k: v for k, v in best.params.items() if k in settings.space})
    cfg.train.run_name = None  # a new run when trained: not the trial's run, which has finished
    best_yaml = cfg.save(exp_dir / "best.yaml")
    figure = plot(rows, exp_dir / "curves.png")
    steps_run = sum(row.steps for row in rows)
    print_fn(f"\ntune: best trial {best.trial}: val loss {best.val_loss:.4f} at step {best.steps} with "
             + ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items()))
    print_fn(f"tune: steps run {steps_run:,} of {len(rows) * base.train.max_steps:,} possible "
             f"({100 * (1 - steps_run / max(1, len(rows) * base.train.max_steps)):.0f}% saved by early stopping)")
    print_fn(f"table:      {exp_dir / 'trials.csv'}\nbest config: {best_yaml}   (python jobs/train.py {best_yaml})\n"
             f"checkpoint: {best.checkpoint}\nplot:       {figure}")
    return TuneOutcome(experiment_dir=exp_dir, rows=rows, best_config=best_yaml, best_checkpoint=best.checkpoint,
                       plot=figure)


__all__ = ["summarize", "write_table", "plot"]
