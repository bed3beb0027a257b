"""One real Ray cluster for the whole test session: `ray start --head` on loopback with 2 CPUs, which
driver-side tests join with ray.init(address=...) and job tests submit to. Stopped at the end."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT, DASHBOARD_PORT = 6389, 8275
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"

# The session's cluster runs with Ray's token authentication, as a shared cluster should: a fresh token
# for this session, in the environment of every side (the head, this driver, `ray job` CLI calls), so a
# stale ~/.ray/auth_token plays no part. test_ray_train checks that a submission without it is refused.
# (Test modules import this file again under its package name: the second import must keep the token.)
TOKEN = os.environ.setdefault("RAYGPT_TEST_RAY_TOKEN", secrets.token_hex(32))
ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       # `python` in submitted jobs must be this interpreter
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# Now, not in the fixture: Ray reads its auth mode when it is first imported, which test modules do.
os.environ.update(ENV)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.update(ENV)
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env={**os.environ}, timeout=120)
    out = subprocess.run([RAY, "start", "--head", "--num-cpus=2", f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true", "--disable-usage-stats"],
                         capture_output=True, text=True, env={**os.environ}, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        ray.init(address=f"127.0.0.1:{GCS_PORT}", logging_config=ray.LoggingConfig(log_level="WARNING"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield {"address": f"127.0.0.1:{GCS_PORT}", "dashboard": DASHBOARD}
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)

