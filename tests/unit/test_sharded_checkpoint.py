"""Sharded checkpoints (torch.distributed.checkpoint) in real processes: gloo ranks, no Ray.

Each rank saves into a directory of its own, as in a Ray Train worker; the test merges them into one, as Ray
Train does in storage. The weights and AdamW state that come back, in a plain process, through `raygpt
export` and into 1 or 2 ranks (DCP reshards), are compared bit for bit with the ones that were saved."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import raygpt
from raygpt.checkpoint import (CheckpointError, export_checkpoint, latest_checkpoint, load_checkpoint, read_meta,
                               verify)
from raygpt.cli import main
from raygpt.cluster import free_ports
from raygpt.config import load_config
from raygpt.runs import skipped_lines

# Odd sizes, so that FSDP2 splits some dim 0 unevenly (vocab 51, block 17) and pads.
MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=17", "model.vocab_size=51",
         "model.dropout=0.0", "train.device=cpu", "optim.lr=1e-2"]
TEXT = "".join(chr(ord("!") + i) for i in range(51))  # a char tokenizer of exactly 51 ids


def whole(model, optimizer) -> tuple[dict, dict]:
    """Weights and optimizer state, whole, keyed by parameter name (a collective for a sharded model)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    weights = {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, {name: {k: v.clone() for k, v in s.items()} for name, s in optim["state"].items()}


def ranks(rank: int, world: int, port: int, save_to, resume, out, device: str = "cpu") -> None:
    """Train 3 steps (or resume) as rank ``rank`` of a sharded model, report the whole state, then save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        from raygpt.checkpoint import save_checkpoint
        from raygpt.parallel import shard
        from raygpt.runs import build_training
        from raygpt.tokenizer import train_tokenizer
        from raygpt.train import autocast, train_step

        torch.set_num_threads(1)
        cfg = load_config(None, [*MODEL, f"train.device={device}", "train.precision=auto"])
        on = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
        t = build_training(cfg, on, resume=Path(resume) if resume else None, rank=rank,
                           world=world, shard=lambda m: shard(m, world, None, "bf16" if device == "cuda" else "fp32"))
        if resume is None:
            g = torch.Generator().manual_seed(rank)
            batches = iter(lambda: (torch.randint(0, 51, (2, 17), generator=g).to(on),) * 2, None)
            for _ in range(3):
                train_step(t.model, t.optimizer, t.scaler, batches, 1, 1e-2, 1.0, lambda: autocast(on, t.precision))
                t.state.step += 1
        state = whole(t.model, t.optimizer)
        if rank == 0:
            torch.save(({k: v.cpu() for k, v in state[0].items()},
                        {n: {k: v.cpu() for k, v in m.items()} for n, m in state[1].items()}, t.state.step, t.note), out)
        if save_to is not None:
            save_checkpoint(Path(save_to) / f"rank{rank}", t.model, cfg, train_tokenizer("char", [TEXT]),
                            optimizer=t.optimizer, train_state=t.state,
                            metrics={"val_loss": 2.5})
    finally:
        dist.destroy_process_group()


def spawn(world: int, save_to=None, resume=None, device: str = "cpu"):
    """Run ``ranks`` in ``world`` processes: ((weights, optimizer state), step, resume note) of rank 0, which
    come back through a file (a queue's pipe would fill up before mp.spawn returns and the parent reads it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.pt"
        mp.spawn(ranks, args=(world, free_ports(1)[0], save_to, resume, str(out), device), nprocs=world)
        weights, optim, step, note = torch.load(out, weights_only=True)
        return (weights, optim), step, note


def merge(folder: Path, world: int) -> Path:
    """What Ray Train does with the ranks' checkpoint directories: one directory in storage."""
    out = folder / "step_000003"
    for rank in range(world):
        shutil.copytree(folder / f"rank{rank}", out, dirs_exist_ok=True)
    return out


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    assert got[0].keys() == want[0].keys() and got[1].keys() == want[1].keys()
    for key in want[0]:
        assert torch.equal(got[0][key], want[0][key]), key
    for name in want[1]:
        for k in want[1][name]:
            assert torch.equal(got[1][name][k], want[1][name][k]), (name, k)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A sharded checkpoint written by 2 ranks, and the whole state they saved."""
    folder = tmp_path_factory.mktemp("sharded")
    saved, step, _ = spawn(2, save_to=folder)
    return merge(folder, 2), saved, step


def test_every_rank_writes_its_shard_and_meta_lists_them_all(two_ranks):
    ckpt, _, step = two_ranks
    meta = read_meta(ckpt)
    assert (meta["step"], meta["format_version"], meta["sharded"]["ranks"]) == (step, 2, 2)
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp", "shards/.metadata", "trainer_state.pt", "config.yaml",
            "tokenizer.json"} <= set(meta["files"])
    assert not (ckpt / "model.safetensors").exists()
    verify(ckpt)


def test_a_plain_process_loads_it_and_export_consolidates_it(two_ranks, tmp_path):
    ckpt, (weights, optim), _ = two_ranks
    gen = raygpt.load(ckpt, device="cpu")  # no process group here
    for key, value in gen.model.state_dict().items():
        assert torch.equal(value, weights[key if key != "lm_head.weight" else "transformer.wte.weight"]), key
    assert isinstance(gen.generate("!", max_new_tokens=5, seed=0), str)

    assert main(["export", str(ckpt.parent), str(tmp_path / "one")]) == 0  # a run folder: its latest
    meta = read_meta(tmp_path / "one")
    assert (meta["format_version"], meta["step"], meta["val_loss"]) == (1, 3, 2.5) and "sharded" not in meta
    model, _, _, state = load_checkpoint(tmp_path / "one")
    assert all(torch.equal(v, gen.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert len(state["optimizer"]["state"]) == len(optim)  # every parameter's moments (checked exactly below)

    export_checkpoint(ckpt, tmp_path / "light", weights_only=True)
    assert "optimizer" not in load_checkpoint(tmp_path / "light")[3]
    from raygpt.runs import build_training

    t = build_training(load_config(None, MODEL), torch.device("cpu"), resume=tmp_path / "light")
    assert t.state.step == 3 and "no optimizer state (a weights-only export)" in t.note  # said, not silent


@pytest.mark.parametrize("world", [1, 2])
def test_resumes_into_any_number_of_ranks_exactly(two_ranks, world):
    """2 -> 1 and 2 -> 2: each rank reads its own pieces (DCP reshards); weights and AdamW state are the saved
    ones bit for bit, the step too."""
    ckpt, saved, step = two_ranks
    got, got_step, note = spawn(world, resume=str(ckpt))
    assert_same(got, saved)
    assert got_step == step


def test_one_rank_to_two_and_through_a_single_file_export(tmp_path):
    """1 -> 2, and an exported (single-file) copy of a sharded checkpoint resumes sharded too."""
    saved, step, _ = spawn(1, save_to=tmp_path)
    ckpt = merge(tmp_path, 1)
    assert_same(spawn(2, resume=str(ckpt))[0], saved)
    export_checkpoint(ckpt, tmp_path / "exported" / "step_000003")
    assert_same(spawn(2, resume=str(tmp_path / "exported" / "step_000003"))[0], saved)


def test_a_missing_or_cut_rank_file_is_named_never_loaded(two_ranks, tmp_path, capsys):
    ckpt, _, _ = two_ranks
    broken = tmp_path / "run" / "step_000003"
    shutil.copytree(ckpt, broken)
    (broken / "shards" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"missing shards/__1_0.distcp, one of the 2 ranks' files"):
        raygpt.load(broken, device="cpu")
    assert latest_checkpoint(broken.parent) is None  # never taken for a good one, and a resume says so
    assert skipped_lines(broken.parent) == ["resume: skipped step_000003: shards/__1_0.distcp is missing (a save "
                                            "or copy that did not finish; never resumed from)"]
    assert main(["export", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing shards/__1_0.distcp" in err[0] and not (tmp_path / "out").exists()

    shutil.copy(ckpt / "shards" / "__1_0.distcp", broken / "shards" / "__1_0.distcp")
    data = (broken / "shards" / "__1_0.distcp").read_bytes()
    (broken / "shards" / "__1_0.distcp").write_bytes(data[: len(data) // 2])  # an upload cut half-way
    with pytest.raises(CheckpointError, match="__1_0.distcp is truncated"):
        raygpt.load(broken, device="cpu")
    assert latest_checkpoint(broken.parent) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_same_holds(tmp_path):
    """NCCL, bf16 compute with fp32 master weights (MixedPrecisionPolicy), one GPU: save, load in a plain
    process on the CPU, resume on the GPU; the fp32 weights and AdamW state are the saved ones bit for bit."""
    saved, step, _ = spawn(1, save_to=tmp_path, device="cuda")
    ckpt = merge(tmp_path, 1)
    plain = raygpt.load(ckpt, device="cpu").model.state_dict()
    assert all(torch.equal(plain[k], saved[0][k]) for k in saved[0])
    assert_same(spawn(1, resume=str(ckpt), device="cuda")[0], saved)
