"""The training core as free functions: optimizer, LR schedule, precision, one step, eval, the loop.

``train_loop`` is a plain function over an iterator of batches and a ``report`` callable. The local run
(raygpt.run) and the Ray worker (raygpt.distributed) both call it; neither re-implements a step. No Ray.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from raygpt.config import Config, OptimConfig, TrainConfig, grad_accum_steps
from raygpt.data.windows import to_device
from raygpt.parallel import is_sharded

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), each (B, T) token ids, y shifted by one

# Dense tensor-core peaks of one device, FLOP/s (vendor datasheets, no sparsity): (bf16, or fp16 where there is
# no bf16; TF32, or plain fp32 where there is no TF32). fp32 runs use the second figure. Patterns are matched
# against the whole name torch reports ("NVIDIA H100 80GB HBM3", "Tesla V100-PCIE-32GB"), in this order:
# the first that matches wins, so variants come before the family. MFU for a device not listed, or on CPU,
# needs train.peak_flops.
PEAK_FLOPS = [
    (r"H200 NVL", 835e12, 418e12),
    (r"H200", 989e12, 494e12),  # SXM
    (r"H100 NVL", 835e12, 418e12),
    (r"H100 PCIe", 756e12, 378e12),
    (r"H100", 989e12, 494e12),  # SXM ("H100 80GB HBM3")
    (r"A100", 312e12, 156e12),  # SXM4 and PCIe alike
    (r"L40S", 362e12, 183e12),
    (r"L40\b", 181e12, 90.5e12),
    (r"\bL4\b", 121e12, 60e12),
    (r"A10G", 70e12, 35e12),
    (r"\bA10\b", 125e12, 62.5e12),
    (r"RTX 4090", 165e12, 82.6e12),
    (r"V100S", 130e12, 16.4e12),  # no bf16, no TF32: fp16 tensor cores and plain fp32
    (r"V100[- ]PCIE", 112e12, 14e12),
    (r"V100", 125e12, 15.7e12),  # SXM2 / SXM3
    (r"\bT4\b", 65e12, 8.1e12),
]


# --------------------------------------------------------------------------- device and precision


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """auto: CUDA, then MPS, then CPU. A name torch does not know, or a device this machine does not have,
    is a ValueError naming ``key`` (train.device, --device)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} but CUDA is not available; use {key}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not mps:
        raise ValueError(f"{key}={name} but MPS is not available; use {key}=auto or cpu")
    return device


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0 and up (A100, H100, L4, RTX 30xx on), or ROCm.
    torch.cuda.is_bf16_supported() also says yes on V100 and T4, where torch emulates bf16 without tensor
    cores (its including_emulation=True default), and it asks about the current device, not this one."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it in hardware, fp16 (with a GradScaler) on older GPUs, fp32 elsewhere."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        if precision == "bf16" and device.type == "cuda" and not has_native_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} (compute capability "
                             f"{major}.{minor}) has no bf16 in hardware, only a slow emulation; use fp16 (or "
                             f"auto)")
        return precision
    if device.type == "cuda":
        return "bf16" if has_native_bf16(device) else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; for other precisions the scaler is disabled and passes through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def peak_flops(device: torch.device, precision: str, override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: the user's figure, else the table above, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device), precision)


def peak_of(name: str, precision: str) -> Optional[float]:
    """The PEAK_FLOPS figure for a device name, or None when no pattern matches it."""
    for pattern, half, fp32 in PEAK_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return fp32 if precision == "fp32" else half
    return None


# --------------------------------------------------------------------------- optimizer and schedule


def configure_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only: biases and LayerNorm
    parameters are 1-D and decaying them hurts. Fused kernel on CUDA."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=device.type == "cuda")


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at decay_steps (default max_steps)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = optim.decay_steps or max_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


# --------------------------------------------------------------------------- data for the local loop


class TokenBatches:
    """Random (block_size + 1)-token windows from one token array, nanoGPT style, for the local loop.

    Its position in the data is its generator's state, saved in checkpoints so a resumed run draws the
    same batches the uninterrupted one would have."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one block of {block_size} + 1; "
                             f"use more text or a smaller model.block_size")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        T = self.block_size
        ix = torch.randint(len(self.tokens) - T - 1, (self.batch_size,), generator=self.generator)
        rows = torch.stack([self.tokens[i:i + T + 1] for i in ix.tolist()])  # (B, T + 1)
        rows = to_device(rows, self.device)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------- step and eval


@dataclass
class TrainState:
    """Where a run is: restored from a checkpoint on resume."""
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: Optional[float] = None
    elapsed: float = 0.0  # training seconds before this process (for ETA across resumes)
    resumed_from: list = field(default_factory=list)  # the step of every resume (a re-run or a restart)
    extra: dict = field(default_factory=dict)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: Iterator[Batch], grad_accum: int, lr: float, grad_clip: float,
               amp_context: Callable[[], contextlib.AbstractContextManager]) -> dict:
    """One optimizer step over ``grad_accum`` micro-steps. Returns loss (mean over micro-steps) and the
    gradient norm before clipping as 0-d tensors on the device (reading them would make the host wait for
    the device: train_loop does that on log steps only), the lr, and ``data_s``, the seconds spent waiting
    for batches. Under DDP the all-reduce runs on the last micro-step only; under FSDP every micro-step
    reduce-scatters its gradients (they stay sharded) and, under HSDP, the last one all-reduces them across
    the copies."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    data_s = 0.0
    for micro_step in range(grad_accum):
        waited = time.perf_counter()
        x, y = next(batches)
        data_s += time.perf_counter() - waited
        last = micro_step == grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        if hasattr(model, "set_requires_all_reduce"):  # HSDP: across the copies, once a step
            model.set_requires_all_reduce(last)
        with sync:
            with amp_context():
                _, loss = model(x, y)
            loss_sum += loss.detach()
            scaler.scale(loss / grad_accum).backward()
    scaler.unscale_(optimizer)
    # clip_grad_norm_ returns the norm before clipping; max_norm=inf measures without clipping.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a sharded model's norm is over all shards: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / grad_accum, "grad_norm": grad_norm, "lr": lr, "data_s": data_s}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], eval_steps: int,
             amp_context: Callable[[], contextlib.AbstractContextManager], rank: int = 0, world: int = 1) -> dict:
    """Mean loss over the first ``eval_steps`` batches (fewer if the iterable runs out) and its perplexity.

    With ``world`` > 1 data-parallel ranks (torch.distributed initialized), each rank evaluates every
    world-th batch and the sums are all-reduced: every rank gets the mean over all the batches, at 1/world
    of the cost. (Every rank must call it: it is a collective.)"""
    chosen = list(itertools.islice(batches, eval_steps))
    if not chosen:
        raise ValueError("evaluation got no batches: the val split is empty")
    # Under DDP, the wrapped module: ranks run different numbers of forward passes here, and the wrapper's
    # own collectives (buffer broadcasts) must not be asked to match them up.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    device = chosen[0][0].device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch losses, batches)
    mine = chosen[rank::world]
    # A sharded model's forward is a collective (it gathers each block's weights): every rank runs as many
    # as the rank with the most batches, the extra ones not counted.
    rounds = -(-len(chosen) // world) if is_sharded(model) else len(mine)
    for i in range(rounds):
        x, y = mine[i] if i < len(mine) else chosen[0]
        with amp_context():
            _, loss = model(x, y)
        if i < len(mine):
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    model.train(was_training)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    loss_sum, count = total.tolist()
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


# --------------------------------------------------------------------------- the loop


def rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's random state: torch's CPU generator, Python's, and the generator of its own CUDA
    device only (another device's generator belongs to the process that trains on it)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    """Restore what rng_state saved, the CUDA generator into ``device``'s. (Checkpoints from before one
    state per rank hold every device's CUDA state as a list: this device's entry is taken, if there is one.)"""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's random streams (dropout, sampling): each data-parallel rank draws its own masks. A
    rank that resumes without a saved state of its own (more ranks than the checkpoint had) seeds from the
    step too, so it does not replay the masks of step 0."""
    value = (seed + 1_000_003 * rank + 998_244_353 * step) % 2**63
    torch.manual_seed(value)
    random.seed(value)


def train_loop(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               train_batches: Iterator[Batch], val_batches: Callable[[], Iterable[Batch]],
               report: Callable[..., None], state: TrainState, *, device: torch.device, precision: str,
               world_size: int = 1, rank: int = 0, flops_per_token: Optional[float] = None) -> TrainState:
    """Train from ``state.step`` to ``cfg.train.max_steps``.

    ``report(metrics, state, checkpoint)`` is called every log interval, every eval (with val_loss) and
    at the end; when ``checkpoint`` is true the caller should save one now (its interval, or the end).
    The caller owns printing, checkpoint writing and Ray: this loop only trains.
    """
    t: TrainConfig = cfg.train
    grad_accum = grad_accum_steps(t, world_size)
    tokens_per_step = t.batch_size * grad_accum * world_size * cfg.model.block_size
    peak = peak_flops(device, precision, t.peak_flops)
    amp = lambda: autocast(device, precision)  # noqa: E731 (a factory: each micro-step enters it anew)
    model.train()
    window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
    start_time = time.perf_counter() - state.elapsed
    metrics: dict = {}
    # The first step whose loss was not finite, kept on the device: checking it every step would make the
    # host wait for the device at every step (it could never queue work ahead). Checked at each report.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    while state.step < t.max_steps:
        lr = lr_at(state.step, cfg.optim, t.max_steps)
        metrics = train_step(model, optimizer, scaler, train_batches, grad_accum, lr, cfg.optim.grad_clip, amp)
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.elapsed = time.perf_counter() - start_time
        window_steps += 1
        window_data += metrics.pop("data_s")
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(metrics["loss"]), state.step, bad_step)
        done = state.step == t.max_steps
        log = state.step % t.log_interval == 0 or state.step == 1 or done
        ckpt = state.step % t.checkpoint_interval == 0 or done
        do_eval = state.step % t.eval_interval == 0 or ckpt  # every checkpoint carries its val loss
        if not (log or do_eval or ckpt):
            continue
        # The host waits for the device here, once per report, for the three numbers.
        loss, norm, bad = torch.stack([metrics["loss"].double(), metrics["grad_norm"].double(),
                                       bad_step.double()]).tolist()
        if bad >= 0:
            raise FloatingPointError(f"the loss became non-finite (nan or inf) at step {int(bad)}; lower optim.lr "
                                     f"or use precision=bf16/fp32")
        metrics.update(loss=loss, grad_norm=norm)
        now = time.perf_counter()
        step_time = (now - window_start) / window_steps
        metrics.update(step=state.step, tokens_seen=state.tokens_seen, step_time_ms=1000 * step_time,
                       tokens_per_s=tokens_per_step / step_time, elapsed_s=state.elapsed,
                       data_wait=window_data / (now - window_start))  # the share of step time spent waiting for data
        if flops_per_token and peak:
            # Per device: each device processes tokens_per_step / world_size tokens per step.
            metrics["mfu"] = flops_per_token * tokens_per_step / world_size / step_time / peak
        if do_eval:
            metrics.update(evaluate(model, val_batches(), t.eval_steps, amp, rank, world_size))
            if state.best_val_loss is None or metrics["val_loss"] < state.best_val_loss:
                state.best_val_loss = metrics["val_loss"]
        report(metrics, state, ckpt)
        # Time spent evaluating and saving is not training time: restart the speed window.
        window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
    return state

