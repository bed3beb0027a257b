"""`raygpt tune` / `python jobs/tune.py`: Ray Tune searches the space of a tune config, Optuna (TPE, seeded)
proposes, ASHA stops weak trials early on val loss.

Each trial is a Tune function that runs raygpt.distributed.train, exactly the path `jobs/train.py` takes: a
one-worker trial trains in the trial's own process and reports its evals to Tune itself (TrialSession); a
trial of several workers builds a TorchTrainer, with Tune's TuneReportCallback passing its eval reports on. Trials share the
prepared shards (prepared once, before the first trial). Results land in train.out_dir/tune/EXPERIMENT:
trials.csv, best.yaml (a training config `jobs/train.py` accepts as is), curves.png, and the trials' runs
and checkpoints under runs/.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import time
from pathlib import Path

# Trials keep the driver's working directory (the run paths below are absolute anyway).
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# Tune's default output engine prints its experiment box and result paths even at verbose=0; the legacy one
# prints nothing there. The tune: lines and the table say it all.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
import ray.tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from raygpt.config import Config, ConfigError, config_from_dict  # noqa: E402
from raygpt.pretrained import apply_init_from  # noqa: E402
from raygpt.data.pipeline import prepare, prepared_tokenizer  # noqa: E402
from raygpt.data.sources import check_writable  # noqa: E402
from raygpt.distributed import check_resources, connect, train, wants_gpu  # noqa: E402
from raygpt.runs import check_sample_prompt, with_vocab  # noqa: E402
from raygpt.tune_report import METRIC, TrialRow, TuneOutcome, ending, format_value, summarize  # noqa: E402
from raygpt.tune_space import TuneSettings, trial_config  # noqa: E402


def _absolute(cfg: Config) -> Config:
    """Trials run in other processes: pin every local path of the base config to this directory."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).resolve())
    cfg.data.prepared_dir = str(Path(cfg.data.prepared_dir).resolve())
    if "://" not in cfg.data.source and Path(cfg.data.source).exists():
        cfg.data.source = str(Path(cfg.data.source).resolve())
    if cfg.data.tokenizer_path and "://" not in cfg.data.tokenizer_path:
        cfg.data.tokenizer_path = str(Path(cfg.data.tokenizer_path).resolve())
    return cfg


class EvalReportCallback(TuneReportCallback):
    """Tune's callback for the reports that carry a val loss (every eval, every checkpoint). Tune's searcher
    and scheduler need the metric in each result; the log-interval reports in between stay with Ray Train
    (its dashboard view and the run's own progress lines)."""

    def after_report(self, run_context, metrics, checkpoint):
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class TrialLine(ray.tune.Callback):
    """One line per finished trial, in place of Tune's status tables: how it ended, its params, and where
    its time went (start-up: from Tune starting the trial to its first training step; training: its loop)."""

    def __init__(self, samples: int, max_steps: int, print_fn):
        self.samples, self.max_steps, self.print_fn, self.done = samples, max_steps, print_fn, 0
        self.started, self.startup = {}, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # The loop's clock (elapsed_s) runs from its first step: the time before it is the trial's start-up.
        if trial.trial_id in self.started and trial.trial_id not in self.startup and "elapsed_s" in result:
            startup = time.time() - result["elapsed_s"] - self.started[trial.trial_id]
            if startup >= 0:  # a resumed trial's clock counts its earlier runs too: no figure then
                self.startup[trial.trial_id] = startup

    def _line(self, trial, how: str) -> None:
        self.done += 1
        r = trial.last_result or {}
        params = ", ".join(f"{k}={format_value(v)}" for k, v in (trial.config or {}).items())
        loss = f"val {r[METRIC]:.4f} at step {r.get('step')}" if METRIC in r else "no val loss"
        times = ""
        if trial.trial_id in self.startup:
            times = f" | start-up {self.startup[trial.trial_id]:.1f} s, training {r.get('elapsed_s', 0):.1f} s"
        self.print_fn(f"tune: trial {trial.trial_id} ({self.done}/{self.samples}) {how}: {loss} | {params}{times}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, ending((trial.last_result or {}).get("step", 0), self.max_steps))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed")


# What Tune adds to every result; the rest of a result is what the trial's rank 0 reported.
TUNE_KEYS = {"timestamp", "done", "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
             "checkpoint_path"}


