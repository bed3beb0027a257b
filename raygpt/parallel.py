"""Sharded data parallelism (FSDP2) and activation checkpointing, applied to a GPT from outside.

No Ray here: the functions take an initialized torch.distributed process group (Ray Train's TorchTrainer
sets it up in each worker; the same code runs on CPU with gloo and on GPUs with NCCL).

    model = shard(model, world=4, shard_size=2, precision="bf16")   # HSDP: 2 groups of 2, each sharded
    save_shards(directory, model, optimizer)                      # every rank its own file (DCP)

Each transformer block is one FSDP unit; the root unit holds the rest (wte, wpe, ln_f and lm_head, whose
weight is wte's when tied: the pair must share a unit). Parameter names do not change, so state dicts, the
optimizer's decay groups and checkpoints look as they do without sharding.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")


def is_sharded(model: nn.Module) -> bool:
    """A model (or its root unit) under FSDP2."""
    return hasattr(model, "set_requires_gradient_sync")


def shard(model: nn.Module, world: int, shard_size: Optional[int], precision: str) -> nn.Module:
    """fully_shard every block, then the root, on a 1-D mesh (shard over all ranks) or, with shard_size given,
    a 2-D (replicate, shard) mesh of world/shard_size x shard_size: HSDP, each group of shard_size ranks holds
    one sharded copy, and the groups' gradients are all-reduced.
    Parameters stay fp32 (the optimizer's master copy); under bf16 the gathered ones are cast for compute
    and gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device.type
    mesh = (init_device_mesh(device, (world,)) if shard_size is None else
            init_device_mesh(device, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard")))
    half = {"bf16": torch.bfloat16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing: each block keeps only its input in the forward pass and recomputes the
    rest in backward. The block's forward is replaced on the instance (no wrapper module), so parameter
    names, and with them saved state, are unchanged. Under no_grad (eval, generation) nothing changes."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        def forward(*args, _inner=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward
    return model


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor's whole value (a sharded model's gradient norm), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _tensors(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """What a sharded checkpoint holds, in torch.distributed.checkpoint's layout: the model's state (the local
    shards of a sharded model, plain tensors otherwise) and the optimizer's, keyed by parameter name, so a
    checkpoint loads into any sharding of the same model. A tied weight is stored once, under its first name
    (lm_head.weight is wte's)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    seen, weights = set(), {}
    for name, value in get_model_state_dict(model).items():
        if id(value) not in seen:
            seen.add(id(value))
            weights[name] = value
    out = {"model": weights}
    if optimizer is not None:
        # An optimizer that has not stepped yet gets its state made here (a step with zero gradients and lr 0),
        # for the load to fill.
        out["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return out


def save_shards(directory, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """torch.distributed.checkpoint: every rank writes its own shard of the model and optimizer state into its
    ``directory`` (a file per rank; rank 0 also writes the index, .metadata). A collective when the model is
    sharded: every rank calls it, each with a directory of its own or one shared by all."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_tensors(model, optimizer), storage_writer=dcp.FileSystemWriter(str(directory)),
             no_dist=not is_sharded(model))


def load_shards(directory, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load what save_shards wrote, whatever the sharding then and now: into a sharded model each rank reads the
    pieces of its own shard (a collective), into a plain model (one process, no process group needed, or each
    DDP rank alone) everything. DCP reshards, so a checkpoint of N ranks loads into M."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = _tensors(model, optimizer)
    with warnings.catch_warnings():
        # DCP warns that it "assumes the intent is to load in a single process" when there is no process group:
        # it is the intent (raygpt.load, raygpt export).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=not is_sharded(model))
    # the tied lm_head.weight is wte's and was loaded with it (strict=False lets it be absent)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an ``optimizer.state_dict()`` written without sharding (a single-file checkpoint's) into the optimizer of
    a sharded model: each rank keeps its own shard of every moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {names[i]: value for i, value in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def model_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state (a sharded tensor's local shard).
    A sharded model is resharded first: FSDP2 leaves the root unit's weights gathered after a forward pass
    without backward (an eval), and those would count whole."""
    if hasattr(model, "reshard"):
        model.reshard()

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list({id(p): p for p in model.parameters()}.values())
    out = {"params": sum(local(p) for p in params),
           "grads": sum(local(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(local(v) for s in optimizer.state.values() for v in s.values()
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out
