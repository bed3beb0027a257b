"""What `raygpt tune` reads: a training config plus a `tune:` section (settings and the search space).

    # configs/tune/default.yaml
    train: {max_steps: 300, eval_interval: 50}     # every trial's training settings, as in a training config
    tune:
      samples: 16
      space:                                      # training keys, each with one distribution
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        optim.warmup_fraction: {uniform: [0.0, 0.2]}   # warmup as a share of train.max_steps
        model.size: {choice: [xs, s]}                  # named shapes from model_sizes
      model_sizes:
        xs: {n_layer: 2, n_head: 2, n_embd: 64}
        s: {n_layer: 4, n_head: 4, n_embd: 128}

Distributions: loguniform [low, high], uniform [low, high], randint [low, high] (both ends included),
choice [a, b, ...]. Everything is checked here, before any trial starts: unknown keys, empty or inverted
ranges, and every value a trial could draw (each range's ends, each choice, every combination of the model
shape choices) must give a valid training config. No Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from raygpt.config import Config, ConfigError, _set_dotted, config_from_dict, parse_override, read_yaml

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# Keys of the space that are not training keys: they set training keys when a trial is built.
WARMUP_FRACTION, MODEL_SIZE = "optim.warmup_fraction", "model.size"
# Model shape keys whose values interact (n_embd must divide by n_head): only `choice`, all combinations checked.
SHAPE_KEYS = ("model.n_head", "model.n_embd")
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "configs" / "tune" / "default.yaml"


@dataclass
class TuneSettings:
    samples: int = 8  # trials in all (`--samples N`)
    seed: int = 0  # Optuna's TPE sampler seed
    # ASHA: steps every trial runs before it may be stopped (None: train.eval_interval, its first val loss).
    grace_steps: Optional[int] = None
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    # Trials at once (None: as many as the cluster's CPUs/GPUs hold at the per-trial resources).
    max_concurrent: Optional[int] = None
    experiment: Optional[str] = None  # None: a fresh timestamped name; results go to train.out_dir/tune/NAME
    # A one-worker trial trains in its trial's own process (no Ray Train worker group: faster to start, but
    # not in the dashboard's Train view); false: a TorchTrainer of one worker, as trials of several workers.
    local_trials: bool = True
    space: dict = field(default_factory=dict)
    model_sizes: dict = field(default_factory=dict)


def load_tune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, TuneSettings]:
    """The base training config (defaults < YAML < overrides) and the checked tune settings. ``tune.X=V``
    overrides set tune settings; any other ``key=value`` sets a training key for every trial."""
    path = Path(path) if path is not None else DEFAULT_PATH
    data = read_yaml(path, "tune config", "configs/tune/default.yaml")
    if not isinstance(data.get("tune", {}), dict):
        raise ConfigError(f"tune config {str(path)!r}: `tune:` must be a mapping of tune settings")
    tune = dict(data.pop("tune", None) or {})
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("tune."):
            tune[key[len("tune."):]] = value
        else:
            _set_dotted(data, key, value)
    base = config_from_dict(data)
    return base, check_settings(base, tune)


def check_settings(base: Config, raw: dict) -> TuneSettings:
    """TuneSettings from the `tune:` mapping, with every trial the space allows checked against ``base``."""
    names = {f.name: f for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown tune setting tune.{unknown[0]}; valid: {', '.join('tune.' + n for n in names)}")
    s = TuneSettings(**raw)
    for key in ("samples", "seed", "grace_steps", "reduction_factor", "max_concurrent"):
        value = getattr(s, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"tune.{key} must be an integer, got {value!r}")
    if not isinstance(s.local_trials, bool):
        raise ConfigError(f"tune.local_trials must be true or false, got {s.local_trials!r}")
    if s.samples < 1:
        raise ConfigError(f"tune.samples (--samples) must be at least 1, got {s.samples}")
    if s.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor must be at least 2, got {s.reduction_factor}")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        raise ConfigError(f"tune.max_concurrent must be at least 1, got {s.max_concurrent}")
    grace = s.grace_steps if s.grace_steps is not None else base.train.eval_interval
    if not 0 < grace <= base.train.max_steps:
        raise ConfigError(f"tune.grace_steps={grace} must be between 1 and train.max_steps={base.train.max_steps}")
    if grace < base.train.eval_interval:
        raise ConfigError(f"tune.grace_steps={grace} is below train.eval_interval={base.train.eval_interval}: a "
                          f"trial has no val loss to be judged on before its first eval; raise it")
    if not isinstance(s.space, dict) or not s.space:
        raise ConfigError("tune.space is empty: give at least one training key and its distribution, "
                          "for example optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    if not isinstance(s.model_sizes, dict):
        raise ConfigError("tune.model_sizes must map names to model shapes, e.g. xs: {n_layer: 2, n_head: 2, n_embd: 64}")
    s.space = {key: _check_dimension(base, s, key, spec) for key, spec in s.space.items()}
    fixed = [key for key in s.space if key == MODEL_SIZE or key in (f"model.{k}" for k in
             ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "tie_weights"))]
    if base.train.init_from and fixed:
        raise ConfigError(f"tune.space.{fixed[0]}: train.init_from={base.train.init_from} fixes the model's shape "
                          f"(its weights have one); search other keys, such as optim.lr")
    _check_trials(base, s)
    return s


def _check_dimension(base: Config, s: TuneSettings, key: str, spec: Any) -> tuple[str, list]:
    """(distribution, arguments) for one key of the space; errors name tune.space.KEY."""
    where = f"tune.space.{key}"
    if key not in (WARMUP_FRACTION, MODEL_SIZE):
        section, _, name = key.partition(".")
        hints = typing.get_type_hints(Config)
        if section not in hints or name not in typing.get_type_hints(hints[section]):
            raise ConfigError(f"{where}: unknown training key {key!r}; use section.name keys of a training config "
                              f"(such as optim.lr), {WARMUP_FRACTION} or {MODEL_SIZE}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where} must be one of {', '.join(d + ': [...]' for d in DISTRIBUTIONS)}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} needs a list of values, got {args!r}")
    if kind == "choice":
        if key == MODEL_SIZE:
            missing = [a for a in args if a not in s.model_sizes]
            if missing:
                raise ConfigError(f"{where}: model size {missing[0]!r} is not in tune.model_sizes "
                                  f"({', '.join(map(str, s.model_sizes)) or 'empty'})")
        return kind, args
    if key == MODEL_SIZE or key in SHAPE_KEYS:
        raise ConfigError(f"{where}: use choice (every combination with the other shape keys is then checked), "
                          f"not {kind}")
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: the range [{low}, {high}] is empty or inverted; give [low, high] with low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: randint needs integer ends, got {args!r}")
    if key == WARMUP_FRACTION and not 0 <= low < high < 1:
        raise ConfigError(f"{where}: a warmup fraction range must lie in [0, 1), got {args!r}")
    return kind, [int(low), int(high)] if kind == "randint" else [float(low), float(high)]


def _check_trials(base: Config, s: TuneSettings) -> None:
    """Build the config of every corner a trial can reach: each non-shape value on its own, and every
    combination of the shape choices (where n_embd % n_head can go wrong)."""
    shape = [k for k in s.space if k == MODEL_SIZE or k in SHAPE_KEYS]
    for combo in itertools.product(*(s.space[k][1] for k in shape)):
        _try_trial(base, s, dict(zip(shape, combo)))
    for key, (kind, args) in s.space.items():
        if key not in shape:
            for value in args:
                _try_trial(base, s, {key: value})


def _try_trial(base: Config, s: TuneSettings, params: dict) -> None:
    try:
        trial_config(base, s, params)
    except ConfigError as e:
        point = ", ".join(f"{k}={v}" for k, v in params.items())
        raise ConfigError(f"tune.space allows a trial that cannot run ({point}): {e}") from None


def trial_config(base: Config, s: TuneSettings, params: dict) -> Config:
    """The training config of one trial: ``base`` with the drawn ``params`` applied (and validated)."""
    data = base.to_dict()
    for key, value in params.items():
        if key == MODEL_SIZE:
            shape = s.model_sizes[value]
            if not isinstance(shape, dict):
                raise ConfigError(f"tune.model_sizes.{value} must be a mapping of model keys")
            data["model"].update(shape)
        elif key == WARMUP_FRACTION:
            data["optim"]["warmup_steps"] = int(round(value * data["train"]["max_steps"]))
        else:
            section, _, name = key.partition(".")
            data[section][name] = value
    return config_from_dict(data)


__all__ = ["TuneSettings", "load_tune_config", "check_settings", "trial_config", "DEFAULT_PATH"]
