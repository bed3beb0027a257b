"""DDP against FSDP: the bytes each rank holds for parameters, gradients and AdamW state, the peak memory of
the step, ms/step and the loss after the steps, side by side in one run.

    python bench/fsdp_memory.py [--steps 20] [--workers 1 2] [key=value ...]
    python bench/fsdp_memory.py --workers 1 train.device=cuda train.precision=bf16 [train.compile=true]

On GPUs each worker takes one GPU (NCCL), so --workers is at most the GPU count; with one GPU the FSDP row
runs the sharded code path (FSDP2, MixedPrecisionPolicy, compile over it) with nothing to shard.

Each row is a group of worker processes (torch.multiprocessing, gloo: the process group Ray Train's
TorchTrainer sets up, without the rest of Ray) running raygpt's own build_training, raygpt.parallel.shard and
train_step on random token ids. Bytes come from the tensors' local shards (raygpt.parallel.model_state_bytes,
gradients measured after a backward pass); peak memory is the process's VmHWM (RSS) after the steps, the
largest over the ranks (torch.cuda.max_memory_allocated on GPUs). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from raygpt.cluster import free_ports  # noqa: E402 (no Ray import)
from raygpt.config import ConfigError, load_config  # noqa: E402

MODEL = ["model.n_layer=8", "model.n_head=8", "model.n_embd=384", "model.block_size=256", "model.vocab_size=8192",
         "model.dropout=0.0", "train.batch_size=4", "train.device=cpu", "train.precision=fp32"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(rank: int, world: int, port: int, strategy: str, overrides: list, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(None, [*MODEL, *overrides])
    device = torch.device(f"cuda:{rank}") if cfg.train.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        from raygpt.parallel import model_state_bytes, shard
        from raygpt.runs import build_training
        from raygpt.train import autocast, resolve_precision, train_step

        torch.set_num_threads(1)
        m, b = cfg.model, cfg.train.batch_size
        precision = resolve_precision(cfg.train.precision, device)
        sharding = (lambda model: shard(model, world, None, precision)) if strategy == "fsdp" else None
        t = build_training(cfg, device, rank=rank, world=world, shard=sharding)
        model = t.model
        if strategy == "ddp" and world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(rank)

        def batches():
            while True:
                x = torch.randint(0, m.vocab_size, (b, m.block_size), generator=g).to(device)
                yield x, x

        it = batches()
        _, loss = model(*next(it))
        loss.backward()
        grads = model_state_bytes(t.model)["grads"]
        t.optimizer.zero_grad(set_to_none=True)
        amp = lambda: autocast(device, t.precision)  # noqa: E731
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = 3 if cfg.train.compile else 2
        for step in range(steps + warmup):
            dist.barrier()
            start = time.perf_counter()
            out = train_step(model, t.optimizer, t.scaler, it, 1, 1e-4, 1.0, amp)
            loss = float(out["loss"])  # waits for the device
            dist.barrier()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        held = dict(model_state_bytes(t.model, t.optimizer), grads=grads)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
        queue.put((rank, held, peak, statistics.median(times) * 1000, loss))
    finally:
        dist.destroy_process_group()


def run(strategy: str, world: int, overrides: list, steps: int) -> dict:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world, free_ports(1)[0], strategy, overrides, steps, queue), nprocs=world)
    results = [queue.get() for _ in range(world)]
    held = max(results, key=lambda r: sum(r[1].values()))[1]  # the rank that holds the most
    return {"held": held, "peak_mb": max(r[2] for r in results), "ms": max(r[3] for r in results),
            "loss": results[0][4] if world == 1 else sorted(results)[0][4]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="*", help="key=value overrides of the bench's model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    try:
        cfg = load_config(None, [*MODEL, *a.config])
    except ConfigError as e:
        print(f"fsdp_memory: error: {e}", file=sys.stderr)
        return 2
    from raygpt.model import GPT

    n = GPT(cfg.model).num_params(non_embedding=False)
    print(f"model: {cfg.model.n_layer} layers, {cfg.model.n_embd} wide, vocab {cfg.model.vocab_size}, block "
          f"{cfg.model.block_size}: {n / 1e6:.2f}M parameters; batch {cfg.train.batch_size} per worker, "
          f"{cfg.train.device}, precision {cfg.train.precision}, compile {cfg.train.compile}, 1 thread per worker, "
          f"{a.steps} timed steps; torch {torch.__version__}")
    rows = []
    for world in a.workers:
        for strategy in ("ddp", "fsdp"):
            r = run(strategy, world, a.config, a.steps)
            rows.append((strategy, world, r))
    base = {w: r["held"] for s, w, r in rows if s == "ddp"}
    print(f"\n{'strategy':>8} {'workers':>7} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'state MB':>9} "
          f"{'of DDP':>7} {'peak MB':>8} {'ms/step':>8} {'loss':>8}")
    for strategy, world, r in rows:
        h = r["held"]
        total = h["params"] + h["grads"] + h["optimizer"]
        ddp = base[world]
        share = total / (ddp["params"] + ddp["grads"] + ddp["optimizer"])
        print(f"{strategy:>8} {world:>7} {h['params'] / 1e6:>10.2f} {h['grads'] / 1e6:>9.2f} "
              f"{h['optimizer'] / 1e6:>9.2f} {total / 1e6:>9.2f} {share:>7.3f} {r['peak_mb']:>8.0f} {r['ms']:>8.1f} "
              f"{r['loss']:>8.4f}")
    print("peak MB: the process's peak RSS on CPU, torch.cuda.max_memory_allocated on GPUs; loss: rank 0's "
          "after the last step (same seeds in every row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
