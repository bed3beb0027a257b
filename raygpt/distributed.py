"""The Ray Train boundary: a thin per-worker ``train_func`` around raygpt.train.train_loop, and the
TorchTrainer wiring around it. Model, step, checkpoint format: all from the core, nothing re-implemented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raygpt.checkpoint import keep_best_checkpoints, latest_checkpoint, read_meta, save_checkpoint
from raygpt.cluster import free_ports
from raygpt.config import Config, ConfigError, config_from_dict
from raygpt.data.ingest import UnitShards, plan_of, train_batches, train_stream, val_batches, val_stream
from raygpt.data.pipeline import load_manifest, prepare, prepared_tokenizer, split_units
from raygpt.data.sources import check_writable
from raygpt.metrics import RayMetrics, install_grafana_dashboard
from raygpt.runs import (build_training, check_sample_prompt, format_progress, name_run, report_sample,
                         resume_points, skipped_lines, with_vocab)
from raygpt.tracking import WandbLogger
from raygpt.parallel import is_sharded, shard
from raygpt.lora import trainable_line
from raygpt.pretrained import apply_init_from
from raygpt.ray_output import QUIET, quiet_forwarded_output
from raygpt.train import resolve_precision, rng_state, train_loop


def format_startup(clock: dict) -> str:
    """Where the time to the first optimizer step went (driver and worker clocks: one machine, or NTP)."""
    parts = [("imports", "process", "start"), ("ray.init", "start", "ray"), ("prepare", "ray", "data"), ("checks", "data", "fit"),
             ("worker start", "fit", "worker"), ("model, data and step 1", "worker", "first_step")]
    if clock["process"] == clock["start"]:  # train() called from Python: its imports are not this run's
        parts = parts[1:]
    return ("start-up: " + ", ".join(f"{name} {clock[b] - clock[a]:.1f} s" for name, a, b in parts)
            + f" (to the first step: {clock['first_step'] - clock['process']:.1f} s)")


def _fault_due(cfg: Config, run_path: str, rank: int, step: int, where: str) -> bool:
    """ray.fail_at_step: True once per run for the chosen rank, step and place (a marker file records it)."""
    r = cfg.ray
    if (r.fail_at_step, r.fail_rank, r.fail_in) != (step, rank, where):
        return False
    marker = Path(run_path) / f".fault-injected-{where}-rank{rank}-step{step}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    print(f"fault injection: rank {rank} exits hard at step {step} ({where}; ray.fail_at_step)", flush=True)
    return True


def _with_fault(cfg: Config, run_path: str, rank: int, batches: Iterator, state) -> Iterator:
    for batch in batches:
        if _fault_due(cfg, run_path, rank, state.step + 1, "step"):
            os._exit(1)
        yield batch


def _die_mid_upload(saved: Path, dest: Path) -> None:
    """ray.fail_in=checkpoint: leave what a copy to storage that died half-way leaves, then exit hard."""
    for f in sorted(p for p in saved.rglob("*") if p.is_file()):
        data = f.read_bytes()
        out = dest / f.relative_to(saved)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data if f.suffix not in (".safetensors", ".distcp") else data[:len(data) // 2])
    os._exit(1)


def gather(item, world: int) -> list:
    """``item`` of every rank, in rank order (a collective: every rank calls it)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [item]
    out = [None] * world
    torch.distributed.all_gather_object(out, item)
    return out


def sharding(cfg: Config, world: int, device: torch.device):
    """What build_training applies under ray.strategy=fsdp: FSDP2 over the workers (None under ddp)."""
    if cfg.ray.strategy != "fsdp":
        return None
    precision = resolve_precision(cfg.train.precision, device)
    return lambda model: shard(model, world, cfg.ray.fsdp_shard_size, precision)


def mesh_text(cfg: Config, world: int) -> str:
    size = cfg.ray.fsdp_shard_size
    return (f"each worker holds 1/{world} of the model" if size is None else
            f"HSDP: {world // size} cop{'y' if world == size else 'ies'}, each sharded over {size} worker(s)")


