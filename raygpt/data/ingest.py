"""What a Ray Train worker reads (this module imports Ray): its own ordered stream of train units, dealt by
raygpt.data.windows.EpochPlan, and the val split in order.

A worker's train stream is a Ray Dataset of numbered slots (``ray.data.range``): slot s is the k-th unit of
the worker's deal in epoch e (s = (e - first epoch) x units per epoch + k), and the read stage works out
which unit that is from the seed and reads it, with the head of the unit after it. Nothing is listed
ahead: the driver passes a count and the split's Units (a path per file, a token count per unit), so a run
of a million steps starts as fast, and in as little memory, as a run of a thousand.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch

from raygpt.config import Config, grad_accum_steps
from raygpt.data.pipeline import Units, read_units
from raygpt.data.windows import EpochPlan, epoch_batches, epoch_order, fixed_batches, head

# Ray Train's own DataConfig.default_ingest_options passes the deprecated ExecutionOptions.exclude_resources
# on (UnitShards' constructor and Ray Train's state tracking call it, in the driver and in the run's controller,
# which imports this module to unpickle UnitShards); raygpt never sets it: the warning is Ray's, not ours.
warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                        category=DeprecationWarning)

READ_UNITS = 8  # units (Parquet row groups) per Ray Data read call
MAX_BLOCKS = 1000  # slot blocks of a stream at most: the read tasks Ray Data plans for, however long the run
BLOCK_BYTES = 2 << 20  # the size of the blocks a read task hands on (about 64 units of 8192 int32 tokens)


# --------------------------------------------------------------------------- the datasets (driver side)


def _read(batch: dict, units: Units, deal: tuple | None) -> pa.Table:
    """Ray Data stage: slot ids -> {epoch, unit, tokens} rows (see _read_slots)."""
    epochs, ids, arrays = _read_slots(batch["id"], units, deal)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.table({"epoch": epochs, "unit": ids,
                     "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))})


def _read_slots(slots, units: Units, deal: tuple | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Slot ids -> (epochs, unit ids, each unit's tokens). ``deal`` = (seed, block, world, rank, first epoch,
    units per epoch): slot -> that epoch's unit for that rank, read with the next unit's head; None: slot i
    is unit i of the split, alone (val)."""
    slots = np.asarray(slots).astype(np.int64)
    if deal is None:
        epochs, ids, extra = np.zeros(len(slots), dtype=np.int64), slots, 0
    else:
        seed, block, world, rank, first, per_epoch = deal
        epochs = first + slots // per_epoch
        ids = np.array([epoch_order(seed, int(e), len(units), block)[0][rank + int(k) * world]
                        for e, k in zip(epochs, slots % per_epoch)], dtype=np.int64)
        extra = head(block)
    return epochs, ids, read_units(units, ids, extra)


class LocalStream:
    """The rows a stream's Ray Dataset gives (the same slots, read the same way, in order), read in the
    process that trains, for a run without a worker group (Ray Train's local mode, a one-worker Tune trial):
    no Ray Data executor thread and no read tasks in other processes to wake up beside the step. Reads cost
    well under 1% of a step (bench/ingest_speed.py: the reader delivers 200-250x what a step takes)."""

    def __init__(self, units: Units, slots: int, deal: tuple | None):
        self.units, self.slots, self.deal = units, slots, deal

    def iter_batches(self, batch_size: int, **_) -> Iterator[dict]:
        for first in range(0, self.slots, batch_size):
            epochs, ids, arrays = _read_slots(np.arange(first, min(first + batch_size, self.slots)), self.units,
                                              self.deal)
            yield {"epoch": epochs, "unit": ids, "tokens": [a.astype(np.int32, copy=False) for a in arrays]}


def _slots(batch: dict) -> dict:
    """Ray Data stage: ranges of slots (first, count) -> the slot numbers."""
    return {"id": np.concatenate([np.arange(f, f + c, dtype=np.int64) for f, c in zip(batch["first"], batch["count"])])}


