"""A private Ray cluster on this machine: its own temp dir, its own free ports, stopped by its processes.

What the tests and the benchmarks start, so that they never touch a Ray cluster someone else runs on the
same machine: no fixed ports, no shared /tmp/ray, and never `ray stop` (which stops every Ray cluster
on the machine). Each node is a `ray start --block` in a session of its own, which holds every process of
that node (GCS, raylet, dashboard, agents, and the workers, which Ray puts in process groups of their
own but not in sessions of their own); stopping the cluster signals exactly those sessions' processes,
and a watchdog process does the same if the process that started them dies without cleaning up (a
crash, SIGKILL, a closed terminal).

    with PrivateCluster(num_cpus=2) as cluster:
        ray.init(address=cluster.address)
        ...

Needs Ray installed, but imports it only inside functions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# A node's listening ports besides the GCS one; each gets a free port of its own.
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_cluster_env(temp_root: str) -> dict:
    """Environment for a driver that must start a local Ray cluster of its own (a bench's `jobs/train.py`):
    no RAY_ADDRESS, so raygpt's connect() starts a fresh local cluster (ray.init(address="local"), free
    ports, never joining one already running), with its files under ``temp_root`` (Ray's RAY_TMPDIR)
    instead of the machine's /tmp/ray. The cluster ends with that driver."""
    return {"RAY_ADDRESS": "", "RAY_TMPDIR": temp_root}


def connect_private() -> None:
    """raygpt's connect() on a fresh local cluster of this process's own (what the in-process benches
    measure on), its files in a temp root removed at exit; the cluster ends with this process."""
    import atexit

    from raygpt.distributed import connect

    root = tempfile.mkdtemp(prefix="rg-", dir="/tmp")
    atexit.register(shutil.rmtree, root, True)  # runs after Ray's own exit hook, registered later
    os.environ.update(local_cluster_env(root))
    connect()


def ray_cli() -> str:
    """The `ray` command next to this interpreter (a venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


class PrivateCluster:
    """A head node (and optional extra nodes) of a Ray cluster no one else uses.

    ``address`` is the GCS address for ``ray.init(address=...)``, ``dashboard`` the dashboard's URL (the
    job API too), ``metrics`` the head's Prometheus endpoint, ``temp_dir`` where its logs and sessions
    live. ``env`` is added to every node's environment (e.g. Ray's auth settings)."""

    def __init__(self, num_cpus: int = 2, env: Optional[dict] = None, temp_dir: Optional[str] = None,
                 include_dashboard: bool = True, start_timeout: float = 180.0):
        self.num_cpus, self.include_dashboard, self.start_timeout = num_cpus, include_dashboard, start_timeout
        self.env = {**os.environ, **(env or {})}
        # Short: Ray's Unix socket paths live under it and must stay under 107 bytes.
        self._own_temp = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rg-", dir="/tmp")
        self.nodes: list[subprocess.Popen] = []
        self._watchdog: Optional[subprocess.Popen] = None
        self.address = self.dashboard = self.metrics = ""

    # ------------------------------------------------------------------ start

    def start(self) -> "PrivateCluster":
        gcs, dashboard, client, *ports = free_ports(3 + len(NODE_PORTS))
        args = ["--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client}",
                f"--include-dashboard={'true' if self.include_dashboard else 'false'}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.metrics = f"http://127.0.0.1:{ports[NODE_PORTS.index('metrics-export-port')]}/metrics"
        # Every process of the cluster (workers too: they inherit the raylet's environment) resolves "the
        # cluster" to this one: Ray's state API, which Ray Train's own actors call without an address,
        # otherwise scans the machine and fails when it finds other clusters there.
        self.env["RAY_ADDRESS"] = self.address
        self._start_node(args, ports, self.num_cpus)
        self._wait(lambda: self._gcs_answers(), "the head node")
        if self.include_dashboard:
            self._wait(lambda: self._http_answers(f"{self.dashboard}/api/version"), "the dashboard")
        return self

    def add_node(self, num_cpus: int = 2, resources: Optional[str] = None) -> subprocess.Popen:
        """Another node (its own raylet) joining the head; returns its `ray start` process, whose pid is the
        id of the session holding the node's processes (stop it with stop_node)."""
        args = [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
        if resources:
            args.append(f"--resources={resources}")
        return self._start_node(args, free_ports(len(NODE_PORTS)), num_cpus)

    def _start_node(self, args: list[str], ports: list[int], num_cpus: int) -> subprocess.Popen:
        # --block keeps `ray start` in the foreground as the leader of a new session that holds every
        # process of the node (GCS, raylet, dashboard, agents, workers): ending that session's processes
        # stops this node and nothing else. Worker ports come from the OS (0), not Ray's 10002-19999.
        cmd = [ray_cli(), "start", *args, f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--block",
               "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
               *(f"--{name}={port}" for name, port in zip(NODE_PORTS, ports))]
        log = open(Path(self.temp_dir) / f"ray-start-{len(self.nodes)}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.nodes.append(proc)
        self._arm_watchdog()
        return proc

    def _arm_watchdog(self) -> None:
        """(Re)start the watchdog over every node's session."""
        if self._watchdog is not None:
            self._watchdog.kill()  # before its stdin closes: on EOF it would stop the nodes
            self._watchdog.wait()
            self._watchdog.stdin.close()
        package_root = str(Path(__file__).resolve().parent.parent)
        remove = [f"--remove={self.temp_dir}"] if self._own_temp else []
        self._watchdog = subprocess.Popen([sys.executable, "-m", "raygpt.cluster", *remove,
                                           *(str(p.pid) for p in self.nodes)],
                                          stdin=subprocess.PIPE, start_new_session=True,
                                          env={**os.environ, "PYTHONPATH": package_root})

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            for i, proc in enumerate(self.nodes):
                if proc.poll() is not None:
                    log = (Path(self.temp_dir) / f"ray-start-{i}.log").read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"ray start exited ({proc.returncode}) before {what} was up:\n{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{what} did not come up in {self.start_timeout:.0f} s")
            time.sleep(0.5)

    def _gcs_answers(self) -> bool:
        host, port = self.address.split(":")
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, int(port))) == 0

    @staticmethod
    def _http_answers(url: str) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered (401 without Ray's token on an authenticated cluster)
        except OSError:
            return False

    # ------------------------------------------------------------------ stop

    def stop_node(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """Stop one node: SIGTERM to its processes, SIGKILL to what is left after ``timeout``."""
        end_session(proc.pid, timeout, reap=proc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node this object started (newest first, the head last) and remove the temp dir."""
        for proc in reversed(self.nodes):
            end_session(proc.pid, timeout, reap=proc)
        if self._watchdog is not None:
            self._watchdog.kill()  # its sessions are gone; it must not outlive us
            self._watchdog.wait()
            self._watchdog.stdin.close()
            self._watchdog = None
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "PrivateCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc (Linux); on other systems its process group."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(session, 0)
            return [session]
        except ProcessLookupError:
            return []
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and session_of(int(pid)) == session]


def session_of(pid: int) -> Optional[int]:
    """The session id of a live process (None when it is gone or a zombie), from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session, ...
    return None if fields[0] == "Z" else int(fields[3])


def end_session(session: int, timeout: float, reap: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM every process of a session, SIGKILL what is left after ``timeout`` seconds (Ray's own
    graceful stop of a head takes about 30 s; a throw-away cluster does not need it). ``reap``: the
    session's leader when it is our child, waited for so it leaves no zombie."""
    def signal_all(sig: int) -> None:
        for pid in session_members(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not Path("/proc/self/stat").exists():
            try:
                os.killpg(session, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while session_members(session) and time.monotonic() < deadline:
        if reap is not None:
            reap.poll()
        time.sleep(0.2)
    signal_all(signal.SIGKILL)
    if reap is not None:
        reap.wait()


def _watch(argv: list[str]) -> None:
    """The watchdog (``python -m raygpt.cluster [--remove=DIR] SESSION ...``): wait until stdin closes
    (the process that started the cluster is gone, whatever the reason), then end the given sessions and
    remove the cluster's own temp dir."""
    sys.stdin.read()
    for session in [int(a) for a in argv if not a.startswith("--")]:
        end_session(session, timeout=10)
    for arg in argv:
        if arg.startswith("--remove="):
            shutil.rmtree(arg.split("=", 1)[1], ignore_errors=True)


if __name__ == "__main__":
    _watch(sys.argv[1:])
