"""What the Ray dashboard shows of a raygpt run: the Train view lists it (its name, status and workers,
from the dashboard's Train API), and its figures reach the node's Prometheus endpoint through Ray's
metrics system, labelled with the run's name and each worker's rank, as the shipped Grafana dashboard
queries them."""

import json
import os
import re
import subprocess
import sys

import pytest

from raygpt.metrics import FIGURES, GRAFANA_DASHBOARD, RANK, RUN

from tests.integration.conftest import ENV, get, interrupt, train_run, wait_for
from tests.integration.test_ray_train import ROOT, TINY


def series(metrics_url: str, run_name: str) -> dict[str, set[str]]:
    """raygpt metric name -> the ranks it has a sample for, for one run, from Prometheus' text format."""
    found: dict[str, set[str]] = {}
    for line in get(metrics_url).splitlines():
        m = re.match(r"^(ray_raygpt_\w+)\{(.*)\} (\S+)$", line)
        if m and f'{RUN}="{run_name}"' in m[2]:
            found.setdefault(m[1], set()).add(re.search(rf'{RANK}="(\d+)"', m[2])[1])
    return found


def test_the_dashboard_lists_the_run_and_prometheus_gets_its_figures(ray_cluster, tmp_path):
    """A user's run (`python jobs/train.py` joining the cluster, 2 workers) shows in the Train view while it
    trains, its figures reach the metrics endpoint by rank, and Ctrl-C ends it as ABORTED there."""
    name = "watched"
    cmd = [sys.executable, "jobs/train.py", *TINY, f"train.run_name={name}", "ray.num_workers=2",
           "train.max_steps=100000", "train.log_interval=2", "train.eval_interval=4",
           "train.checkpoint_interval=100000", f"train.out_dir={tmp_path / 'runs'}",
           f"data.prepared_dir={tmp_path / 'prepared'}"]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV, "RAY_ADDRESS": ray_cluster["address"]})
    try:
        def running():
            assert proc.poll() is None, log.read_text()[-3000:]
            run = train_run(ray_cluster["dashboard"], name)
            ok = run and run["status"] == "RUNNING" and run.get("attempts") and run["attempts"][-1].get("workers")
            return run if ok else None

        run = wait_for(running, 300, "the run RUNNING in the Train view")
        assert sorted(w["world_rank"] for w in run["attempts"][-1]["workers"]) == [0, 1]
        # Ray's exporter takes a worker's gauges every few seconds; every figure shows, by rank.
        want = {f"ray_{FIGURES[key][0]}" for key in ("step", "loss", "val_loss", "lr", "grad_norm",
                                                     "tokens_per_s", "step_time_ms", "data_wait")}
        wait_for(lambda: all(series(ray_cluster["metrics"], name).get(metric) == {"0", "1"} for metric in want),
                 180, f"{sorted(want)} of ranks 0 and 1 on the metrics endpoint")
        interrupt(proc, log)  # Ctrl-C: Ray Train aborts the run gracefully
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = wait_for(lambda: (lambda r: r if r["status"] not in ("RUNNING", "INITIALIZING", "SCHEDULING") else None)(
        train_run(ray_cluster["dashboard"], name)), 120, "the run to end in the Train view")
    assert ended["status"] == "ABORTED", ended["status"]
    # ... and the command says so in one line, with how to resume, instead of ending without a word.
    said = log.read_text()
    assert proc.returncode == 130, said[-3000:]
    assert f"\nraygpt train: the run '{name}' was interrupted; it wrote no checkpoint, so the same command" in said
    assert "Traceback" not in said, said[-3000:]