def _stream(units: Units, slots: int, deal: tuple | None, local: bool = False):
    """A Ray Dataset of ``slots`` reads, in order, built so no stage needs a CPU slot (``local``: the same
    reads as a LocalStream, for a process that trains without a worker group).

    Train workers hold every CPU of a small cluster (2 workers on 2 cores), and Ray Data cannot preempt
    them: a task that waits for a CPU would hang the run. So the stream starts from at most MAX_BLOCKS
    ranges of slots held by the driver (``ray.data.range`` would read them in tasks of 1 CPU each), and
    every stage is a zero-CPU task (reading Parquet is I/O and memcpy, not compute), at most 2 in flight
    (else Ray starts a process per block), 1 for a stream of one read call (Ray Data warns when the cap
    exceeds what it is given)."""
    if local:
        return LocalStream(units, slots, deal)
    blocks = min(MAX_BLOCKS, max(1, -(-slots // READ_UNITS)))
    size = max(1, -(-slots // blocks))
    ranges = [{"first": first, "count": min(size, slots - first)} for first in range(0, slots, size)]
    tasks = dict(batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2 if slots > READ_UNITS else 1))
    ds = (ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(_slots, batch_size=1, **tasks)
          .map_batches(_read, fn_kwargs={"units": units, "deal": deal}, batch_size=READ_UNITS, **tasks))
    ds.context.execution_options.preserve_order = True  # the plan's order is the stream's order
    # A range of a long run holds many slots; a task hands its reads on in blocks of about this size as it
    # goes (and pauses while they wait), instead of Ray Data's 128 MiB: the first batch comes after a few
    # reads, not after the first 4,000.
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds


def plan_of(cfg: Config, unit_tokens, world: int) -> EpochPlan:
    return EpochPlan(unit_tokens, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed, world)


def batches_done(cfg: Config, tokens_seen: int, world: int) -> int:
    """Batches each worker has drawn after ``tokens_seen`` tokens (exact when the world size is unchanged)."""
    return tokens_seen // (world * cfg.train.batch_size * cfg.model.block_size)


def train_stream(cfg: Config, units: Units, rank: int, world: int, start_tokens: int, epochs: int | None = None,
                 local: bool = False):
    """``rank``'s stream of train units, from the epoch a run resumed at ``start_tokens`` is in, for as many
    epochs as the rest of the run can need (``epochs`` to cap it; ``local``: see _stream)."""
    plan = plan_of(cfg, units.tokens, world)
    done = batches_done(cfg, start_tokens, world)
    epoch, skip = plan.locate(rank, done)
    needed = max(0, cfg.train.max_steps * grad_accum_steps(cfg.train, world) - done)
    epochs = min(epochs or 2**62, plan.epochs_for(rank, epoch, skip, needed))
    deal = (cfg.train.seed, cfg.model.block_size, world, rank, epoch, plan.per_epoch(rank))
    return _stream(units, epochs * plan.per_epoch(rank), deal, local)


def val_stream(units: Units, local: bool = False):
    """The val split's units, in order, whole (every worker evaluates on the same fixed windows)."""
    return _stream(units, len(units), None, local)


class UnitShards(ray.train.DataConfig):
    """Each worker gets its own ordered stream of train units (its EpochPlan deal) instead of Ray's dynamic
    ``streaming_split``: the order is then reproducible, and a resumed run sees exactly the batches the
    uninterrupted one would have. Val goes whole, in order, to every worker."""

    def __init__(self, cfg: Config, units: Units, start_tokens: int):
        super().__init__(datasets_to_split=[])
        self.cfg, self.units, self.start_tokens = cfg, units, start_tokens

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank in range(world_size):
                if name == "train":  # runs at every worker-group start, so a restart gets its own world size
                    ds = train_stream(self.cfg, self.units, rank, world_size, self.start_tokens)
                # Ray Data's defaults, in order (DataConfig's default_ingest_options passes on the deprecated
                # exclude_resources, and Ray warns).
                ds.context.execution_options = ray.data.ExecutionOptions(preserve_order=True)
                out[rank][name] = ds.iterator()
        return out


# --------------------------------------------------------------------------- on each worker


def _rows(shard, prefetch: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for batch in shard.iter_batches(batch_size=READ_UNITS, batch_format="numpy", prefetch_batches=prefetch):
        yield from zip(batch["epoch"].tolist(), batch["unit"].tolist(), batch["tokens"])


def train_batches(cfg: Config, unit_tokens, tokens_seen: int, position: dict, shard, rank: int, world: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) batches of this worker's deal of the train split (``shard``: its stream), starting
    where ``tokens_seen`` left off. ``position`` holds the epoch being read (saved in checkpoints, for people)."""
    plan = plan_of(cfg, unit_tokens, world)
    epoch, skip = plan.locate(rank, batches_done(cfg, tokens_seen, world))
    rows = _rows(shard, cfg.ray.prefetch_batches)
    for epoch in itertools.count(epoch):
        position.update(epoch=epoch, world=world)
        yield from epoch_batches(_epoch_units(rows, epoch), plan, epoch, rank, skip, device=device)
        skip = 0


def _epoch_units(rows: Iterator[tuple[int, int, np.ndarray]], epoch: int) -> Iterator[tuple[int, np.ndarray]]:
    """The units of ``epoch`` from the stream, dropping earlier epochs (a restart resumes inside the data).
    epoch_batches stops pulling at the epoch's last unit, so the next epoch starts at the next row."""
    for e, unit, tokens in rows:
        if e > epoch:
            raise RuntimeError(f"the train stream is at epoch {e} but this worker resumes in epoch {epoch}")
        if e == epoch:
            yield unit, tokens


def val_batches(cfg: Config, total_tokens: int, shard, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed val batches (raygpt.data.windows.fixed_batches), read once from the val split's ``shard``."""
    rows = _rows(shard, 2)
    return fixed_batches((tokens for _, _, tokens in rows), total_tokens, cfg.model.block_size,
                         cfg.train.batch_size, cfg.train.eval_steps, cfg.train.seed + 1, device)
