"""The server on a cluster that is already there (the session's): deployed the Ray way (`serve deploy` of a
config naming the application builder raygpt.serve:app), moved to another checkpoint through its
user_config without a restart, and run as a job (`ray job submit -- python jobs/serve.py`)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from raygpt.cluster import free_ports
from tests.integration.conftest import RAY, wait_for
from tests.integration.test_ray_serve import request, train_demo

ROOT = Path(__file__).resolve().parents[2]
SERVE = str(Path(RAY).parent / "serve")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one run: step 60, and a copy that says step 90."""
    first = train_demo(tmp_path_factory.mktemp("serve-cluster"))
    second = first.parent / "step_000090"
    shutil.copytree(first, second)
    meta = json.loads((second / "meta.json").read_text())
    (second / "meta.json").write_text(json.dumps({**meta, "step": 90}))
    return first, second


def models(url: str):
    try:
        status, body, _ = request(url + "/v1/models")
    except OSError:
        return None
    return body["data"][0] if status == 200 else None


def test_serve_deploy_of_the_builder_and_a_user_config_move(ray_cluster, checkpoints, tmp_path):
    first, second = checkpoints
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/lm"
    app = {"name": "raygpt", "route_prefix": "/lm", "import_path": "raygpt.serve:app",
           # strings, as `serve run raygpt.serve:app checkpoint=... max_batch_size=4` passes them
           "args": {"checkpoint": str(first), "cpus_per_replica": "1", "max_batch_size": "4", "follow": "false"}}
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}
    deploy = [SERVE, "deploy", str(tmp_path / "serve.yaml"), "-a", ray_cluster["dashboard"]]
    (tmp_path / "serve.yaml").write_text(json.dumps(config))  # JSON is YAML
    try:
        out = subprocess.run(deploy, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        card = wait_for(lambda: models(url), 180, "the deployed application")
        assert card["id"] == "demo" and card["step"] == 60
        pid = request(url + "/healthz")[1]["pid"]
        status, body, _ = request(url + "/v1/completions", {"prompt": "def", "max_tokens": 5, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1

        # another checkpoint through the deployment's user_config: reconfigure, the same replica process
        app["deployments"] = [{"name": "Completions", "user_config": {"checkpoint": str(second)}}]
        (tmp_path / "serve.yaml").write_text(json.dumps(config))
        out = subprocess.run(deploy, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: (models(url) or {}).get("step") == 90, 120, "the move to step 90")
        assert request(url + "/healthz")[1]["pid"] == pid
    finally:
        subprocess.run([SERVE, "shutdown", "-y", "-a", ray_cluster["dashboard"]], capture_output=True, timeout=120)


def test_ray_job_submit_serves_until_the_job_is_stopped(ray_cluster, checkpoints):
    first, _ = checkpoints
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    submit = [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--no-wait", "--working-dir", str(ROOT),
              "--", "python", "jobs/serve.py", str(first.parent), "--port", str(port), "serve.cpus_per_replica=1"]
    out = subprocess.run(submit, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    job = next(w.strip("'") for line in out.stdout.splitlines() for w in line.split() if w.startswith("'raysubmit_"))
    try:
        card = wait_for(lambda: models(url), 180, "the job's server")
        assert card["step"] == 90  # a run folder: its latest checkpoint
    finally:
        stop = subprocess.run([RAY, "job", "stop", "--address", ray_cluster["dashboard"], job], capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # the job removed its application as it ended: nothing answers there any more
    wait_for(lambda: models(url) is None, 60, "the application to be removed")
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_cluster["dashboard"], job], capture_output=True,
                          text=True, timeout=60).stdout
    assert "serving " in logs, logs[-3000:]
