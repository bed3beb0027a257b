"""`raygpt serve`: start (or join) a Ray cluster, run the application, print where it answers, and keep it up
until Ctrl-C. The application itself is raygpt/serve/app.py."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Optional

from raygpt.checkpoint import CheckpointError
from raygpt.config import Config, ConfigError

APP = "raygpt"


def run_server(source: str, cfg: Config, api_key: Optional[str] = None, print_fn=print,
               until=lambda: False) -> None:
    """Serve the checkpoint or run folder ``source`` with cfg.serve's settings until Ctrl-C (or ``until()``).
    On a cluster it joined (RAY_ADDRESS) it removes its application when it ends; a local cluster it
    started ends with this process."""
    s = cfg.serve
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    local = not os.environ.get("RAY_ADDRESS")
    if local:  # this machine's replicas: what they can run is known now
        import torch

        from raygpt.quantize import check_quantize

        check_port_free(s.host, s.port)
        check_quantize(s.quantize, "cuda" if torch.cuda.is_available() else "cpu")
    from raygpt.checkpoint import read_meta
    from raygpt.serve.app import build, choose_checkpoint

    served = choose_checkpoint(path.resolve(), s.follow)
    read_meta(served)  # a folder that is no checkpoint: one line, before Ray starts
    from ray import serve

    from raygpt.distributed import connect

    connect(print_fn)
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build({**s.__dict__, "checkpoint": str(path), "api_key": api_key}), name=APP,
              route_prefix=s.route_prefix)
    base = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    print_fn(f"serving {served}" + (f" (following {path}: a better checkpoint replaces it as training writes it)"
                                    if s.follow else "")
             + f"\n  web page:    {base}/\n  OpenAI API:  base_url={base}/v1   (POST /v1/completions, GET /v1/models)"
             + ("\n  API key:     required (Authorization: Bearer ...)" if api_key else "")
             + "\nCtrl-C stops it.")
    # `ray job stop` ends a job's driver with SIGTERM: end as Ctrl-C does, so a cluster keeps no orphan app
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while not until():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if not local:
            serve.delete(APP)
            print_fn(f"removed the application {APP!r} from the cluster")


def check_port_free(host: str, port: int) -> None:
    """A port already taken on this machine is one line now, not a Serve proxy that fails to start."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                              "(serve.port) or stop what uses it") from None


class ServeProcess:
    """`raygpt serve SOURCE ARGS` as a child process in a session of its own, with the local Ray cluster it
    starts (its files under a temp dir of its own, never /tmp/ray): what the tests and benchmarks run, ended
    by its processes (Ctrl-C, then whatever of the session is left), never with `ray stop`.

        with ServeProcess("runs/demo", "--port", "8123") as s:
            s.wait_ready(); urllib.request.urlopen(s.url + "/healthz")
    """

    def __init__(self, source: str, *args: str, port: Optional[int] = None, prefix: str = "", env: Optional[dict] = None,
                 log: Optional[str] = None):
        import subprocess
        import sys
        import tempfile

        from raygpt.cluster import free_ports, local_cluster_env

        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        self.started = time.monotonic()
        self.ray_tmp = tempfile.mkdtemp(prefix="rgs-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.log = open(log or os.path.join(self.ray_tmp, "serve.log"), "w+")
        argv = [sys.executable, "-m", "raygpt.cli", "serve", str(source), "--port", str(self.port), *args]
        if prefix:
            argv.append(f"serve.route_prefix={prefix}")
        self.proc = subprocess.Popen(argv, env={**os.environ, **local_cluster_env(self.ray_tmp), **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> float:
        """Wait until /healthz answers 200; the seconds since the process started."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"raygpt serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"raygpt serve did not answer in {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        import shutil
        import subprocess

        from raygpt.cluster import end_session

        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        end_session(self.proc.pid, timeout=10, reap=self.proc)  # whatever of its cluster is left
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
