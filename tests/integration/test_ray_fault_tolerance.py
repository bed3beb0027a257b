"""Runs that survive a dead worker, resume exactly, and never take a half-written checkpoint for a good one.

Real processes throughout: ray.fail_at_step makes a worker os._exit() at a chosen step (once per run),
Ray Train restarts the worker group from the latest checkpoint (ray.max_failures) or the run fails and
the same command resumes it. Every step is checkpointed, so each step's loss is in its meta.json."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import raygpt
from raygpt.checkpoint import latest_checkpoint, load_checkpoint, verify
from raygpt.cli import main
from raygpt.distributed import train
from raygpt.local import train_local

from tests.integration.test_ray_train import TINY, tiny

# Dropout on: each rank draws its own masks, so a resume is exact only if every rank gets its own RNG back.
EVERY_STEP = ["train.max_steps=10", "optim.warmup_steps=2", "train.checkpoint_interval=1", "train.log_interval=1",
              "train.eval_interval=10", "train.eval_steps=1", "train.keep_checkpoints=20", "model.dropout=0.2"]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for meta in run.glob("step_*/meta.json"):
        m = json.loads(meta.read_text())
        out[m["step"]] = m["metrics"]["loss"]
    return out


def resumed_from(run: Path) -> list[int]:
    *_, state = load_checkpoint(latest_checkpoint(run), device="cpu")
    return state["train"]["resumed_from"]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """The reference: 2 workers, 10 steps, no failure; (its run folder, its losses by step)."""
    tmp = tmp_path_factory.mktemp("reference")
    result = train(tiny(tmp, *EVERY_STEP, "ray.num_workers=2", "train.run_name=ref"), print_fn=lambda s: None)
    assert result.error is None
    run = tmp / "runs" / "ref"
    assert sorted(losses(run)) == list(range(1, 11)) and resumed_from(run) == []
    return run, losses(run)


@pytest.fixture(scope="module")
def uninterrupted(reference):
    return reference[1]


def assert_same_losses(run: Path, reference: dict, from_step: int) -> None:
    mine = losses(run)
    for step in range(from_step, 11):
        assert mine[step] == pytest.approx(reference[step], abs=1e-5), (step, mine[step], reference[step])


def test_a_killed_worker_restarts_from_the_checkpoint_and_finishes(uninterrupted, tmp_path):
    cfg = tiny(tmp_path, *EVERY_STEP, "ray.num_workers=2", "train.run_name=ft", "ray.fail_at_step=7",
               "ray.fail_rank=1", "ray.max_failures=1")
    result = train(cfg, print_fn=lambda s: None)
    assert result.error is None
    run = tmp_path / "runs" / "ft"
    assert (run / ".fault-injected-step-rank1-step7").exists()  # it did die
    assert result.metrics["step"] == 10 and result.metrics["tokens_seen"] == 10 * 2 * 8 * 32
    assert resumed_from(run) == [6]  # restarted from the last checkpoint written (step 6), not from zero
    assert_same_losses(run, uninterrupted, 7)  # and exactly as if nothing had happened


def test_an_interrupted_run_resumes_exactly(uninterrupted, tmp_path, capsys):
    over = [*EVERY_STEP, "ray.num_workers=2", "train.run_name=resume"]
    # Through the command line: no restarts allowed, so the run fails, and says what to do next.
    assert main(["train", *TINY, f"train.out_dir={tmp_path / 'runs'}", f"data.prepared_dir={tmp_path / 'prepared'}",
                 *over, "ray.fail_at_step=5", "ray.fail_rank=1"]) == 1
    err = capsys.readouterr().err
    assert "the run 'resume' failed" in err and "the same command resumes from the newest" in err, err
    run = tmp_path / "runs" / "resume"
    assert read_step(latest_checkpoint(run)) == 4
    result = train(tiny(tmp_path, *over), print_fn=lambda s: None)  # the same command again
    assert result.error is None and result.metrics["step"] == 10
    assert resumed_from(run) == [4]
    assert_same_losses(run, uninterrupted, 5)  # model, optimizer, LR schedule, RNG and data order resumed


def read_step(ckpt: Path) -> int:
    return json.loads((ckpt / "meta.json").read_text())["step"]


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(ray_cluster, tmp_path):
    over = [*EVERY_STEP, "ray.num_workers=1", "train.run_name=crash", "train.max_steps=6"]
    with pytest.raises(Exception, match="exit|died|failed|Worker"):
        train(tiny(tmp_path, *over, "ray.fail_at_step=5", "ray.fail_in=checkpoint"), print_fn=lambda s: None)
    run = tmp_path / "runs" / "crash"
    partial = run / "step_000005"
    assert (partial / "meta.json").is_file()  # the half-copied checkpoint is there, meta.json and all
    with pytest.raises(Exception, match="truncated"):
        verify(partial)
    assert latest_checkpoint(run).name == "step_000004"  # but it is never taken for the latest
    assert raygpt.load(run, device="cpu").generate("x", max_new_tokens=3, seed=0) is not None
    result = train(tiny(tmp_path, *over), print_fn=lambda s: None)
    assert result.error is None and result.metrics["step"] == 6
    assert resumed_from(run) == [4]
    verify(partial)  # written again, whole


def test_a_checkpoint_of_two_workers_resumes_in_one_worker_and_locally(reference, tmp_path):
    """Each rank's random state is saved; a run resumed by fewer ranks takes what it can, says what it
    could not carry over, and trains on (Ray with 1 worker, and --local in this process)."""
    run, _ = reference
    state = torch.load(run / "step_000006" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]["ranks"]) == 2  # rank 0's and rank 1's
    assert not torch.equal(state["rng"]["ranks"][0]["torch"], state["rng"]["ranks"][1]["torch"])
    for name in ("one", "local"):
        shutil.copytree(run / "step_000006", tmp_path / "runs" / name / "step_000006")
    lines = []
    result = train(tiny(tmp_path, *EVERY_STEP, "ray.num_workers=1", "train.run_name=one"), print_fn=lines.append)
    assert result.error is None and result.metrics["step"] == 10 and resumed_from(tmp_path / "runs" / "one") == [6]
    lines = []
    local = train_local(tiny(tmp_path, *EVERY_STEP, "train.run_name=local", "train.device=cpu"), print_fn=lines.append)
    assert local.metrics[-1]["step"] == 10 and resumed_from(tmp_path / "runs" / "local") == [6]
    assert any(line.startswith("resume: the checkpoint holds the random state of 2 rank(s) and this run has 1")
               for line in lines), lines


def test_local_mode_trains_as_one_worker_does_and_resumes_exactly(reference, tmp_path):
    """ray.num_workers=0 is Ray Train's local mode (the train function in this process, no worker actors): it
    writes its checkpoints itself, takes the batches and random draws of a 1-worker run, and resumes from its
    own checkpoints exactly."""
    one = train(tiny(tmp_path, *EVERY_STEP, "train.run_name=one"), print_fn=lambda s: None)
    result = train(tiny(tmp_path, *EVERY_STEP, "ray.num_workers=0", "train.run_name=local"), print_fn=lambda s: None)
    run = tmp_path / "runs" / "local"
    assert Path(result.checkpoint.path) == run / "step_000010" and result.metrics["step"] == 10
    assert sorted(losses(run)) == list(range(1, 11))
    assert_same_losses(run, losses(Path(one.path)), 1)
    for step in range(6, 11):  # as if the process had died after step 5
        shutil.rmtree(run / f"step_{step:06d}")
    again = train(tiny(tmp_path, *EVERY_STEP, "ray.num_workers=0", "train.run_name=local"), print_fn=lambda s: None)
    assert again.metrics["step"] == 10 and resumed_from(run) == [5]
    assert_same_losses(run, losses(Path(one.path)), 6)
    verify(latest_checkpoint(run))
