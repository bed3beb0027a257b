"""One real Ray cluster for the whole test session: a head on loopback with 2 CPUs (raygpt.cluster.PrivateCluster:
its own temp dir and free ports), which driver-side tests join with ray.init(address=...) and job tests submit
to. Stopped at the end by its processes, never with `ray stop`: any other Ray cluster on the machine is left
alone (test_ray_isolation checks it), and a watchdog stops this one if the test run dies without cleaning up."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raygpt.cluster import PrivateCluster

RAY = str(Path(sys.executable).parent / "ray")

# The session's cluster runs with Ray's token authentication, as a shared cluster should: a fresh token
# for this session, in the environment of every side (the head, this driver, `ray job` CLI calls), so a
# stale ~/.ray/auth_token plays no part. test_ray_train checks that a submission without it is refused.
# (Test modules import this file again under its package name: the second import must keep the token.)
TOKEN = os.environ.setdefault("RAYGPT_TEST_RAY_TOKEN", secrets.token_hex(32))
# RAY_local_fs_capacity_threshold: Ray's raylets warn (every 10 s) and stop spilling past 95% of the disk; a CI
# machine's disk was at 97%. The tests of that warning set their own threshold.
ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "RAY_local_fs_capacity_threshold": "0.99",
       # `python` in submitted jobs must be this interpreter
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# Now, not in the fixture: Ray reads its auth mode when it is first imported, which test modules do.
os.environ.update(ENV)
# A driver that a test starts without RAY_ADDRESS starts a local cluster of its own: keep its files out of
# the machine's /tmp/ray too (Ray puts its temp root under RAY_TMPDIR).
os.environ.setdefault("RAY_TMPDIR", "/tmp/rg-tests")

# A suite started in the background of a non-interactive shell (`bash -c "... &"`) inherits SIGINT ignored,
# and so would every driver it starts (an ignored signal stays ignored across exec): a Ctrl-C test would
# then wait for a driver that never hears it. With Python's own handler here, the drivers start with theirs.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    cluster = PrivateCluster(num_cpus=2, env=ENV).start()
    # This driver and what it starts mean this cluster, as after a user's `export RAY_ADDRESS=...` (Ray's
    # state API, which list_actors uses, would otherwise scan the machine and refuse to choose).
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        ray.init(address=cluster.address, logging_config=ray.LoggingConfig(log_level="WARNING"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield {"address": cluster.address, "dashboard": cluster.dashboard, "metrics": cluster.metrics,
               "cluster": cluster}
    finally:
        ray.shutdown()
        cluster.stop()
        os.environ.pop("RAY_ADDRESS", None)


def get(url: str) -> str:
    """GET from the session's head, with its Ray token (the dashboard refuses requests without it)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read().decode()


def train_run(dashboard: str, name: str) -> dict | None:
    """The run called ``name`` in the Train view's API (Ray Train V2), newest first; None until Train's
    state actor exists (the API answers 500, "Train state data is not available", before any run that
    tracks state has started)."""
    try:
        runs = json.loads(get(f"{dashboard}/api/train/v2/runs/v1"))["train_runs"]
    except urllib.error.HTTPError as e:
        if e.code == 500 and "not available" in e.read().decode():
            return None
        raise
    return next((run for run in runs if run["name"] == name), None)


def interrupt(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Ctrl-C to a driver, which must end within ``timeout`` s; if it does not, the failure says where its
    threads are (py-spy) and what its signal masks were, and the log's tail."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        if proc.poll() is not None:  # it ended just now
            return
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    masks = "\n".join(line for line in status if line.startswith(("Sig", "Shd")))
    spy = Path(sys.executable).parent / "py-spy"
    stacks = subprocess.run([str(spy), "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                            timeout=60).stdout if spy.exists() else "(no py-spy)"
    pytest.fail(f"the driver ran on {timeout:.0f} s after Ctrl-C\n{masks}\n{stacks}\n{log.read_text()[-2000:]}")


def wait_for(probe, timeout: float, what: str):
    """probe()'s first truthy value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return value
