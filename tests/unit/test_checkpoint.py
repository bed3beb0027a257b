import json
import shutil

import pytest
import torch

from raygpt.checkpoint import (CheckpointError, keep_best_checkpoints, latest_checkpoint, load_checkpoint, read_meta,
                               save_checkpoint)
from raygpt.config import ConfigError
from raygpt.generate import load
from raygpt.local import train_local
from raygpt.runs import with_vocab
from raygpt.train import TrainState

from tests.conftest import tiny_config


@pytest.fixture
def saved(tmp_path, tiny_arrays):
    """A checkpoint of a freshly built (untrained) tiny model, and that model."""
    from raygpt.model import GPT

    tok = tiny_arrays[0]
    cfg = with_vocab(tiny_config(tmp_path), tok)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    path = save_checkpoint(tmp_path / "ckpt", model, cfg, tok, train_state=TrainState(step=7, tokens_seen=70),
                           metrics={"val_loss": 1.5})
    return path, model, cfg


def test_save_then_load_gives_identical_logits(saved):
    path, model, cfg = saved
    loaded, cfg2, tok, state = load_checkpoint(path)
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    torch.testing.assert_close(loaded(x, x)[0], model(x, x)[0], rtol=0, atol=0)
    assert cfg2 == cfg and state["train"]["step"] == 7
    meta = read_meta(path)
    assert (meta["step"], meta["tokens_seen"], meta["val_loss"], meta["format_version"]) == (7, 70, 1.5, 1)
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "trainer_state.pt", "config.yaml",
                                                "tokenizer.json", "meta.json"}


def test_a_crash_mid_save_leaves_no_checkpoint(saved, monkeypatch):
    path, model, cfg = saved
    import raygpt.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.Config, "save", boom)  # dies after the weights were written
    with pytest.raises(OSError):
        save_checkpoint(path.parent / "step_000009", model, cfg, load(path).tokenizer, train_state=TrainState(step=9))
    assert not (path.parent / "step_000009").exists()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # temp dir cleaned
    assert latest_checkpoint(path.parent) == path  # the previous one is still the latest valid


def test_partial_directory_is_not_taken_for_a_checkpoint(saved):
    path, *_ = saved
    partial = path.parent / "step_000099"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    assert latest_checkpoint(path.parent) == path
    with pytest.raises(CheckpointError, match="no meta.json"):
        load(partial)


def test_keeping_the_best_checkpoints_follows_ray_trains_rule(saved, tiny_arrays):
    """Ray Train's num_to_keep scored by val_loss (min), for checkpoints written without Ray Train's controller:
    the N lowest losses and always the newest; equal losses keep the newer; a partial copy is not counted."""
    path, model, cfg = saved
    runs = path.parent / "run"
    tok = tiny_arrays[0]
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.0), (5, 2.9)]:
        save_checkpoint(runs / f"step_{step:06d}", model, cfg, tok, train_state=TrainState(step=step),
                        metrics={"val_loss": loss})
    shutil.copytree(runs / "step_000001", runs / "step_000006")  # a half-written copy: meta.json, no weights
    (runs / "step_000006" / "model.safetensors").unlink()
    keep_best_checkpoints(runs, 2)
    assert sorted(p.name for p in runs.iterdir()) == ["step_000002", "step_000004", "step_000005", "step_000006"]
    keep_best_checkpoints(runs, 5)  # fewer than N: nothing goes
    assert len(list(runs.iterdir())) == 4


