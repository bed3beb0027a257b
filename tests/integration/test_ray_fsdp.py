"""ray.strategy=fsdp: FSDP2 inside real Ray Train workers (gloo on CPU), against DDP on the same data.

Every step is checkpointed, so each step's loss is in its meta.json (as in test_ray_fault_tolerance), and
every checkpoint of a sharded run is gathered into the same single-file format DDP writes."""

import shutil

import pytest
import torch

import raygpt
from raygpt.config import ConfigError
from raygpt.distributed import train

from tests.integration.test_ray_fault_tolerance import losses, resumed_from
from tests.integration.test_ray_train import tiny

STEPS = 30
EVERY_STEP = [f"train.max_steps={STEPS}", "optim.warmup_steps=2", "train.checkpoint_interval=1",
              "train.log_interval=1", "train.eval_interval=10", "train.eval_steps=3", f"train.keep_checkpoints={STEPS}",
              "ray.num_workers=2", "train.global_batch_size=32"]  # 2 micro-steps per worker: accumulation too


def run(tmp_path, name: str, *over) -> dict[int, float]:
    result = train(tiny(tmp_path, *EVERY_STEP, f"train.run_name={name}", *over), print_fn=lambda s: None)
    assert result.error is None and result.metrics["step"] == STEPS
    return losses(tmp_path / "runs" / name)


def same(mine: dict, reference: dict, steps=range(1, STEPS + 1)) -> None:
    for step in steps:
        assert mine[step] == pytest.approx(reference[step], abs=1e-5), (step, mine[step], reference[step])


@pytest.fixture(scope="module")
def ddp(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, run(tmp, "ddp")


def test_fsdp_trains_step_for_step_as_ddp(ddp, tmp_path):
    """Same seed, same global batch, fp32: FSDP's losses equal DDP's at every step (the gradient norm is
    over all shards, so clipping matches too), with and without activation checkpointing; a checkpoint of
    the sharded run loads in a plain process and holds the same weights as DDP's."""
    ddp_dir, reference = ddp
    same(run(tmp_path, "fsdp", "ray.strategy=fsdp"), reference)
    same(run(tmp_path, "fsdp-ac", "ray.strategy=fsdp", "train.activation_checkpointing=true"), reference)
    mine = raygpt.load(tmp_path / "runs" / "fsdp", device="cpu").model.state_dict()
    theirs = raygpt.load(ddp_dir / "runs" / "ddp", device="cpu").model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shard_size", [1, 2])
def test_hybrid_sharding_meshes(ddp, tmp_path, shard_size):
    """ray.fsdp_shard_size on 2 workers: 2x1 (two replicas, nothing sharded) and 1x2 (one copy sharded over
    both), each a 2-D (replicate, shard) mesh; both train as DDP does."""
    _, reference = ddp
    same(run(tmp_path, f"hsdp{shard_size}", "ray.strategy=fsdp", f"ray.fsdp_shard_size={shard_size}"), reference)


def test_checkpoints_move_between_ddp_and_fsdp(ddp, tmp_path):
    """A DDP checkpoint resumes under FSDP and an FSDP one under DDP: weights, optimizer state (split over
    the shards, then gathered back), schedule and data position carry over; the losses after the resume
    are the uninterrupted run's."""
    ddp_dir, reference = ddp
    for name, strategy in (("to-fsdp", "fsdp"), ("to-ddp", "ddp")):
        shutil.copytree(ddp_dir / "runs" / "ddp" / "step_000015", tmp_path / "runs" / name / "step_000015")
        same(run(tmp_path, name, f"ray.strategy={strategy}"), reference, range(16, STEPS + 1))
        assert resumed_from(tmp_path / "runs" / name) == [15]
    # the FSDP run's own step-20 checkpoint, back under DDP
    shutil.copytree(tmp_path / "runs" / "to-fsdp" / "step_000020", tmp_path / "runs" / "back" / "step_000020")
    same(run(tmp_path, "back", "ray.strategy=ddp"), reference, range(21, STEPS + 1))


@pytest.mark.parametrize("over, says", [
    (["ray.strategy=zero3"], "ray.strategy"),
    (["ray.strategy=fsdp", "ray.fsdp_shard_size=3"], "ray.fsdp_shard_size=3 does not divide ray.num_workers=2"),
    (["ray.fsdp_shard_size=2"], "ray.fsdp_shard_size=2 needs ray.strategy=fsdp"),
    (["ray.strategy=fsdp", "ray.num_workers=0"], "ray.strategy=fsdp needs Ray Train workers"),
    (["ray.strategy=fsdp", "train.precision=fp16"], "not fp16"),
])
def test_bad_fsdp_settings_are_one_line_before_anything_starts(tmp_path, over, says):
    with pytest.raises(ConfigError, match=says):
        tiny(tmp_path, "ray.num_workers=2", *over)
