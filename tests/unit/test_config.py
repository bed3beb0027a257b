from pathlib import Path

import pytest

from raygpt.config import Config, ConfigError, grad_accum_steps, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_valid_and_overrides_win_over_yaml(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("model:\n  n_layer: 6\n  n_head: 2\noptim:\n  lr: 3e-4\n")
    cfg = load_config(yml, ["model.n_layer=8", "train.run_name=x"])
    assert cfg.model.n_layer == 8  # override beats YAML
    assert cfg.model.n_head == 2  # YAML beats default
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" read as a number, not a string
    assert cfg.model.n_embd == Config().model.n_embd  # untouched default
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("name", ["default", "shakespeare_char", "gpt2_124m", "gpt2_xl", "gpt2_7b", "finetune_gpt2"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if name == "shakespeare_char":
        m, t = cfg.model, cfg.train
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
        assert (t.batch_size, t.max_steps, cfg.optim.lr) == (64, 5000, 1e-3)
    if name == "finetune_gpt2":  # the shape comes from GPT-2 itself (train.init_from), so it sets none
        assert cfg.train.init_from == "gpt2" and not {"model.n_layer", "model.n_embd"} & cfg.explicit
    if name == "gpt2_124m":
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.data.tokenizer) == (12, 768, 1024, "bpe")


@pytest.mark.parametrize("override, key", [
    (["model.n_layers=3"], "model.n_layers"),                 # unknown key
    (["modle.n_layer=3"], "modle"),                          # unknown section
    (["model.n_layer=three"], "model.n_layer"),              # wrong type
    (["model.n_layer=2.5"], "model.n_layer"),                # not an integer
    (["model.bias=yes please"], "model.bias"),               # not a bool
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),  # not divisible
    (["optim.warmup_steps=2000", "train.max_steps=1000"], "optim.warmup_steps"),
    (["model.n_layer=0"], "model.n_layer"),                  # non-positive
    (["train.batch_size=-4"], "train.batch_size"),
    (["model.dropout=1.0"], "model.dropout"),                # dropout outside [0, 1)
    (["model.dropout=-0.1"], "model.dropout"),
    (["train.precision=fp8"], "train.precision"),            # not a choice
    (["data.tokenizer=wordpiece"], "data.tokenizer"),
    (["optim.min_lr=1.0"], "optim.min_lr"),                  # above lr
    (["train.global_batch_size=20", "train.batch_size=8"], "train.global_batch_size"),
    (["sample.top_p=1.5"], "sample.top_p"),
    (["optim.lr"], "optim.lr"),                              # not key=value
])
def test_bad_config_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert key in str(e.value)


def test_bad_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  n_lyer: 2\n")
    with pytest.raises(ConfigError, match="model.n_lyer"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.n_layer=3", "optim.lr=0.002", "sample.top_k=null"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.sample.top_k is None


def test_grad_accum_keeps_global_batch_for_any_worker_count():
    cfg = load_config(None, ["train.batch_size=4", "train.global_batch_size=32"])
    assert [grad_accum_steps(cfg.train, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="global_batch_size"):
        grad_accum_steps(cfg.train, 3)
    assert grad_accum_steps(load_config(None, ["train.batch_size=4"]).train, 2) == 1


@pytest.mark.parametrize("over, message", [
    (["ray.fail_at_step=0"], "ray.fail_at_step=0 must be between 1 and train.max_steps"),
    (["ray.fail_at_step=5", "ray.fail_rank=2", "ray.num_workers=2"], "ray.fail_rank=2 is not a worker rank"),
    (["ray.fail_at_step=5", "ray.fail_in=checkpoint", "ray.fail_rank=1", "ray.num_workers=2"],
     "needs ray.fail_rank=0"),
    (["ray.fail_at_step=5", "ray.storage_path=s3://bucket/runs"], "needs a local ray.storage_path"),
    (["ray.fail_in=disk"], "ray.fail_in"),
    (["ray.fail_at_step=5", "ray.num_workers=0"], "needs Ray Train workers"),
    (["ray.fail_at_step=5", "ray.local_mode=true"], "needs Ray Train workers"),
    (["ray.local_mode=true", "ray.num_workers=2"], "ray.local_mode=true trains in this process, one worker"),
    (["ray.local_mode=true", "ray.strategy=fsdp"], "ray.strategy=fsdp needs Ray Train workers"),
    (["ray.local_mode=sometimes"], "ray.local_mode"),
    (["sample.eval_tokens=-1"], "sample.eval_tokens=-1 must not be negative"),
])
def test_fault_injection_and_eval_sample_settings_are_checked(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, over)