@pytest.mark.parametrize("local_mode", ["auto", "false"])
def test_the_local_cluster_of_jobs_train_shows_the_run_too(ray_cluster, tmp_path, local_mode):
    """Without RAY_ADDRESS, `python jobs/train.py` starts a cluster of its own and says where its dashboard is.
    Its one worker trains in the driver (local mode, no worker group): the dashboard answers while it trains,
    and the run's figures reach that cluster's Prometheus endpoint. With ray.local_mode=false it is a
    TorchTrainer worker, and the run is listed in the Train view with its worker. Every line it prints is
    raygpt's: none of Ray's own warnings, errors or tracebacks, though another Ray cluster (the session's)
    runs on the machine, which Ray's own actors used to trip over."""
    cmd = [sys.executable, "jobs/train.py", *TINY, "train.run_name=alone", "train.max_steps=100000",
           "train.checkpoint_interval=100000", "train.log_interval=1", "sample.eval_tokens=0", f"train.out_dir={tmp_path / 'runs'}",
           f"data.prepared_dir={tmp_path / 'prepared'}", *(["ray.local_mode=false"] if local_mode == "false" else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_local_fs_capacity_threshold"] = "0.01"  # Ray's disk-full error, every 10 s: raygpt says it once
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def dashboard():
            assert proc.poll() is None, log.read_text()[-3000:]
            m = re.search(r"^ray: started a local Ray cluster for this run; dashboard (http://\S+)", log.read_text(), re.M)
            return m and m[1]

        url = wait_for(dashboard, 120, "the line saying where the dashboard is")
        assert url != ray_cluster["dashboard"]

        def running():
            assert proc.poll() is None, log.read_text()[-3000:]
            run = train_run(url, "alone")
            ok = run and run["status"] == "RUNNING" and run.get("attempts") and run["attempts"][-1].get("workers")
            return run if ok else None

        if local_mode == "false":
            run = wait_for(running, 300, "the run RUNNING in the Train view")
            assert [w["world_rank"] for w in run["attempts"][-1]["workers"]] == [0]
        wait_for(lambda: re.search(r"^step +4/", log.read_text(), re.M), 300, "a few steps")
        if local_mode == "auto":
            assert "it trains in this process (Ray Train's local mode" in log.read_text()
            assert re.search(r"^train: this process \(local mode\) on cpu", log.read_text(), re.M)
            assert json.loads(get(f"{url}/api/version"))["ray_version"]  # the dashboard answers
            assert train_run(url, "alone") is None  # no worker group, no Train run
            # The driver's figures reach the cluster's Prometheus endpoint (the dashboard's Metrics view).
            node = json.loads(get(f"{url}/nodes?view=summary"))["data"]["summary"][0]
            metrics = f"http://{node['raylet']['nodeManagerAddress']}:{node['raylet']['metricsExportPort']}/metrics"
            loss = f"ray_{FIGURES['loss'][0]}"
            wait_for(lambda: series(metrics, "alone").get(loss) == {"0"}, 120, "the run's loss in Prometheus")
        interrupt(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Every line it printed is raygpt's: none of Ray's own warnings, errors or tracebacks, though another
    # cluster (the session's) runs on the machine, which Ray's own actors used to trip over.
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    ours = ("ray: ", "prepare: ", "train: ", "start-up: ", "step ", "raygpt train: ")
    assert [line for line in lines if not line.startswith(ours)] == [], lines[-8:]
    assert sum(line.startswith("ray: warning: the disk of Ray's session folder") for line in lines) <= 1, lines
    # It ends saying what the interruption means for the run; the worker's last progress line may reach the
    # driver's output after that line (Ray forwards the workers' output on its own).
    said = [i for i, line in enumerate(lines) if line.startswith("raygpt train: the run 'alone' was interrupted")]
    assert said and all(line.startswith("step ") for line in lines[said[-1] + 1:]), lines[-5:]


def test_the_grafana_dashboard_plots_exactly_raygpts_figures():
    """Every panel of the shipped Grafana dashboard queries a figure raygpt exports, labelled as exported,
    and every exported figure has a panel."""
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = set(re.findall(r"\b(ray_raygpt_\w+)\{", target["expr"]))
            assert names, target["expr"]
            assert f'{RUN}=~"$TrainRunName"' in target["expr"] and f'{RANK}=~"$TrainWorkerWorldRank"' in target["expr"]
            queried |= names
    assert queried == {f"ray_{name}" for name, _ in FIGURES.values()}
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "TrainRunName", "TrainWorkerWorldRank"} <= variables
