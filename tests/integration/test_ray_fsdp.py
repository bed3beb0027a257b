"""ray.strategy=fsdp: FSDP2 inside real Ray Train workers (gloo on CPU), against DDP on the same data.

Every step is checkpointed, so each step's loss is in its meta.json (as in test_ray_fault_tolerance). A sharded
run's checkpoints are sharded: each worker writes its own shard (torch.distributed.checkpoint) and Ray Train
merges the workers' directories in storage."""

import json

import shutil

import pytest
import torch

import raygpt
from raygpt.checkpoint import read_meta
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


@pytest.fixture(scope="module")
def fsdp(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, run(tmp, "fsdp", "ray.strategy=fsdp")


def test_fsdp_trains_step_for_step_as_ddp(ddp, fsdp, tmp_path):
    """Same seed, same global batch, fp32: FSDP's losses equal DDP's at every step (the gradient norm is
    over all shards, so clipping matches too), with and without activation checkpointing; a checkpoint of
    the sharded run, one shard per worker, loads in a plain process and holds the same weights as DDP's."""
    ddp_dir, reference = ddp
    fsdp_dir, mine = fsdp
    same(mine, reference)
    same(run(tmp_path, "fsdp-ac", "ray.strategy=fsdp", "train.activation_checkpointing=true"), reference)
    meta = read_meta(fsdp_dir / "runs" / "fsdp" / f"step_{STEPS:06d}")
    assert meta["sharded"]["ranks"] == 2 and {"shards/__0_0.distcp", "shards/__1_0.distcp"} <= set(meta["files"])
    mine = raygpt.load(fsdp_dir / "runs" / "fsdp", device="cpu").model.state_dict()  # one plain process
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


def lrs(run_dir) -> dict[int, float]:
    return {json.loads(m.read_text())["step"]: json.loads(m.read_text())["metrics"]["lr"]
            for m in run_dir.glob("step_*/meta.json")}


def test_a_sharded_checkpoint_resumes_on_as_many_fewer_or_more_workers(ddp, fsdp, tmp_path):
    """FSDP on 2 workers -> 2: the losses after the resume are the uninterrupted run's (data position included).
    2 -> 1 and then 1 -> 2: each worker reads its new shard of the weights and AdamW state (DCP reshards; the
    exactness of that is tests/unit/test_sharded_checkpoint.py's) and the schedule carries on; the batches after
    the resume differ (the data is dealt over another number of workers), so the losses are only close: their
    mean over the steps after the resume within 0.05 of the uninterrupted run's, each step within 0.25 (one
    batch's loss moves by more than 0.1 with the batch; a lost optimizer state or weights would move all)."""
    _, reference = ddp
    fsdp_run = fsdp[0] / "runs" / "fsdp"
    shutil.copytree(fsdp_run / "step_000015", tmp_path / "runs" / "same" / "step_000015")
    same(run(tmp_path, "same", "ray.strategy=fsdp"), reference, range(16, STEPS + 1))
    assert resumed_from(tmp_path / "runs" / "same") == [15]

    want_lr = lrs(tmp_path / "runs" / "same")
    shutil.copytree(fsdp_run / "step_000015", tmp_path / "runs" / "fewer" / "step_000015")
    fewer = run(tmp_path, "fewer", "ray.strategy=fsdp", "ray.num_workers=1")
    assert read_meta(tmp_path / "runs" / "fewer" / f"step_{STEPS:06d}")["sharded"]["ranks"] == 1
    shutil.copytree(tmp_path / "runs" / "fewer" / "step_000020", tmp_path / "runs" / "more" / "step_000020")
    more = run(tmp_path, "more", "ray.strategy=fsdp")
    assert resumed_from(tmp_path / "runs" / "fewer") == [15] and resumed_from(tmp_path / "runs" / "more") == [15, 20]
    for name, got, first in (("fewer", fewer, 16), ("more", more, 21)):
        got_lr = lrs(tmp_path / "runs" / name)
        steps = range(first, STEPS + 1)
        for step in steps:
            assert got_lr[step] == pytest.approx(want_lr[step], rel=1e-9), (name, step)
            assert got[step] == pytest.approx(reference[step], abs=0.25), (name, step, got[step], reference[step])
        mean = sum(got[s] for s in steps) / len(steps)
        assert mean == pytest.approx(sum(reference[s] for s in steps) / len(steps), abs=0.05), (name, mean)


def test_a_fine_tune_on_ray_starts_from_pretrained_weights(ddp, tmp_path):
    """train.init_from under Ray (FSDP on 2 workers; the same build_training as DDP and --local): step 0, a
    fresh optimizer, and the first loss is the pretrained model's, not a fresh one's."""
    ddp_dir, reference = ddp
    losses_ft = run(tmp_path, "ft", "ray.strategy=fsdp", f"train.init_from={ddp_dir / 'runs' / 'ddp'}")
    assert losses_ft[1] < reference[1] - 0.5 and abs(losses_ft[1] - reference[STEPS]) < 0.3
    assert resumed_from(tmp_path / "runs" / "ft") == []


def test_lora_on_two_ddp_workers_trains_only_the_adapters(ddp, tmp_path):
    """finetune.method=lora under Ray, 2 DDP workers: the frozen weights in every checkpoint are the
    pretrained ones bit for bit, the adapters move, and the loss goes on from the pretrained model's."""
    from safetensors.torch import load_file

    ddp_dir, reference = ddp
    pretrained = ddp_dir / "runs" / "ddp" / f"step_{STEPS:06d}"
    got = run(tmp_path, "lora", "finetune.method=lora", "lora.r=4", "optim.lr=1e-2", f"train.init_from={pretrained}")
    assert abs(got[1] - reference[STEPS]) < 0.3
    before = load_file(str(pretrained / "model.safetensors"))
    for step in (1, STEPS):
        ckpt = tmp_path / "runs" / "lora" / f"step_{step:06d}"
        after = load_file(str(ckpt / "model.safetensors"))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapters = load_file(str(tmp_path / "runs" / "lora" / f"step_{STEPS:06d}" / "adapter.safetensors"))
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0


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
