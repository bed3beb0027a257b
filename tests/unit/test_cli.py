import subprocess
import sys
from pathlib import Path

import pytest

from raygpt.cli import main, split_config_args
from raygpt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_steps=20",
        "optim.warmup_steps=2", "train.batch_size=4", "train.log_interval=10", "train.eval_interval=10",
        "train.eval_steps=2", "data.max_chars=30000", "data.split=tail", "train.device=cpu", "sample.max_new_tokens=20",
        "sample.num_samples=1"]


def test_config_args_split():
    assert split_config_args(["c.yaml", "a.b=1"]) == ("c.yaml", ["a.b=1"])
    assert split_config_args(["a.b=1"]) == (None, ["a.b=1"])
    assert split_config_args([]) == (None, [])


def test_local_train_prints_samples_and_the_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", "--local", "configs/default.yaml", *TINY, f"train.out_dir={tmp_path}",
                          "train.run_name=cli"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 20/20" in out.stdout and "--- sample 1" in out.stdout
    # a sample from the fixed prompt at every eval (steps 10 and 20)
    assert "--- sample at step 10 ---\ndef " in out.stdout and "--- sample at step 20 ---\ndef " in out.stdout
    ckpt = tmp_path / "cli" / "step_000020"
    assert f"checkpoint: {ckpt}" in out.stdout
    assert (tmp_path / "cli" / "config.yaml").is_file() and (tmp_path / "cli" / "metrics.jsonl").is_file()
    gen = subprocess.run([sys.executable, "jobs/generate.py", str(ckpt), "def", "--max-new-tokens", "15",
                          "--seed", "1", "--top-k", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("def") and len(gen.stdout) > 4


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["train", "model.n_embd=100", "model.n_head=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.n_embd=100 is not divisible by model.n_head=3" in err
    assert main(["generate", str(tmp_path)]) == 2
    assert "not a raygpt checkpoint" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_wandb_logs_config_metrics_and_samples_offline_without_secrets(tmp_path, monkeypatch):
    from raygpt.local import train_local

    from tests.conftest import wandb_records

    secret = "f" * 40
    monkeypatch.setenv("WANDB_API_KEY", secret)  # set, but the run is offline: no network at test time
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None,
                      [*TINY, f"train.out_dir={tmp_path}", "train.run_name=wb", "logging.wandb=true",
                       "logging.wandb_mode=offline", "logging.wandb_project=test"])
    train_local(cfg, print_fn=lambda s: None)
    records = wandb_records(tmp_path / "wb")
    runs = [r["data"] for r in records if r["kind"] == "run"]
    assert runs and {r["run_id"] for r in runs} == {"wb"} and runs[0]["project"] == "test"
    config = runs[0]["config"]  # the resolved config
    assert config["model"]["n_layer"] == 1 and config["train"]["run_name"] == "wb"
    history = [r["data"] for r in records if r["kind"] == "history"]
    steps = {h["_step"] for h in history if "loss" in h}
    assert steps == {1, 10, 20} and all("tokens_per_s" in h for h in history if "loss" in h)
    assert {h["_step"] for h in history if "val_loss" in h} == {10, 20}
    assert [h["samples/nrows"] for h in history if "samples/nrows" in h] == [1, 2]  # the table grows per eval
    for f in (tmp_path / "wb").rglob("*"):  # the key is in no log, config, W&B file or checkpoint
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_tune_refuses_bad_input_before_ray_is_even_imported():
    code = ("import sys; from raygpt.cli import main; rc = main(sys.argv[1:]); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    for args, message in ((["--samples", "0"], "tune.samples (--samples) must be at least 1, got 0"),
                          (["tune.space={}"], "tune.space is empty")):
        out = subprocess.run([sys.executable, "-c", code, "tune", *args], capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout.strip() == "no ray", out.stdout + out.stderr
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


@pytest.mark.parametrize("command, shows", [
    ("train", ["raygpt train [-h] [--local] [--wandb] [CONFIG key=value ...]", "--local", "data.source=python-stdlib",
               "model.n_layer=4", "train.global_batch_size=none", "ray.storage_path=none", "sample.prompt='def '"]),
    ("prepare", ["raygpt prepare [-h] [CONFIG key=value ...]", "data.text_field=text", "data.on_bad_file=skip",
                 "data.prepared_dir=data/prepared"]),
    ("tune", ["--samples SAMPLES", "--resume", "tune.grace_steps=none", "tune.reduction_factor=3",
              "train.max_steps=1200"]),
    ("generate", ["checkpoint [prompt]", "--top-p TOP_P", "--device DEVICE"]),
])
def test_every_command_answers_help(capsys, command, shows):
    for flag in ("--help", "-h"):
        assert main([command, "model.n_layer=2", flag] if command != "generate" else [command, flag]) == 0
        out = capsys.readouterr()
        assert out.err == "" and out.out.startswith(f"usage: raygpt {command}")
        for text in shows:
            assert text in out.out, text


def test_unknown_options_are_one_usage_line_not_a_config_file(capsys):
    for command in ("train", "prepare", "tune", "generate"):
        assert main([command, "--foo", "model.n_layer=2"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err == (f"raygpt {command}: error: unrecognized arguments: --foo; see raygpt "
                                             f"{command} --help\n")


def test_help_needs_no_ray():
    code = ("import sys; from raygpt.cli import main\n"
            "for command in ('prepare', 'train', 'tune', 'generate'):\n"
            "    assert main([command, '--help']) == 0\n"
            "print('ray imported' if 'ray' in sys.modules else 'no ray')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.count("usage: raygpt") == 4 and out.stdout.rstrip().endswith("no ray")
