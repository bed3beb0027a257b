"""Not part of the suite (no test_ prefix, so pytest does not collect it): test_ray_isolation runs it in a
pytest of its own, to watch what the session's cluster fixture does to the machine when a test passes,
fails or is killed."""

import json
import os
import time
from pathlib import Path

import ray


@ray.remote
def one() -> int:
    return 1


def test_probe(ray_cluster):
    cluster = ray_cluster["cluster"]
    info = {"sessions": [p.pid for p in cluster.nodes], "temp_dir": cluster.temp_dir}
    Path(os.environ["RAYGPT_PROBE_OUT"]).write_text(json.dumps(info))
    assert ray.get(one.remote()) == 1  # a worker process too, not only the head's
    mode = os.environ.get("RAYGPT_PROBE_MODE", "pass")
    assert mode != "fail", "this probe fails on purpose"
    if mode == "hang":
        time.sleep(600)  # until test_ray_isolation kills this pytest
