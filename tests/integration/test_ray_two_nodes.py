"""A real two-node Ray cluster on this machine: the session's head plus a second node (`ray start --address`,
its own raylet, its own CPUs). Training places one worker on each node; losing the second node mid-run
ends the run with an error, never a hang."""

import threading
import time

import ray
import pytest
from ray.util.state import list_actors

from raygpt.distributed import train

from tests.integration.test_ray_train import tiny


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def second_node(ray_cluster):
    # A second raylet in a session of its own (free ports, the head's temp dir): stopping it ends this
    # node's processes only (`ray stop` would stop every Ray process on the machine, the head too).
    cluster = ray_cluster["cluster"]
    proc = cluster.add_node(num_cpus=2, resources='{"second_node": 1}')
    try:
        wait_for(lambda: len(alive_nodes()) == 2, 120, "the second node to join")
        yield proc
    finally:
        cluster.stop_node(proc)
        wait_for(lambda: len(alive_nodes()) == 1, 120, "the second node to leave")


def test_workers_on_two_nodes_then_losing_one_fails_cleanly(ray_cluster, second_node, tmp_path):
    # 2 CPUs per worker and 2 CPUs per node: one worker on each node.
    over = ["ray.num_workers=2", "ray.cpus_per_worker=2", "ray.threads_per_worker=1", "train.max_steps=20",
            "train.checkpoint_interval=20", "train.eval_interval=20"]
    def train_workers():
        return list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)

    earlier = {a.actor_id for a in train_workers()}  # other tests' workers, on this session's cluster
    result = train(tiny(tmp_path, *over, "train.run_name=spread"), print_fn=lambda s: None)
    assert result.error is None and result.metrics["step"] == 20
    mine = [a for a in train_workers() if a.actor_id not in earlier]
    assert len(mine) == 2 and len({a.node_id for a in mine}) == 2, mine  # one worker on each node

    # Now a long run, and the second node goes away under it.
    outcome = {}

    def run():
        try:
            outcome["result"] = train(tiny(tmp_path, *over, "train.run_name=lost", "train.max_steps=100000",
                                           "train.checkpoint_interval=100000", "train.eval_interval=100000"),
                                      print_fn=lambda s: None)
        except Exception as e:  # noqa: BLE001 (what the caller of train sees is the point)
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: any(a.state == "ALIVE" and a.node_id != ray.get_runtime_context().get_node_id()
                         for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)),
             180, "a training worker on the second node")
    time.sleep(5)  # training is under way
    ray_cluster["cluster"].stop_node(second_node, timeout=2)  # the node's processes go, the head stays
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run hung after losing a node"
    error = outcome.get("error") or outcome["result"].error
    assert error is not None, "the run went on with a worker missing"
    assert "worker" in str(error).lower() or "node" in str(error).lower(), str(error)
