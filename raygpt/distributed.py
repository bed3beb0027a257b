"""The Ray Train boundary: a thin per-worker ``train_func`` around raygpt.train.train_loop, and the
TorchTrainer wiring around it. Model, step, checkpoint format: all from the core, nothing re-implemented.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raygpt.checkpoint import save_checkpoint
from raygpt.config import Config, ConfigError, config_from_dict
from raygpt.data.pipeline import load_manifest, prepare, prepared_tokenizer, shard_paths
from raygpt.data.windows import batches
from raygpt.runs import build_training, format_progress, name_run, with_vocab
from raygpt.train import rng_state, train_loop

ROWS_PER_READ = 16  # Parquet rows (4096 tokens each) per Ray Data batch
WINDOW_SHUFFLE = 4096  # windows in each worker's shuffle buffer
ROW_SHUFFLE = 64  # rows in Ray Data's local shuffle buffer


# --------------------------------------------------------------------------- on each worker


def _train_batches(cfg: Config, position: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) batches from this worker's shard of the train split, reshuffled every epoch.
    ``position["epoch"]`` is where to start and, as it runs, the epoch being read (saved in checkpoints)."""
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    for epoch in itertools.count(position.get("epoch", 0)):
        position["epoch"] = epoch
        seed = cfg.train.seed + 1000 * epoch
        rows = shard.iter_batches(batch_size=ROWS_PER_READ, batch_format="numpy", prefetch_batches=cfg.ray.prefetch_batches,
                                  local_shuffle_buffer_size=ROW_SHUFFLE, local_shuffle_seed=seed)
        chunks = (tokens for batch in rows for tokens in batch["tokens"])
        n = 0
        for n, batch in enumerate(batches(chunks, cfg.model.block_size, cfg.train.batch_size, seed,
                                          WINDOW_SHUFFLE, device), start=1):
            yield batch
        if n == 0:
            raise ValueError("this worker's train shard holds less than one batch; use fewer workers, a smaller "
                             "train.batch_size or model.block_size, or more text")


