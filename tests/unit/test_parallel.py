"""raygpt.parallel in real processes: 2 ranks, gloo, no Ray. The bytes each rank holds for parameters,
gradients and AdamW state are measured from the tensors' local shards and compared with the formulas of
bench/scaling_plan.py (which docs/scaling.md's tables come from)."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raygpt.cluster import free_ports
from raygpt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.scaling_plan import planned_state_bytes as planned  # noqa: E402

# Odd sizes, so that FSDP2 splits some dim 0 unevenly (vocab 51, block 17) and pads.
MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=17", "model.vocab_size=51",
         "model.dropout=0.0", "train.device=cpu"]


def measure(rank: int, world: int, port: int, strategy: str, shard_size, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from raygpt.parallel import checkpoint_blocks, model_state_bytes, shard
        from raygpt.runs import build_training

        torch.set_num_threads(1)
        cfg = load_config(None, MODEL)
        sharding = (lambda m: shard(m, world, shard_size, "fp32")) if strategy == "fsdp" else None
        t = build_training(cfg, torch.device("cpu"), rank=rank, world=world, shard=sharding)
        x = torch.randint(0, 51, (2, 17), generator=torch.Generator().manual_seed(rank))
        _, loss = t.model(x, x)
        loss.backward()
        grads = model_state_bytes(t.model)["grads"]
        t.optimizer.step()
        got = dict(model_state_bytes(t.model, t.optimizer), grads=grads)
        names = [n for n, _ in checkpoint_blocks(load_training_model(cfg)).named_parameters()]
        queue.put((rank, got, names))
    finally:
        dist.destroy_process_group()


def load_training_model(cfg):
    from raygpt.model import GPT

    return GPT(cfg.model)


@pytest.mark.parametrize("strategy, shard_size", [("ddp", None), ("fsdp", None), ("fsdp", 1), ("fsdp", 2)])
def test_each_rank_holds_what_the_scaling_plan_says(strategy, shard_size):
    world = 2
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(measure, args=(world, free_ports(1)[0], strategy, shard_size, queue), nprocs=world)
    results = sorted(queue.get() for _ in range(world))
    cfg = load_config(None, MODEL)
    whole = planned(cfg, "ddp", world)
    for rank, got, names in results:
        want = planned(cfg, strategy, world, shard_size, rank=rank)
        assert {k: got[k] for k in ("params", "grads", "optimizer")} == \
               {k: want[k] for k in ("params", "grads", "optimizer")}, (rank, got, want)
        if strategy == "fsdp" and shard_size != 1:  # sharded over 2: about half of the whole, padding aside
            total = got["params"] + got["grads"] + got["optimizer"]
            assert total <= whole["total"] / world * 1.05, (total, whole["total"])
        # activation checkpointing replaces forward on the instance: no wrapper, no renamed parameters
        assert names == [n for n, _ in load_training_model(cfg).named_parameters()]