class TrainSession:
    """What the train function takes from Ray Train: its rank and the world size, its device, the checkpoint
    Ray restarts it from, its dataset shards, and where its reports go (ray.train.report)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def shard(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, **checkpoint) -> None:
        ray.train.report(metrics, **checkpoint)


class TrialSession(TrainSession):
    """A one-worker Tune trial trains in the trial's own process, without a worker group: what Ray Train's
    local mode does, which Ray 2.60 refuses inside a Tune trial (ray.train's calls raise there). Rank 0 of 1,
    the device Ray gave the trial, the datasets as built (a one-worker run's stream), no checkpoint from Ray
    (the train function resumes from the run's own folder), and the reports with a val loss go to Tune
    (the ones its searcher and scheduler judge; the others, every log interval, would only fill its results)."""

    def __init__(self, datasets: dict, use_gpu: bool):
        self.rank, self.world, self.datasets = 0, 1, datasets
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray set the trial's GPU visible

    def checkpoint(self):
        return None

    def shard(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, checkpoint: Checkpoint | None = None, **_) -> None:
        if "val_loss" in metrics:
            import ray.tune

            # Where the checkpoint is, under the key Tune's TuneReportCallback uses for a TorchTrainer's.
            ray.tune.report({**metrics, "checkpoint_path": checkpoint.path} if checkpoint else metrics)


def train_func(config: dict, session: TrainSession | None = None) -> None:
    """What each Ray Train worker runs: build (or restore) the run, wrap the model for DDP, train.
    ``session``: where rank, device, data and reports come from (Ray Train's, unless a Tune trial trains
    in its own process)."""
    clock = dict(config.get("clock") or {}, worker=time.time())  # bench loops may pass none
    # Ray Train logs every report at INFO on each worker ("Reporting training result N: ..."), from a
    # logger named by its file path, which RunConfig's log level misses; rank 0's progress line says it once.
    context_module = sys.modules.get("ray.train.v2._internal.execution.context")
    if context_module is not None:
        logging.getLogger(context_module.__file__).setLevel(logging.WARNING)
    cfg = config_from_dict(config["cfg"])
    tokenizer = prepared_tokenizer(config["prepared"])
    session = session or TrainSession()
    rank, world, device = session.rank, session.world, session.device
    local = cfg.ray.num_workers == 0  # no worker group: this process writes its checkpoints itself
    torch.set_num_threads(cfg.ray.threads_per_worker or max(1, int(cfg.ray.cpus_per_worker)))
    if cfg.ray.strategy == "fsdp" and resolve_precision(cfg.train.precision, device) == "fp16":
        # fp16 needs a sharded GradScaler, which raygpt does not use: on GPUs without bf16 (precision=auto
        # picks fp16 there) a sharded run computes in fp32 (the "train:" line says which).
        cfg.train = dataclasses.replace(cfg.train, precision="fp32")
    checkpoint = session.checkpoint()
    # Ray's latest checkpoint is the last one whose report reached its controller from every worker; when a
    # worker dies, rank 0 may already have written newer ones (reports are collected by polling). Resume
    # from the newest valid one: no finished step is lost, and the run continues exactly.
    newest = latest_checkpoint(config["run_path"]) if config["run_path"] else None
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as d:
        candidates = [Path(p) for p in (d, newest) if p is not None]
        resume = max(candidates, key=lambda p: read_meta(p)["step"], default=None)
        t = build_training(cfg, device, resume=resume, rank=rank, world=world, shard=sharding(cfg, world, device))
    fsdp = is_sharded(t.model)
    # DDP through Ray Train; FSDP2 is applied in build_training, inside this worker, on the process group
    # Ray Train set up (its own prepare_model(parallel_strategy="fsdp") is FSDP1 and refuses CPU workers).
    model = ray.train.torch.prepare_model(t.model) if world > 1 and not fsdp else t.model
    position = dict(t.data_state)  # updated by the iterator as epochs go by
    batches = train_batches(cfg, config["train_unit_tokens"], t.state.tokens_seen, position, session.shard("train"),
                            rank, world, device)
    if cfg.ray.fail_at_step is not None:
        batches = _with_fault(cfg, config["run_path"], rank, batches, t.state)
    val = val_batches(cfg, config["val_tokens"], session.shard("val"), device)
    # What rank 0 prints: its progress and samples, unless the run is a Tune trial (the driver prints one
    # line per trial there, and lines from trials running side by side would interleave).
    say = (lambda s: None) if config.get("quiet") else (lambda s: print(s, flush=True))
    if rank == 0:
        say(f"train: {'this process (local mode)' if local else f'{world} worker(s)'} on {device} {t.precision}"
            + (f", fsdp ({mesh_text(cfg, world)})" if fsdp else "")
            + (f", resuming at step {t.state.step}" if resume is not None else ""))
        if t.note:
            say(f"resume: {t.note}")
        if t.init:
            say(t.init)
        if cfg.finetune.method == "lora":
            say(trainable_line(t.model))

    tracker = WandbLogger(cfg, config["run_path"]) if rank == 0 and cfg.logging.wandb else None
    gauges = RayMetrics(cfg.train.run_name, rank)  # Prometheus/Grafana, through Ray's metrics export

    def report(metrics: dict, state, checkpoint: bool) -> None:
        # Every worker calls ray.train.report the same number of times (it is a barrier) and sets its own
        # gauges; rank 0 alone prints, logs to W&B and writes the checkpoint, which Ray copies to storage_path.
        gauges.record(metrics)
        if rank == 0:
            if "first_step" not in clock and "start" in clock:
                clock["first_step"] = time.time()
                say(format_startup(clock))
            say(format_progress(metrics, cfg.train.max_steps))
            if tracker:
                tracker.log(metrics)
            if "val_loss" in metrics:
                report_sample(model, tokenizer, cfg, t.precision, state.step, say, tracker)
        elif fsdp and "val_loss" in metrics:  # every rank decodes the sample (a sharded forward is collective)
            report_sample(model, tokenizer, cfg, t.precision, state.step, lambda s: None)
        # Each rank's own random state goes into the checkpoint (rank 0 writes it): gathered from all ranks.
        rng = {"ranks": gather(rng_state(device), world)} if checkpoint else None
        # Under DDP rank 0 writes the checkpoint; under FSDP every rank writes its shard (a collective), each
        # in a directory of its own, and Ray Train merges the ranks' directories into one in storage.
        if not checkpoint or (rank != 0 and not fsdp):
            session.report(metrics)
            return
        if local:
            # Ray Train's local mode keeps a reported checkpoint in memory only: this process writes it into
            # the run's folder itself, under Ray Train's name and keeping rule, and reports that copy.
            path = save_checkpoint(Path(config["run_path"]) / f"step_{state.step:06d}", model, cfg, tokenizer,
                                   optimizer=t.optimizer, scaler=t.scaler, train_state=state, rng=rng,
                                   data_state=dict(position), metrics=metrics)
            keep_best_checkpoints(Path(config["run_path"]), cfg.train.keep_checkpoints)
            session.report(metrics, checkpoint=Checkpoint.from_directory(str(path)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "ckpt", model, cfg, tokenizer, optimizer=t.optimizer,
                                   scaler=t.scaler, train_state=state, rng=rng,
                                   data_state=dict(position), metrics=metrics)
            if cfg.ray.fail_at_step is not None and _fault_due(cfg, config["run_path"], 0, state.step, "checkpoint"):
                _die_mid_upload(path, Path(config["run_path"]) / f"step_{state.step:06d}")
            session.report(metrics, checkpoint=Checkpoint.from_directory(str(path)),
                           checkpoint_dir_name=f"step_{state.step:06d}")

    try:
        train_loop(cfg, model, t.optimizer, t.scaler, batches, lambda: val, report, t.state, device=device,
                   precision=t.precision, world_size=world, rank=rank, flops_per_token=t.flops_per_token)
    finally:
        if tracker:
            tracker.finish()


# --------------------------------------------------------------------------- on the driver


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C; the message says where it stands and how to resume it."""


# Ray Train's controller takes a worker's report every health-check interval (2 s by default) and a worker
# blocks on its next report until then: poll faster so frequent reports never stall the step.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Train V2 routes workers' print() through its logger, which reaches the driver twice; rank 0's progress
# line is meant to be printed once, as is.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# The dashboard's Train view (runs, their workers and status; /api/train/v2/runs/v1) shows a Train V2 run
# only when the process that builds the TorchTrainer has this set: this driver, or a Tune trial's actor,
# which imports this module too. The head needs nothing.
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")

def connect(print_fn=None) -> bool:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`; `RAY_ADDRESS=auto` joins the one a
    `ray start` left on this machine) or start a fresh local one for this process: never join a cluster
    by accident. ``print_fn`` gets one line saying which, and where its dashboard is. True when it started
    a cluster of this process's own."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    env, options = dict(QUIET), {}
    # Ray Train's own actors (its placement-group cleaner, its run-state actor) look the cluster up through
    # Ray's state API, which without an address scans the machine for Ray clusters and dies ("Found multiple
    # active Ray instances") when another one runs there too: tell every process of this job which is ours.
    if address == "local":
        options["dashboard_port"] = free_ports(1)[0]
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
        # Ray turns token authentication on for a new local cluster and says so in a WARNING (with how to opt
        # out); no one else joins this one, and that module warns of nothing else in a driver.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # No node of a private local cluster is ever drained (preempted), and Ray Train's PreemptionWatcher,
        # which watches for that, is started in a way that makes Ray log an ERROR line about its arguments.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    elif address != "auto":
        env["RAY_ADDRESS"] = address
    info = ray.init(address=address, runtime_env={"env_vars": env},
                    logging_config=ray.LoggingConfig(log_level="WARNING"), **options)
    quiet_forwarded_output()
    # Ray has no public call for the session folder; without it the Grafana dashboard is simply not added.
    node = getattr(ray._private.worker.global_worker, "node", None)
    if node is not None:
        install_grafana_dashboard(node.get_session_dir_path())
    if print_fn is not None:
        where = "started a local Ray cluster for this run" if address == "local" else f"joined the Ray cluster at {address}"
        dashboard = f"http://{info.dashboard_url}" if info.dashboard_url else "none (started without one)"
        print_fn(f"ray: {where}; dashboard {dashboard} (Jobs, Train runs, Actors, Metrics)")
    return address == "local"


def resolve_local_mode(cfg: Config, own_cluster: bool, print_fn=print) -> Config:
    """ray.local_mode: true, or None (auto) for one DDP worker on a cluster this command started for itself,
    makes the run train in this process (ray.num_workers=0, Ray Train's local mode). A TorchTrainer worker
    there costs a worker group's start (controller, placement group, worker: 7-10 s on 2 cores) and, on a
    small machine, 8-19% of every step to Ray Train's actors waking beside it (bench/RESULTS.md), and buys
    nothing for one worker on one machine. Fault injection (ray.fail_at_step) needs a worker to kill."""
    r = cfg.ray
    auto = (r.local_mode is None and own_cluster and r.num_workers == 1 and r.strategy == "ddp"
            and r.fail_at_step is None)
    if r.num_workers == 1 and (r.local_mode or auto):
        cfg.ray = dataclasses.replace(r, num_workers=0)
        if auto:
            print_fn("train: one worker on a cluster of its own: it trains in this process (Ray Train's local mode, "
                     "no worker group; ray.local_mode=false for a TorchTrainer worker, in the dashboard's Train view)")
    return cfg


def resolve_cpus(cfg: Config) -> Config:
    """ray.cpus_per_worker=None: share the cluster's CPUs out over the workers (no more than a node has)."""
    if cfg.ray.cpus_per_worker is None:
        cfg.ray = dataclasses.replace(cfg.ray, cpus_per_worker=cpu_share(max(1, cfg.ray.num_workers)))
    return cfg


def cpu_share(count: int) -> float:
    """The cluster's CPUs shared out over ``count`` actors (Train workers, Serve replicas): at least 1, no
    more than a node has."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    share = int(ray.cluster_resources().get("CPU", 1) // count)
    return float(max(1, min(share, int(max(nodes or [1])))))


def wants_gpu(cfg: Config) -> bool:
    """ray.use_gpu, or when unset (auto): whether the cluster has GPUs."""
    return cfg.ray.use_gpu if cfg.ray.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


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


def failure_config(restarts: int) -> FailureConfig:
    """ray.max_failures bounds every kind of restart, not only a worker's error. Ray Train 2.60 also retries,
    on budgets of their own that default to "forever", a worker group that cannot start (its startup times
    out every 60 s, e.g. when a node is gone for good) and a node's preemption: a fixed cluster that lost a
    node would wait there without end. Each budget gets the same N."""
    return FailureConfig(max_failures=restarts, controller_failure_limit=restarts, max_preemption_failures=restarts)


def train(cfg: Config, print_fn=print, loop=train_func, callbacks=(), quiet: bool = False,
          since: float | None = None, tune: bool = False):
    """Prepare (or reuse) the shards, then train with a TorchTrainer; returns the ray.train.Result.

    A run name that already has checkpoints in storage resumes from the latest one (Ray finds it).
    ``loop`` is the per-worker function (bench/ingest_speed.py passes one that only reads batches);
    ``callbacks`` are Ray Train callbacks (a Tune trial passes TuneReportCallback); ``quiet`` keeps rank 0
    from printing progress lines and samples; ``since``: when the command started (time.time()), for the
    start-up line's "imports" (the CLI passes when raygpt was first imported); ``tune``: the run is a Tune
    trial (with ray.num_workers=0 it trains in the trial's process, see TrialSession, and returns None)."""
    # Wall-clock marks for the start-up line rank 0 prints at step 1.
    start = time.time()
    clock = {"process": start if since is None else since, "start": start}
    # Storage that cannot be written is one line now, not a traceback from Ray Train's controller later.
    check_writable(cfg.ray.storage_path or cfg.train.out_dir,
                   "ray.storage_path" if cfg.ray.storage_path else "train.out_dir")
    cfg = apply_init_from(cfg, print_fn)  # the pretrained model's shape and tokenizer, before the data
    own_cluster = connect(print_fn)
    clock["ray"] = time.time()
    prepared = prepare(cfg.data, print_fn)
    clock["data"] = time.time()
    manifest = load_manifest(prepared)
    tokenizer = prepared_tokenizer(prepared)
    cfg = with_vocab(cfg, tokenizer)
    check_sample_prompt(cfg, tokenizer)
    use_gpu = wants_gpu(cfg)
    cfg = resolve_local_mode(cfg, own_cluster, print_fn)
    cfg = resolve_cpus(cfg)
    check_resources(cfg, use_gpu)
    if cfg.ray.strategy == "fsdp" and not hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard"):
        raise ConfigError(f"ray.strategy=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.6 and "
                          f"later); this torch is {torch.__version__}: upgrade torch or use ray.strategy=ddp")
    name_run(cfg)
    storage = cfg.ray.storage_path or str(Path(cfg.train.out_dir).resolve())
    if cfg.ray.num_workers == 0 and "://" in storage:
        raise ConfigError(f"ray.num_workers=0 (local mode) writes its checkpoints itself, to a local folder, not to "
                          f"ray.storage_path={storage}; use ray.num_workers=1 or a local path")
    # Everything a worker would trip on is checked here, before any worker starts.
    resumes = resume_points(cfg, tokenizer, Path(storage) / cfg.train.run_name) if "://" not in storage else []
    train_units, val_units = split_units(prepared, "train"), split_units(prepared, "val")
    world = max(1, cfg.ray.num_workers)
    plan = plan_of(cfg, train_units.tokens, world)
    for rank in range(world):
        if plan.batches_in_epoch(0, rank) == 0:
            raise ConfigError(plan.too_small())
    val_tokens = manifest["splits"]["val"]["tokens"]
    if (val_tokens - 1) // cfg.model.block_size < cfg.train.batch_size:
        raise ConfigError(f"the val split ({val_tokens:,} tokens) holds less than one batch of "
                          f"{cfg.train.batch_size} x {cfg.model.block_size + 1} tokens; raise data.val_fraction "
                          f"or lower train.batch_size")
    start_tokens = min((p.tokens_seen for p in resumes), default=0)
    print_fn(f"train: {manifest['splits']['train']['tokens']:,} train tokens ({100 * plan.coverage():.1f}% of them in "
             f"an epoch's windows), run {cfg.train.run_name!r} in {storage}"
             + (f", resuming from step {max(p.step for p in resumes)}" if resumes else ""))
    for line in skipped_lines(Path(storage) / cfg.train.run_name) if "://" not in storage else []:
        print_fn(line)
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker})
    run = RunConfig(name=cfg.train.run_name, storage_path=storage,
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                       checkpoint_score_attribute="val_loss",
                                                       checkpoint_score_order="min"),
                    failure_config=failure_config(cfg.ray.max_failures), callbacks=list(callbacks),
                    # Ray Train's INFO lines repeat every report; rank 0's progress line says it once.
                    logging_config=ray.train.LoggingConfig(log_level="WARNING"))
    # The base train dataset is the stream of a one-worker run: what local mode (num_workers=0) reads. With
    # workers, UnitShards deals the units out per worker and this one is never read (one epoch: a stand-in).
    local = cfg.ray.num_workers == 0
    datasets = {"train": train_stream(cfg, train_units, 0, 1, start_tokens, epochs=None if local else 1, local=local),
                "val": val_stream(val_units, local=local)}
    clock["fit"] = time.time()
    config = {"cfg": cfg.to_dict(), "prepared": str(prepared.resolve()), "train_unit_tokens": train_units.tokens,
              "val_tokens": val_tokens, "clock": clock, "quiet": quiet,
              # the run's folder when storage is local (None for a URI)
              "run_path": None if "://" in storage else str(Path(storage) / cfg.train.run_name)}
    if local and tune:
        return loop(config, session=TrialSession(datasets, use_gpu))  # see TrialSession
    trainer = TorchTrainer(loop, scaling_config=scaling, run_config=run, datasets=datasets, train_loop_config=config,
                           dataset_config=UnitShards(cfg, train_units, start_tokens))
    try:
        return trainer.fit()
    except (SystemExit, KeyboardInterrupt):
        # Ctrl-C: Ray Train aborts the run (its workers stop, the Train view says ABORTED), then leaves
        # fit() by SystemExit(1). Say what that means for the run instead of exiting without a word.
        newest = latest_checkpoint(Path(storage) / cfg.train.run_name) if "://" not in storage else None
        again = f"the same command (train.run_name={cfg.train.run_name})"
        said = (f"its newest checkpoint is {newest} (step {read_meta(newest)['step']}); {again} resumes from it"
                if newest is not None else f"it wrote no checkpoint, so {again} starts it anew")
        raise RunInterrupted(f"the run {cfg.train.run_name!r} was interrupted; {said}") from None


def run_prepare(cfg: Config, print_fn=print) -> Path:
    """`raygpt prepare`: tokenized shards for cfg.data on the cluster (reused when already there)."""
    connect(print_fn)
    return prepare(cfg.data, print_fn)


__all__ = ["train", "train_func", "connect", "check_resources", "run_prepare", "RunInterrupted"]