def test_a_half_copied_checkpoint_is_not_taken_for_the_latest(saved):
    """What a copy to storage that died half-way leaves: every file, meta.json too, but one cut short."""
    path, *_ = saved
    half = path.parent / "step_000099"
    shutil.copytree(path, half)
    meta = json.loads((half / "meta.json").read_text())
    meta["step"] = 99
    (half / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(path.parent) == half  # whole, it would be the latest
    weights = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    assert latest_checkpoint(path.parent) == path


def test_corrupt_and_foreign_checkpoints_give_clear_errors(saved, tmp_path):
    path, *_ = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a raygpt checkpoint"):
        load(tmp_path / "empty")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)
    weights.write_bytes(data[:-4] + b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(path)
    weights.write_bytes(data)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load(path)


def test_resume_equals_uninterrupted(tmp_path, tiny_arrays):
    # dropout on: the resumed run must restore the RNG too, not only the weights and the data position
    over = ["model.dropout=0.1", "train.max_steps=30", "train.checkpoint_interval=10", "train.log_interval=1",
            "train.keep_checkpoints=5"]
    quiet = dict(print_fn=lambda s: None)
    full = train_local(tiny_config(tmp_path, "train.run_name=full", *over), tiny_arrays, **quiet)
    # An interrupted run: the same run stopped after its step-10 checkpoint (later ones never written).
    shutil.copytree(tmp_path / "full" / "step_000010", tmp_path / "cut" / "step_000010")
    resumed = train_local(tiny_config(tmp_path, "train.run_name=cut", *over), tiny_arrays, **quiet)
    losses_full = {m["step"]: m["loss"] for m in full.metrics}
    losses_resumed = {m["step"]: m["loss"] for m in resumed.metrics}
    assert sorted(losses_resumed) == list(range(11, 31))  # continued from the checkpoint, not from zero
    for step, loss in losses_resumed.items():
        assert loss == pytest.approx(losses_full[step], abs=1e-6), step
    assert losses_full[30] < losses_full[1] - 0.5  # and it learned something
    assert resumed.checkpoint.name == "step_000030"


def test_the_local_path_keeps_the_best_checkpoints_as_ray_train_does(tmp_path, tiny_arrays):
    """train.keep_checkpoints means the same on every path: the best N by val loss and the newest (Ray
    Train's CheckpointConfig), not the newest N. A run resumed from a step-10 checkpoint that scored best
    keeps it beside its newest."""
    over = ["train.max_steps=30", "train.checkpoint_interval=10", "train.eval_interval=10", "train.keep_checkpoints=1"]
    quiet = dict(print_fn=lambda s: None)
    train_local(tiny_config(tmp_path, "train.run_name=a", "train.max_steps=10", *over[1:]), tiny_arrays, **quiet)
    best = tmp_path / "b" / "step_000010"
    shutil.copytree(tmp_path / "a" / "step_000010", best)
    meta = json.loads((best / "meta.json").read_text())
    (best / "meta.json").write_text(json.dumps(dict(meta, val_loss=0.01)))  # better than any later eval
    train_local(tiny_config(tmp_path, "train.run_name=b", *over), tiny_arrays, **quiet)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_000010", "step_000030"]


def test_resume_refuses_a_different_model(tmp_path, tiny_arrays):
    train_local(tiny_config(tmp_path, "train.run_name=r", "train.max_steps=10"), tiny_arrays, print_fn=lambda s: None)
    with pytest.raises(ConfigError, match="model.n_layer was 2"):
        train_local(tiny_config(tmp_path, "train.run_name=r", "model.n_layer=3"), tiny_arrays, print_fn=lambda s: None)


def test_each_rank_draws_its_own_dropout_masks_from_the_same_weights(tmp_path):
    """Data-parallel ranks start from identical weights but must not share dropout masks (seed + rank).
    Built one after the other here, as two processes would build them."""
    from raygpt.runs import build_training

    cfg = tiny_config(tmp_path, "model.dropout=0.2", "model.vocab_size=40")
    x = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    weights, outputs = [], []
    for rank in (0, 1):
        t = build_training(cfg, torch.device("cpu"), rank=rank, world=2)
        t.model.train()
        weights.append([p.detach().clone() for p in t.model.parameters()])
        outputs.append(t.model(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not torch.allclose(outputs[0], outputs[1])  # different masks on the same input and weights


def test_a_checkpoint_holds_every_ranks_random_state_and_each_rank_takes_its_own(tmp_path, tiny_arrays):
    """Saved per rank (CPU and the rank's own device only); a resume into fewer ranks takes the states it
    can and says what it could not carry over."""
    from raygpt.runs import build_training
    from raygpt.train import rng_state, seed_rank

    cfg = tiny_config(tmp_path, "train.run_name=r", "train.max_steps=6", "train.checkpoint_interval=6")
    result = train_local(cfg, tiny_arrays, print_fn=lambda s: None)
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]["ranks"]) == 1 and "cuda" not in state["rng"]["ranks"][0]
    # The same checkpoint as two ranks would write it: rank 1's stream drawn from seed + 1.
    seed_rank(cfg.train.seed, 1)
    torch.rand(7)
    state["rng"]["ranks"].append(rng_state())
    expected_rank1 = torch.rand(5)
    model = load_checkpoint(result.checkpoint, device="cpu")[0]
    save_checkpoint(tmp_path / "two", model, cfg, result.tokenizer, optimizer=state["optimizer"],
                    train_state=TrainState(step=6), rng=state["rng"])
    cfg = with_vocab(cfg, result.tokenizer)
    t1 = build_training(cfg, torch.device("cpu"), resume=tmp_path / "two", rank=1, world=2)
    assert torch.equal(torch.rand(5), expected_rank1) and t1.note == ""  # rank 1 took rank 1's state
    t0 = build_training(cfg, torch.device("cpu"), resume=tmp_path / "two", rank=0, world=1)
    assert "holds the random state of 2 rank(s) and this run has 1" in t0.note
