"""TorchTrainer over prepared shards -> Ray checkpoints -> raygpt.load, on the session's Ray cluster."""

import math
import subprocess
from pathlib import Path

import pytest

import raygpt
from raygpt.config import ConfigError, load_config
from raygpt.distributed import train

from tests.conftest import wandb_records
from tests.integration.conftest import ENV, RAY, train_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=8",
        "train.max_steps=40", "optim.warmup_steps=5", "train.log_interval=10", "train.eval_interval=20",
        "train.eval_steps=4", "train.checkpoint_interval=20", "data.max_chars=400000", "sample.max_new_tokens=20",
        "sample.num_samples=1"]


def tiny(tmp_path, *over):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path / 'runs'}",
                              f"data.prepared_dir={tmp_path / 'prepared'}", *over])


def test_one_worker_trains_checkpoints_and_loads(ray_cluster, tmp_path):
    cfg = tiny(tmp_path, "train.run_name=one", "train.keep_checkpoints=1", "logging.wandb=true",
               "logging.wandb_mode=offline")
    result = train(cfg, print_fn=lambda s: None)
    assert result.error is None
    # rank 0 logged one W&B run (offline, in the run folder): metrics at every log step, samples at evals
    records = wandb_records(tmp_path / "runs" / "one")
    assert {r["data"]["run_id"] for r in records if r["kind"] == "run"} == {"one"}
    history = [r["data"] for r in records if r["kind"] == "history"]
    assert {h["_step"] for h in history if "loss" in h} == {1, 10, 20, 30, 40}
    assert [h["samples/nrows"] for h in history if "samples/nrows" in h] == [1, 2]
    m = result.metrics
    assert m["step"] == 40 and m["tokens_seen"] == 40 * 8 * 32 and math.isfinite(m["val_loss"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "data_wait", "val_perplexity"} <= set(m)
    assert len(result.best_checkpoints) == 1  # keep the best N by val loss
    assert Path(result.checkpoint.path).name == "step_000040"
    for source in (result.checkpoint, result.checkpoint.path, tmp_path / "runs" / "one"):
        gen = raygpt.load(source, device="cpu")
        assert isinstance(gen.generate("def ", max_new_tokens=10, seed=0), str)
    with open(Path(result.path) / "step_000040" / "meta.json") as f:
        assert '"step": 40' in f.read()


def test_two_workers_keep_the_global_batch(ray_cluster, tmp_path):
    cfg = tiny(tmp_path, "train.run_name=two", "ray.num_workers=2", "train.global_batch_size=16",
               "train.max_steps=20", "train.checkpoint_interval=20", "train.eval_interval=20")
    result = train(cfg, print_fn=lambda s: None)
    assert result.error is None
    # 2 workers x batch 8 x 1 micro-step = 16 sequences per step, as with 1 worker x 8 x 2 micro-steps
    assert result.metrics["tokens_seen"] == 20 * 16 * 32
    assert raygpt.load(result.checkpoint).generate("x", max_new_tokens=5, seed=0) is not None


def test_more_workers_than_the_cluster_has_fails_fast(ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match="needs 3 CPUs but the cluster has 2"):
        train(tiny(tmp_path, "ray.num_workers=3"), print_fn=lambda s: None)


def test_a_prompt_the_corpus_cannot_encode_fails_before_the_trainer_starts(ray_cluster, tmp_path):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abc cab bca\n" * 3000)  # no 'd', 'e' or 'f' for sample.prompt='def '
    with pytest.raises(ConfigError, match="sample.prompt='def ' cannot be encoded: 'd' "):
        train(tiny(tmp_path, f"data.source={corpus}", "data.split=tail", "train.run_name=p"), print_fn=lambda s: None)
    assert not (tmp_path / "runs" / "p").exists()  # no TorchTrainer, no run


def test_ray_job_submit_trains_and_writes_a_loadable_checkpoint(ray_cluster, tmp_path):
    out_dir = tmp_path / "job-runs"
    cmd = [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(ROOT),
           "--", "python", "jobs/train.py", "configs/default.yaml", *TINY, "train.run_name=job",
           f"train.out_dir={out_dir}", f"data.prepared_dir={tmp_path / 'prepared'}"]
    import os
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV}, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "--- sample 1" in out.stdout
    # raygpt turned on Ray Train's state tracking in the job's driver: the dashboard's Train view lists the
    # run, finished, with its worker.
    run = train_run(ray_cluster["dashboard"], "job")
    assert run is not None and run["status"] == "FINISHED", run
    assert [w["world_rank"] for w in run["attempts"][-1]["workers"]] == [0]
    gen = raygpt.load(out_dir / "job", device="cpu")
    assert isinstance(gen.generate("def ", max_new_tokens=10, seed=0), str)


def test_the_token_protected_head_refuses_a_submission_without_the_token(ray_cluster, tmp_path):
    """The session's head requires Ray's token (conftest.ENV); the job test above submits with it."""
    import os

    cmd = [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--", "echo", "hi"]
    for env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},  # a wrong token
                {"RAY_AUTH_MODE": "disabled"}):  # none at all
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**clean, "HOME": str(tmp_path), **env})  # HOME: no ~/.ray/auth_token
        said = out.stdout + out.stderr  # "Forbidden: Invalid authentication token" / "Unauthorized: Missing ..."
        assert out.returncode != 0 and ("Forbidden" in said or "Unauthorized" in said), said
        assert "hi\n" not in out.stdout