def _val_batches(cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first eval_steps batches of the val split, in order: every eval reads the same ones."""
    shard = ray.train.get_dataset_shard("val")
    rows = shard.iter_batches(batch_size=ROWS_PER_READ, batch_format="numpy")
    chunks = (tokens for batch in rows for tokens in batch["tokens"])
    device = ray.train.torch.get_device()
    out = list(itertools.islice(batches(chunks, cfg.model.block_size, cfg.train.batch_size, 0, 1, device),
                                cfg.train.eval_steps))
    if not out:
        raise ValueError(f"the val split holds less than one batch of {cfg.train.batch_size} x "
                         f"{cfg.model.block_size + 1} tokens; raise data.val_fraction or lower train.batch_size")
    return out


def train_func(config: dict) -> None:
    """What each Ray Train worker runs: build (or restore) the run, wrap the model for DDP, train."""
    cfg = config_from_dict(config["cfg"])
    tokenizer = prepared_tokenizer(config["prepared"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.ray.threads_per_worker or max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            t = build_training(cfg, device, resume=Path(d))
    else:
        t = build_training(cfg, device)
    model = ray.train.torch.prepare_model(t.model) if world > 1 else t.model
    position = dict(t.data_state)  # updated by the iterator as epochs go by
    train_batches = _train_batches(cfg, position)
    val = _val_batches(cfg)
    if rank == 0:
        print(f"train: {world} worker(s) on {device} {t.precision}"
              + (f", resuming at step {t.state.step}" if checkpoint is not None else ""), flush=True)

    def report(metrics: dict, state, checkpoint: bool) -> None:
        # Every worker calls ray.train.report the same number of times (it is a barrier); rank 0 alone
        # prints and writes the checkpoint, which Ray copies to storage_path.
        if rank == 0:
            print(format_progress(metrics, cfg.train.max_steps), flush=True)
        if not checkpoint or rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "ckpt", model, cfg, tokenizer, optimizer=t.optimizer,
                                   scaler=t.scaler, train_state=state, rng=rng_state(),
                                   data_state=dict(position), metrics=metrics)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)),
                             checkpoint_dir_name=f"step_{state.step:06d}")

    train_loop(cfg, model, t.optimizer, t.scaler, train_batches, lambda: val, report, t.state, device=device,
               precision=t.precision, world_size=world, flops_per_token=t.flops_per_token)


# --------------------------------------------------------------------------- on the driver


# Ray Train's controller takes a worker's report every health-check interval (2 s by default) and a worker
# blocks on its next report until then: poll faster so frequent reports never stall the step.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Train V2 routes workers' print() through its logger, which reaches the driver twice; rank 0's progress
# line is meant to be printed once, as is.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

# Progress bars and per-report INFO lines drown the one progress line per log interval that rank 0 prints.
QUIET = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


def connect() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": QUIET},
             logging_config=ray.LoggingConfig(log_level="WARNING"))


def _read_shard(batch):
    import pyarrow.parquet as pq

    return pq.read_table(batch["path"][0].as_py(), columns=["tokens"])


def shard_dataset(paths: list[str]):
    """A Ray Dataset of the token rows of these Parquet shards, built so no stage needs a CPU slot.

    Train workers hold every CPU of a small cluster (2 workers on 2 cores), and Ray Data cannot preempt
    them: a read task that waits for a CPU would hang the run. So the file list comes from the driver and
    each shard is read by a zero-CPU task (reading Parquet is I/O and memcpy, not compute)."""
    # concurrency caps the zero-CPU tasks in flight (otherwise Ray starts a worker process per shard).
    return ray.data.from_items([{"path": p} for p in paths]).map_batches(
        _read_shard, batch_size=1, batch_format="pyarrow", num_cpus=0, concurrency=2)


def resolve_cpus(cfg: Config) -> Config:
    """ray.cpus_per_worker=None: share the cluster's CPUs out over the workers (no more than a node has)."""
    if cfg.ray.cpus_per_worker is None:
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        workers = max(1, cfg.ray.num_workers)
        share = int(ray.cluster_resources().get("CPU", 1) // workers)
        cfg.ray = dataclasses.replace(cfg.ray, cpus_per_worker=float(max(1, min(share, int(max(nodes or [1]))))))
    return cfg


def check_resources(cfg: Config, use_gpu: bool) -> None:
    """Fail now, in one line, when the workers cannot be placed (Ray would wait forever)."""
    r = cfg.ray
    have = ray.cluster_resources()
    workers = max(1, r.num_workers)
    need_cpu = workers * r.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise ConfigError(f"ray.num_workers={r.num_workers} x ray.cpus_per_worker={r.cpus_per_worker} needs "
                          f"{need_cpu:g} CPUs but the cluster has {have.get('CPU', 0):g}; lower one of them")
    if use_gpu and have.get("GPU", 0) < workers:
        raise ConfigError(f"ray.num_workers={r.num_workers} with GPUs needs {workers} GPUs but the cluster has "
                          f"{have.get('GPU', 0):g}; lower ray.num_workers or set ray.use_gpu=false")


def train(cfg: Config, print_fn=print):
    """Prepare (or reuse) the shards, then train with a TorchTrainer; returns the ray.train.Result."""
    connect()
    prepared = prepare(cfg.data, print_fn)
    manifest = load_manifest(prepared)
    tokenizer = prepared_tokenizer(prepared)
    cfg = with_vocab(cfg, tokenizer)
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    cfg = resolve_cpus(cfg)
    check_resources(cfg, use_gpu)
    name_run(cfg)
    storage = cfg.ray.storage_path or str(Path(cfg.train.out_dir).resolve())
    print_fn(f"train: {manifest['splits']['train']['tokens']:,} train tokens, run {cfg.train.run_name!r} in {storage}")
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker})
    run = RunConfig(name=cfg.train.run_name, storage_path=storage,
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                       checkpoint_score_attribute="val_loss",
                                                       checkpoint_score_order="min"),
                    failure_config=FailureConfig(max_failures=cfg.ray.max_failures))
    datasets = {split: shard_dataset(shard_paths(prepared, split)) for split in ("train", "val")}
    trainer = TorchTrainer(train_func, train_loop_config={"cfg": cfg.to_dict(), "prepared": str(prepared.resolve())},
                           scaling_config=scaling, run_config=run, datasets=datasets,
                           dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    return trainer.fit()


def run_prepare(cfg: Config) -> Path:
    """`raygpt prepare`: tokenized shards for cfg.data on the cluster (reused when already there)."""
    connect()
    return prepare(cfg.data)


__all__ = ["train", "train_func", "connect", "check_resources", "run_prepare"]