class WandbTrials(ray.tune.Callback):
    """W&B for an experiment (logging.wandb): one run per trial, its id the trial id, grouped under the
    experiment, with the trial's whole training config and every eval it reported. Logged here in the
    driver, not by the trial's rank 0: ASHA stops a trial by killing its actors, which would leave a W&B
    run cut off unwritten."""

    def __init__(self, base: Config, settings: TuneSettings, group: str, runs_dir: Path):
        self.base, self.settings, self.group, self.runs_dir, self.runs = base, settings, group, runs_dir, {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.runs:
            from raygpt.tracking import WandbLogger

            cfg = trial_config(self.base, self.settings, trial.config)
            cfg.train.run_name, cfg.train.out_dir = trial.trial_id, str(self.runs_dir)
            cfg.logging.wandb_group = cfg.logging.wandb_group or self.group
            self.runs[trial.trial_id] = WandbLogger(cfg, self.runs_dir / trial.trial_id, print_fn=lambda s: None)
        self.runs[trial.trial_id].log({k: v for k, v in result.items()
                                       if k not in TUNE_KEYS and not k.startswith("config/")})

    def _end(self, trial) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run is not None:
            run.finish(teardown=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._end(trial)
        import wandb

        wandb.teardown()  # every run's files written before the command returns


def say(line: str) -> None:
    """print, by a name that pickles (Tune pickles its callbacks, and builtins.print may be patched)."""
    print(line, flush=True)


def _domains(settings: TuneSettings) -> dict:
    make = {"loguniform": lambda a: ray.tune.loguniform(*a), "uniform": lambda a: ray.tune.uniform(*a),
            "randint": lambda a: ray.tune.randint(a[0], a[1] + 1),  # Tune's upper end is exclusive
            "choice": lambda a: ray.tune.choice(a)}
    return {key: make[kind](args) for key, (kind, args) in settings.space.items()}


def run_trial(params: dict, base: dict, settings: dict, runs_dir: str) -> None:
    """One trial, in a Tune trial actor: the base config with the drawn params, trained with a TorchTrainer
    whose reports reach Tune. A trial that Tune restarts (--resume) continues from its own checkpoints."""
    s = TuneSettings(**settings)
    cfg = trial_config(config_from_dict(base), s, params)
    cfg.train.out_dir, cfg.ray.storage_path = runs_dir, None
    cfg.train.run_name = ray.tune.get_context().get_trial_id()
    cfg.logging.wandb = False  # W&B is logged by the driver (WandbTrials), which outlives stopped trials
    # In local mode (one-worker trials) the train function runs here and reports to Tune itself.
    callbacks = [] if cfg.ray.num_workers == 0 else [EvalReportCallback()]
    train(cfg, print_fn=lambda s: None, callbacks=callbacks, quiet=True, tune=True)


def _experiment(base: Config, settings: TuneSettings, resume: bool) -> tuple[str, Path]:
    root = Path(base.train.out_dir) / "tune"
    if not resume:
        name = settings.experiment or datetime.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
        if (root / name).exists():
            raise ConfigError(f"the experiment {name!r} already exists in {root}; add --resume to continue it, or "
                              f"choose another tune.experiment")
        return name, root / name
    if settings.experiment is None:
        found = sorted((p for p in root.glob("*") if ray.tune.Tuner.can_restore(str(p))),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"--resume: no experiment to resume in {root}")
        return found[-1].name, found[-1]
    if not ray.tune.Tuner.can_restore(str(root / settings.experiment)):
        raise ConfigError(f"--resume: no experiment {settings.experiment!r} to resume in {root}")
    return settings.experiment, root / settings.experiment


def trial_resources(base: Config, local_trials: bool = True) -> tuple[Config, int]:
    """The trials' config (1 CPU per worker unless ray.cpus_per_worker says otherwise), checked against the
    cluster, and how many trials fit at once.

    A one-worker DDP trial runs in Ray Train's local mode (ray.num_workers=0): its train function runs in
    the trial's own process, which holds the worker's resources. A worker group (Train's controller, a
    placement group, a worker actor) took 10-13 s to start per trial on 2 cores and bought nothing for one
    worker. Trials of several workers (DDP or FSDP) keep their TorchTrainer, as do all with tune.local_trials
    false (each then shows in the dashboard's Train view) or ray.fail_at_step (it fails a Train worker)."""
    base = copy.deepcopy(base)
    use_gpu = wants_gpu(base)
    if base.ray.cpus_per_worker is None:
        base.ray = dataclasses.replace(base.ray, cpus_per_worker=1.0)
    try:
        check_resources(base, use_gpu)
    except ConfigError as e:
        raise ConfigError(f"one trial needs more than the cluster has: {e}") from None
    workers = max(1, base.ray.num_workers)
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) // (workers * base.ray.cpus_per_worker))
    if use_gpu:
        fit = min(fit, int(have.get("GPU", 0) // workers))
    if local_trials and base.ray.num_workers == 1 and base.ray.strategy == "ddp" and base.ray.fail_at_step is None:
        base.ray = dataclasses.replace(base.ray, num_workers=0)
    return base, max(1, fit)


def trial_request(trials: Config) -> dict:
    """What a trial's own process asks Ray for: a local-mode trial trains in it (the worker's CPUs, and a GPU
    when the trials use one); otherwise it only drives its TorchTrainer, whose workers hold the resources
    (Tune refuses an empty request, so it asks for a token amount of memory instead)."""
    if trials.ray.num_workers == 0:
        return {"CPU": trials.ray.cpus_per_worker, "GPU": 1 if wants_gpu(trials) else 0}
    return {"CPU": 0, "memory": 2**20}


def _scheduler(grace: int, max_steps: int, reduction_factor: int):
    """ASHA with its rungs at grace x reduction_factor^k below max_steps. A trial that reaches max_steps ends
    by itself, its TorchTrainer shut down cleanly: ASHA neither stops it there (stop_last_trials) nor keeps a
    rung at the last step, where stopping saves nothing (Tune ends a stopped trial's actor mid-run, and Ray
    frees its workers from outside, with a warning). grace = max_steps leaves no rung: no early stopping."""
    if grace >= max_steps:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=max_steps - 1, grace_period=grace,
                         reduction_factor=reduction_factor, stop_last_trials=False)


def run_tune(base: Config, settings: TuneSettings, resume: bool = False, print_fn=say) -> TuneOutcome:
    """Run (or --resume) an experiment and write its table, best config and plot."""
    check_writable(base.train.out_dir, "train.out_dir")  # the experiment goes there; one line now, not in Tune
    base = apply_init_from(base, print_fn)  # every trial fine-tunes the same pretrained model
    connect(print_fn)
    # Ray Data's statistics actor (one per cluster) is started by the first process that runs a dataset, in
    # that process's placement group: a trial's. It would then end with that trial, and every dataset still
    # running in the other trials logs a KeyError traceback at each metrics update. Started here, it outlives them.
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_stats_actor()
    base = _absolute(base)
    name, exp_dir = _experiment(base, settings, resume)
    prepared = prepare(base.data, print_fn)  # once, here: every trial reuses it
    tokenizer = prepared_tokenizer(prepared)
    base = with_vocab(base, tokenizer)
    check_sample_prompt(base, tokenizer)  # before any trial, not at a trial's first eval
    trials, fit = trial_resources(base, settings.local_trials)
    concurrent = min(settings.max_concurrent or fit, fit)
    grace = settings.grace_steps or base.train.eval_interval
    where = ("each in its own process" if trials.ray.num_workers == 0 else
             f"each a TorchTrainer of {max(1, trials.ray.num_workers)} worker(s)")
    print_fn(f"tune: experiment {name!r} in {exp_dir}, {settings.samples} trials, up to {concurrent} at once, "
             f"{where}, {base.train.max_steps} steps each, ASHA grace {grace} steps x{settings.reduction_factor}"
             + (", resuming" if resume else ""))
    if not resume:
        print_fn(f"tune: interrupted? the same command with --resume tune.experiment={name} continues it")
    trainable = ray.tune.with_parameters(run_trial, base=trials.to_dict(), settings=dataclasses.asdict(settings),
                                         runs_dir=str(exp_dir / "runs"))
    trainable = ray.tune.with_resources(trainable, trial_request(trials))
    callbacks = [TrialLine(settings.samples, base.train.max_steps, print_fn)]
    if base.logging.wandb:
        callbacks.append(WandbTrials(trials, settings, name, exp_dir / "runs"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    if resume:
        tuner = ray.tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        # The search space goes to the searcher itself, not to Tuner(param_space=): Tune hands a param_space
        # to the searcher only when fit() starts, after it has saved the Tuner, so a driver killed before the
        # searcher's own first save left an experiment whose --resume could not draw the trials still to come
        # ("no search space has been defined").
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=settings.samples, max_concurrent_trials=concurrent,
                # A trial training in its own process hands that process to the next trial (imports done, no
                # process to start or end): 8 one-at-a-time trials of the demo space took 50 s instead of 86,
                # start-up 0.2-0.4 s instead of 1.4-1.7 s, the same losses. TorchTrainer trials start afresh.
                reuse_actors=trials.ray.num_workers == 0,
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
                search_alg=OptunaSearch(space=OptunaSearch.convert_search_space(_domains(settings)), metric=METRIC,
                                        mode="min", seed=settings.seed),
                scheduler=_scheduler(grace, base.train.max_steps, settings.reduction_factor)),
            run_config=ray.tune.RunConfig(name=name, storage_path=str(exp_dir.parent), verbose=0,
                                          callbacks=callbacks))
    results = tuner.fit()
    # best.yaml keeps the user's own resources (a trial's 1 CPU per worker is for running several at once)
    return summarize(results, base, settings, exp_dir, print_fn)


__all__ = ["run_tune", "run_trial", "TrialRow", "TuneOutcome", "METRIC"]
