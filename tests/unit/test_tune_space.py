"""The tune config: search space checks before any trial starts, and how a trial's config is built."""

import pytest
import yaml

from raygpt.config import ConfigError, load_config
from raygpt.tune_space import DEFAULT_PATH, load_tune_config, trial_config


def write(tmp_path, tune: dict, **sections):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({**sections, "tune": tune}))
    return path


SPACE = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}


def test_the_default_tune_config_loads_and_its_trials_are_valid_training_configs():
    base, s = load_tune_config(DEFAULT_PATH, ["tune.samples=32", "train.max_steps=400"])
    assert s.samples == 32 and base.train.max_steps == 400
    assert set(s.space) == {"optim.lr", "optim.warmup_fraction", "model.size"}
    cfg = trial_config(base, s, {"optim.lr": 3e-3, "optim.warmup_fraction": 0.1, "model.size": "xs"})
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 2, 64)
    assert cfg.optim.lr == 3e-3 and cfg.optim.warmup_steps == 40  # 10% of train.max_steps
    assert cfg.model.block_size == base.model.block_size == 64  # the rest is the base config


def test_a_trial_config_is_a_training_config_jobs_train_accepts(tmp_path):
    base, s = load_tune_config(DEFAULT_PATH)
    cfg = trial_config(base, s, {"optim.lr": 1e-3, "optim.warmup_fraction": 0.05, "model.size": "m"})
    again = load_config(cfg.save(tmp_path / "best.yaml"))
    assert again == cfg


@pytest.mark.parametrize("space, sizes, message", [
    ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, {}, "tune.space.optim.lr: the range [0.01, 0.0001] is empty or inverted"),
    ({"optim.lr": {"uniform": [1e-3, 1e-3]}}, {}, "empty or inverted"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, {}, "loguniform needs low > 0"),
    ({"optim.lr": {"normal": [0, 1]}}, {}, "tune.space.optim.lr must be one of loguniform"),
    ({"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}}, {}, "unknown training key 'optim.learning_rate'"),
    ({"model.size": {"choice": ["odd"]}}, {"odd": {"n_layer": 2, "n_head": 3, "n_embd": 64}},
     "model.size=odd): model.n_embd=64 is not divisible by model.n_head=3"),
    ({"model.size": {"choice": ["xl"]}}, {"s": {"n_layer": 2}}, "model size 'xl' is not in tune.model_sizes"),
    ({"model.n_head": {"choice": [2, 3]}, "model.n_embd": {"choice": [64, 96]}}, {},
     "(model.n_embd=64, model.n_head=3)"),
    ({"model.n_embd": {"randint": [32, 128]}}, {}, "use choice"),
    ({"optim.lr": {"loguniform": [1e-5, 1e-2]}}, {}, "optim.min_lr=0.0001 must be between 0 and optim.lr=1e-05"),
    ({"optim.warmup_fraction": {"uniform": [0.0, 1.5]}}, {}, "must lie in [0, 1)"),
    ({}, {}, "tune.space is empty"),
])
def test_a_bad_search_space_is_one_clear_error_before_any_trial(tmp_path, space, sizes, message):
    with pytest.raises(ConfigError) as e:
        load_tune_config(write(tmp_path, {"space": space, "model_sizes": sizes}))
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("tune.samples=0", "tune.samples (--samples) must be at least 1, got 0"),
    ("tune.sample=4", "unknown tune setting tune.sample"),
    ("tune.grace_steps=5", "tune.grace_steps=5 is below train.eval_interval=200"),
    ("tune.reduction_factor=1", "tune.reduction_factor must be at least 2"),
    ("model.n_embd=102", "model.n_embd=102 is not divisible by model.n_head=4"),
])
def test_bad_tune_settings_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_tune_config(write(tmp_path, {"space": SPACE}), [override])
    assert message in str(e.value)


def test_a_missing_tune_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tune_config(tmp_path / "nope.yaml")


def test_asha_rungs_stay_below_the_last_step():
    """ASHA judges trials at grace x factor^k below train.max_steps; a trial that reaches max_steps ends on
    its own (never stopped at its last report), and grace = max_steps means no early stopping at all."""
    from ray.tune.schedulers import FIFOScheduler

    from raygpt.tune import _scheduler

    def rungs(scheduler):
        return sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)

    assert rungs(_scheduler(10, 40, 2)) == [10, 20]
    assert rungs(_scheduler(50, 450, 3)) == [50, 150]
    assert isinstance(_scheduler(40, 40, 2), FIFOScheduler)
    assert _scheduler(10, 40, 2)._stop_last_trials is False


def test_a_pretrained_models_shape_is_not_searched(tmp_path):
    space = {"optim.lr": {"loguniform": [1e-5, 1e-3]}, "model.size": {"choice": ["s"]}}
    with pytest.raises(ConfigError, match=r"tune.space.model.size: train.init_from=runs/base fixes the model's"):
        load_tune_config(write(tmp_path, {"space": space, "model_sizes": {"s": {"n_layer": 2}}}),
                         ["train.init_from=runs/base"])
