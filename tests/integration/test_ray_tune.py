"""`raygpt tune`: real Ray Tune experiments (Optuna proposing, ASHA stopping) of real TorchTrainer trials
on the session cluster, with tiny models."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import raygpt
from raygpt.cli import main
from raygpt.config import load_config
from raygpt.tune import run_tune
from raygpt.tune_space import load_tune_config
from tests.conftest import wandb_records
from tests.integration.conftest import ENV, train_run, wait_for

ROOT = Path(__file__).resolve().parents[2]


def tune_yaml(tmp_path, **tune) -> Path:
    """A tiny experiment: 40-step trials judged every 10 steps, one trial at a time so ASHA's decisions
    depend only on the (seeded) losses, not on which trial happens to report first."""
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {"max_chars": 300000, "prepared_dir": str(tmp_path / "prepared")},
        "optim": {"warmup_steps": 0},
        "train": {"max_steps": 40, "eval_interval": 10, "eval_steps": 4, "log_interval": 10, "batch_size": 8,
                  "checkpoint_interval": 40, "out_dir": str(tmp_path / "runs")},
        "sample": {"eval_tokens": 0},
        "tune": {"samples": 5, "grace_steps": 10, "reduction_factor": 2, "max_concurrent": 1, "seed": 0,
                 "space": {"optim.lr": {"loguniform": [1e-4, 3e-2]},
                           "optim.warmup_fraction": {"uniform": [0.0, 0.2]},
                           "model.size": {"choice": ["one", "two"]}},
                 "model_sizes": {"one": {"n_layer": 1}, "two": {"n_layer": 2}}, **tune}}))
    return path


def test_tune_stops_weak_trials_and_writes_table_best_config_and_plot(ray_cluster, tmp_path):
    base, settings = load_tune_config(tune_yaml(tmp_path, experiment="exp"),
                                      ["logging.wandb=true", "logging.wandb_mode=offline"])
    from ray.util.state import list_actors

    def trial_actors():  # a function trial runs in an ImplicitFunc actor
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "ImplicitFunc")], limit=10000)}

    earlier = trial_actors()
    lines = []
    out = run_tune(base, settings, print_fn=lines.append)
    exp = tmp_path / "runs" / "tune" / "exp"
    assert out.experiment_dir == exp and len(out.rows) == 5
    assert sum(line.startswith("tune: trial ") for line in lines) == 5  # one line per finished trial
    stopped = [r for r in out.rows if r.stopped.startswith("stopped early by ASHA")]
    finished = [r for r in out.rows if r.stopped == "finished"]
    assert stopped and finished and len(stopped) + len(finished) == 5, [r.stopped for r in out.rows]
    assert all(r.steps < 40 for r in stopped) and all(r.steps == 40 for r in finished)
    losses = [r.val_loss for r in out.rows]
    assert losses == sorted(losses)  # best first
    # The table, as CSV: one row per trial, the sampled values and the outcome.
    import csv

    with open(exp / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["trial"] for row in table] == [r.trial for r in out.rows]
    assert {"optim.lr", "optim.warmup_fraction", "model.size", "val_loss", "steps", "time_s", "stopped"} <= set(table[0])
    # The best config: the base with the best trial's values, which `raygpt train` takes unchanged.
    best = out.rows[0]
    saved = load_config(out.best_config)
    assert saved.optim.lr == pytest.approx(best.params["optim.lr"])
    assert saved.model.n_layer == {"one": 1, "two": 2}[best.params["model.size"]]
    assert saved.train.run_name is None  # trains as a new run, not as the trial's finished one
    assert main(["train", str(out.best_config), "--local"]) == 0
    # The best trial's checkpoint opens with raygpt.load and has the best trial's shape and val loss.
    gen = raygpt.load(out.best_checkpoint, device="cpu")
    assert gen.model.config.n_layer == saved.model.n_layer
    assert isinstance(gen.generate("def ", max_new_tokens=5, seed=0), str)
    assert (exp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The trials ran in Ray actors the dashboard lists (its Actors view reads this state API), each trial in
    # an actor's own process: no Ray Train worker group, so no run in the Train view. A trial hands its
    # process on to the next (Tune's reuse_actors): fewer actors than trials, one trial at a time here.
    assert 1 <= len(trial_actors() - earlier) < 5
    assert any("each in its own process" in line for line in lines)
    assert all(train_run(ray_cluster["dashboard"], row.trial) is None for row in out.rows)
    # W&B: one run per trial (its id is the trial id), grouped under the experiment.
    for row in out.rows:
        runs = [r["data"] for r in wandb_records(exp / "runs" / row.trial) if r["kind"] == "run"]
        assert runs and {(r["run_id"], r["group"]) for r in runs} == {(row.trial, "exp")}


@pytest.mark.parametrize("over", [["ray.num_workers=2"], ["tune.local_trials=false"]], ids=["2 workers", "1 worker"])
def test_trials_of_torchtrainers_show_in_the_train_view(ray_cluster, tmp_path, over):
    """Trials of several workers (DDP here), or of one with tune.local_trials=false, each build a TorchTrainer
    whose run the dashboard's Train view shows under the trial's id, with its workers. One trial each: a
    worker group starts in 10-13 s on 2 cores."""
    base, settings = load_tune_config(tune_yaml(tmp_path, samples=1, experiment="tt", grace_steps=40),
                                      ["ray.cpus_per_worker=1", *over])
    lines = []
    out = run_tune(base, settings, print_fn=lines.append)
    workers = 2 if "ray.num_workers=2" in over else 1
    assert any(f"each a TorchTrainer of {workers} worker(s)" in line for line in lines)
    assert [(r.stopped, r.steps) for r in out.rows] == [("finished", 40)]
    # (Tune ends every trial, a finished one too, at its last report, before its TorchTrainer returns:
    # the Train view shows them ABORTED.)
    for row in out.rows:
        run = wait_for(lambda: (lambda r: r if (r or {}).get("status") in ("FINISHED", "ABORTED") else None)(
            train_run(ray_cluster["dashboard"], row.trial)), 120, f"trial {row.trial}'s run, ended, in the Train view")
        assert len(run["attempts"][-1]["workers"]) == workers


def test_bad_trial_resources_and_failing_trials_end_in_one_clear_line(ray_cluster, tmp_path, capsys):
    path = tune_yaml(tmp_path, samples=2)
    assert main(["tune", str(path), "tune.experiment=big", "ray.cpus_per_worker=4"]) == 2
    err = capsys.readouterr().err
    assert "one trial needs more than the cluster has" in err and "needs 4 CPUs but the cluster has 2" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs" / "tune" / "big").exists()  # no trial started
    # Every trial fails (its worker exits hard at step 3): a summary with the first error, no traceback.
    assert main(["tune", str(path), "tune.experiment=fails", "ray.fail_at_step=3"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (Ray's own logs of the dying workers come before it)
    assert last.startswith("raygpt tune: error: all 2 trials failed; the first error: ray.train.WorkerGroupError"), last


def trial_states(exp: Path) -> dict:
    """trial id -> Tune status, from the experiment state Tune saves as it goes (a resumed experiment
    starts a new file)."""
    states = {}
    for path in sorted(exp.glob("experiment_state-*.json"))[-1:]:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # being rewritten
        for item in data["trial_data"]:
            trial = json.loads(item[0])
            states[trial["trial_id"]] = trial["status"]
    return states


def test_resume_after_the_driver_is_killed_does_not_repeat_finished_trials(ray_cluster, tmp_path):
    path = tune_yaml(tmp_path, samples=3, experiment="again")
    exp = tmp_path / "runs" / "tune" / "again"
    # Tune saves the experiment's state every loop (not every few seconds), so the first trial to end is on
    # record while the next runs: trials in a reused process end within a second or two of each other.
    env = {**os.environ, **ENV, "RAY_ADDRESS": ray_cluster["address"], "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = tmp_path / "driver.log"
    with open(log, "w") as out, subprocess.Popen([sys.executable, str(ROOT / "jobs/tune.py"), str(path)], cwd=tmp_path,
                                                 env=env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True) as proc:
        deadline = time.time() + 300
        while "TERMINATED" not in trial_states(exp).values():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-experiment, its cluster does not
    done = {t for t, status in trial_states(exp).items() if status == "TERMINATED"}
    assert 0 < len(done) < 3
    before = {t: (exp / f"trial-{t}" / "result.json").read_text() for t in done}
    assert main(["tune", str(path), "tune.experiment=again", "--resume"]) == 0
    after = trial_states(exp)
    assert len(after) == 3 and set(after.values()) == {"TERMINATED"}
    for t in done:  # the finished trials were not run again: their results are as they were
        assert (exp / f"trial-{t}" / "result.json").read_text() == before[t]
    with open(exp / "trials.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 3


def test_tune_on_its_own_local_cluster_prints_only_what_helps(ray_cluster, tmp_path):
    """`jobs/tune.py` without RAY_ADDRESS, next to another Ray cluster (the session's), trials side by side:
    every trial ends (Ray's own actors used to hang it, tripping over the other cluster), and what it
    prints is raygpt's lines plus the Ray warning the README names, nothing else (no Tune box, no Optuna or
    Ray Data lines, no tracebacks from a statistics actor that died with the first trial to end). No trial
    is stopped early here: Tune ends those mid-step, and what Ray prints then is in the README. Its raylet
    takes any disk over 1% full for full: Ray's error about it, every 10 s, comes out as raygpt's one line
    (CI's disk, 97% full, once filled a run's console with it)."""
    path = tune_yaml(tmp_path, samples=3, max_concurrent=2, grace_steps=40)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_local_fs_capacity_threshold"] = "0.01"
    out = subprocess.run([sys.executable, str(ROOT / "jobs/tune.py"), str(path), "tune.experiment=quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ours = ("ray: ", "prepare: ", "tune: ", "trial ", "table: ", "best config: ", "checkpoint: ", "plot: ")
    table = r"^[0-9a-f]{8}  "  # the table's rows
    known = r"^\x1b\[33m\(raylet\)\x1b\[0m WARNING: \d+ PYTHON worker processes have been started"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert [line for line in lines if not (line.startswith(ours) or re.match(table, line) or re.match(known, line))] == []
    assert sum(line.startswith("tune: trial ") and " finished: " in line for line in lines) == 3
    [disk] = out.stderr.strip().splitlines()  # one line, however long it ran (3 trials: well past 10 s)
    assert re.match(r"ray: warning: the disk of Ray's session folder \(\S+\) is over 1% full \(", disk), disk
