"""Train in this process, no Ray: the smoke run, notebooks, unit tests, the single-process baseline.

    from raygpt.local import train_local
    result = train_local(load_config("configs/default.yaml", ["train.max_steps=200"]))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from raygpt.checkpoint import unwrap
from raygpt.config import Config
from raygpt.data.corpus import prepare_arrays
from raygpt.data.sources import check_writable
from raygpt.data.windows import fixed_batches
from raygpt.lora import trainable_line
from raygpt.pretrained import apply_init_from
from raygpt.runs import (build_training, check_sample_prompt, device_for, find_resume, format_progress,
                         report_sample, run_dir, save_run_checkpoint, skipped_lines, with_vocab)
from raygpt.tokenizer import Tokenizer, load_tokenizer
from raygpt.tracking import WandbLogger
from raygpt.train import TokenBatches, train_loop


@dataclass
class LocalResult:
    run_dir: Path
    checkpoint: Optional[Path]  # the last checkpoint written (or resumed from)
    metrics: list[dict]  # every report of this process, in order
    tokenizer: Tokenizer


def train_local(cfg: Config, arrays: Optional[tuple[Tokenizer, np.ndarray, np.ndarray]] = None,
                print_fn: Callable[[str], None] = print,
                on_report: Optional[Callable[[dict], None]] = None) -> LocalResult:
    """Train cfg in this process; resume when the named run has checkpoints. ``arrays`` (tokenizer, train
    ids, val ids) skips reading the corpus, for tests and benchmarks. ``on_report(metrics)`` sees every
    report after it is logged (an exception it raises ends the run there: a pruned trial of a search)."""
    check_writable(cfg.train.out_dir, "train.out_dir")  # before any work: the run folder goes there
    cfg = apply_init_from(cfg, print_fn)  # the pretrained model's shape and tokenizer, before the data
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = device_for(cfg)
    path = run_dir(cfg)
    resume = find_resume(cfg, path)
    if arrays is None:
        tokenizer = None
        if resume is not None:
            tokenizer = load_tokenizer(resume)  # the run's own, not a retrained one
        arrays = prepare_arrays(cfg.data, tokenizer, print_fn)
    tokenizer, train_ids, val_ids = arrays
    cfg = with_vocab(cfg, tokenizer)
    check_sample_prompt(cfg, tokenizer)
    t = build_training(cfg, device, resume)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path / "config.yaml")
    print_fn(f"run {path} | {unwrap(t.model).num_params() / 1e6:.2f}M params | "
             f"{tokenizer!r} | {len(train_ids):,} train / {len(val_ids):,} val tokens | {device} {t.precision}"
             + (f" | resuming {resume.name} (step {t.state.step})" if resume else ""))
    if t.note:
        print_fn(f"resume: {t.note}")
    if t.init:
        print_fn(t.init)
    if cfg.finetune.method == "lora":
        print_fn(trainable_line(unwrap(t.model)))
    for line in skipped_lines(path):
        print_fn(line)

    block, batch = cfg.model.block_size, cfg.train.batch_size
    train_batches = TokenBatches(train_ids, block, batch, cfg.train.seed, device)
    if "generator" in t.data_state:  # where this loop's random windows stood
        train_batches.load_state_dict(t.data_state)
    elif t.state.step:  # a Ray run's checkpoint: its data position (epoch of a deal of units) means nothing here
        train_batches = TokenBatches(train_ids, block, batch, cfg.train.seed + t.state.step, device)
        print_fn("resume: the checkpoint was written by a Ray run, whose place in the data does not carry over "
                 "to --local: random windows from a new seed (train.seed + step)")
    # The same fixed val windows as the Ray workers pick: val losses compare across steps, runs and paths.
    val = fixed_batches([val_ids], len(val_ids), block, batch, cfg.train.eval_steps, cfg.train.seed + 1, device)

    reports: list[dict] = []
    last_ckpt = resume
    tracker = WandbLogger(cfg, path, print_fn) if cfg.logging.wandb else None
    with open(path / "metrics.jsonl", "a") as log:
        def report(metrics: dict, state, checkpoint: bool) -> None:
            nonlocal last_ckpt
            reports.append(dict(metrics))
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            print_fn(format_progress(metrics, cfg.train.max_steps))
            if tracker:
                tracker.log(metrics)
            if "val_loss" in metrics:
                report_sample(t.model, tokenizer, cfg, t.precision, state.step, print_fn, tracker)
            if checkpoint:
                last_ckpt = save_run_checkpoint(path, cfg, tokenizer, t, metrics, train_batches.state_dict())
            if on_report is not None:
                on_report(metrics)

        try:
            train_loop(cfg, t.model, t.optimizer, t.scaler, train_batches, lambda: val, report, t.state,
                       device=device, precision=t.precision, flops_per_token=t.flops_per_token)
        finally:
            if tracker:
                tracker.finish()
    return LocalResult(path, last_ckpt, reports, tokenizer)
