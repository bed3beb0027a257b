"""The test suite leaves every other Ray cluster on the machine alone: someone else's cluster, started the
way a user starts one, is still alive and answering after the suite's cluster fixture has started and
stopped, whether the tests under it passed, failed or the test run was killed. The suite's own cluster
goes completely each time (every process of it, its temp dir)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from raygpt.cluster import NODE_PORTS, end_session, free_ports, session_members, session_of

from tests.integration.conftest import ENV, RAY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outsider():
    """A user's cluster: `ray start --head` as a daemon, its own temp dir and ports, in a session of its own
    (so this test can end it by its processes afterwards)."""
    temp = tempfile.mkdtemp(prefix="rg-user-", dir="/tmp")
    gcs, dashboard, client, *ports = free_ports(3 + len(NODE_PORTS))
    cmd = [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={client}", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in zip(NODE_PORTS, ports))]
    started = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=180,
                             start_new_session=True)
    assert started.returncode == 0, started.stdout + started.stderr
    # Its processes outlive `ray start` in the session it led: find it from the GCS server's process.
    sessions = {session_of(pid) for pid in _pids_with(f"--gcs_server_port={gcs}")}
    assert len(sessions) == 1, sessions
    session = sessions.pop()
    try:
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "session": session}
    finally:
        end_session(session, timeout=10)
        subprocess.run(["rm", "-rf", temp])


def _pids_with(fragment: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and fragment in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def answers(address: str) -> bool:
    """A fresh driver joins the cluster and runs a task on it."""
    script = "import ray; ray.init(address=%r); print(ray.get(ray.remote(lambda: 6 * 7).remote()))" % address
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **ENV})
    return out.returncode == 0 and out.stdout.strip().endswith("42")


def run_probe(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    """tests/integration/cluster_probe.py in a pytest of its own: the suite's cluster fixture, for real."""
    out = tmp_path / f"probe-{mode}.json"
    env = {**os.environ, "RAYGPT_PROBE_OUT": str(out), "RAYGPT_PROBE_MODE": mode}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/integration/cluster_probe.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, out


def gone(info: dict, timeout: float = 90) -> bool:
    """Every process of the probe's cluster has ended and its temp dir is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(session_members(s) for s in info["sessions"]) and not Path(info["temp_dir"]).exists():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("mode", ["fail", "killed"])
def test_the_suite_cluster_leaves_other_clusters_alone(ray_cluster, outsider, tmp_path, mode):
    assert answers(outsider["address"])
    proc, out = run_probe(tmp_path, "fail" if mode == "fail" else "hang")
    if mode == "killed":
        deadline = time.monotonic() + 300
        while not out.exists():  # the probe's cluster is up and its test is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # no teardown runs: the watchdog must clean up
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, log  # failed on purpose / killed
    if mode == "fail":
        assert "this probe fails on purpose" in log, log
    info = json.loads(out.read_text())
    assert gone(info), f"the probe's cluster left processes or files behind: {info}"
    # The other clusters on the machine: the user's, and this session's own.
    assert session_members(outsider["session"]), "the user's cluster lost its processes"
    assert answers(outsider["address"]), "the user's cluster no longer answers"
    assert ray.get(ray.remote(lambda: "still here").remote()) == "still here"
