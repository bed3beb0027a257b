"""A run: its folder, the objects it trains, resuming it, printing progress, saving its checkpoints.

Shared by the local loop (raygpt.local) and the Ray worker (raygpt.distributed) so both build, resume and
save a run the same way. No Ray here.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from raygpt.checkpoint import (STATE, CheckpointError, incomplete_checkpoints, is_sharded_checkpoint,
                               keep_best_checkpoints, latest_checkpoint, load_checkpoint,
                               load_config_of, load_shards_of, read_meta, restore_training, save_checkpoint,
                               unwrap, verify)
from raygpt.config import Config, ConfigError
from raygpt.model import GPT
from raygpt.parallel import checkpoint_blocks, load_optimizer
from raygpt.lora import add_adapters
from raygpt.pretrained import load_pretrained
from raygpt.tokenizer import Tokenizer, load_tokenizer
from raygpt.generate import check_prompt, generate_tokens
from raygpt.train import (TrainState, configure_optimizer, make_scaler, resolve_device,
                          resolve_precision, rng_state, seed_rank, set_rng_state)


def name_run(cfg: Config) -> str:
    """cfg.train.run_name, or a fresh timestamped one written back to cfg (a run without a name is new)."""
    if cfg.train.run_name is None:
        cfg.train.run_name = datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return cfg.train.run_name


def run_dir(cfg: Config) -> Path:
    """out_dir/run_name (named by name_run)."""
    return Path(cfg.train.out_dir) / name_run(cfg)


def with_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """cfg with model.vocab_size filled from the tokenizer (or checked against it when set)."""
    m = cfg.model
    if m.vocab_size is None:
        cfg.model = dataclasses.replace(m, vocab_size=tokenizer.vocab_size)
    elif m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); leave it unset or raise it")
    return cfg


def check_sample_prompt(cfg: Config, tokenizer: Tokenizer) -> None:
    """sample.prompt (every eval's sample, the samples after training) must encode with the run's tokenizer.
    Every path (--local, Ray, tune) checks it as soon as the tokenizer is known, before any step, so a
    prompt the corpus lacks characters for is not found at the first eval."""
    try:
        check_prompt(tokenizer, cfg.sample.prompt, "sample.prompt",
                     "set sample.prompt to text made of the corpus's characters, or use data.tokenizer=bytes")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_resumable(cfg: Config, saved: Config, path: Path) -> None:
    """A run resumes only into the same model and tokenizer settings; say which key differs."""
    sections = ("model", "data", "finetune") + (("lora",) if cfg.finetune.method == "lora" else ())
    for section in sections:
        mine, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(saved, section))
        for key in mine:
            if section == "model" and key == "vocab_size" and mine[key] is None:
                continue
            if section == "data" and key not in ("source", "tokenizer", "bpe_vocab_size", "tokenizer_path"):
                continue
            if mine[key] != theirs[key]:
                raise ConfigError(f"cannot resume {path}: {section}.{key} was {theirs[key]!r} there and is "
                                  f"{mine[key]!r} now; use another train.run_name for a new run")


@dataclass
class Training:
    """Everything one process trains with."""
    model: nn.Module  # possibly compiled; DDP wrapping happens outside
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainState
    data_state: dict
    device: torch.device
    precision: str
    flops_per_token: float
    note: str = ""  # what a resume could not carry over exactly (printed by the caller)
    init: str = ""  # where train.init_from's weights came from (a new run only; printed by the caller)


def build_training(cfg: Config, device: torch.device, resume: Optional[Path] = None, rank: int = 0,
                   world: int = 1, shard: Optional[Callable[[nn.Module], nn.Module]] = None) -> Training:
    """Model, optimizer and scaler from cfg (model.vocab_size must be set), restored from ``resume``, for
    data-parallel rank ``rank`` of ``world``: every rank builds the same initial weights, then draws from
    random streams of its own (seed + rank), saved and restored per rank (rank_states). ``shard`` (FSDP:
    raygpt.parallel.shard) is applied to the model before the optimizer is built. A single-file checkpoint's
    weights go in before sharding and its optimizer state is split over the ranks after; a sharded one's
    (DCP) are read by each rank for its own shard, after sharding, whatever the worker count that wrote it."""
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cuda":
        # fp32 matmuls on tensor cores (TF32), as nanoGPT does; the MFU table's fp32 peak assumes it.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    init = load_pretrained(cfg, model) if resume is None and cfg.train.init_from else ""
    if cfg.finetune.method == "lora":  # before seed_rank: every rank starts with the same adapters
        add_adapters(model, cfg.lora)
    seed_rank(cfg.train.seed, rank)
    state, data_state, notes = TrainState(), {}, []
    sharded_resume = resume is not None and is_sharded_checkpoint(read_meta(resume))
    if resume is not None and not sharded_resume:
        saved_model, _, _, saved = load_checkpoint(resume, device=device)
        model.load_state_dict(saved_model.state_dict())
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model)
    if shard is not None:
        model = shard(model)
    optimizer = configure_optimizer(model, cfg.optim, device)
    scaler = make_scaler(device, precision)
    if resume is not None:
        if sharded_resume:
            verify(resume)
            load_shards_of(resume, model, optimizer)
            saved = torch.load(resume / STATE, map_location="cpu", weights_only=True)
        elif "optimizer" not in saved:
            notes.append("the checkpoint holds no optimizer state (a weights-only export): AdamW's moments start "
                         "at zero")
        elif shard is not None:
            load_optimizer(model, optimizer, saved.pop("optimizer"))
        state, rng, data_state = restore_training(saved, optimizer, scaler)
        state.resumed_from.append(state.step)
        saved_states = rank_states(rng)
        if rank < len(saved_states):
            set_rng_state(saved_states[rank], device)
        else:
            seed_rank(cfg.train.seed, rank, state.step)
        if len(saved_states) != world:
            notes.append(f"the checkpoint holds the random state of {len(saved_states)} rank(s) and this run has "
                         f"{world}" + (f": ranks {len(saved_states)}-{world - 1} start fresh streams (seed, rank, step)"
                                       if world > len(saved_states) else "")
                         + "; dropout masks from here differ from an uninterrupted run's")
    flops = model.flops_per_token()
    if cfg.train.compile:
        model = torch.compile(model)
    return Training(model, optimizer, scaler, state, data_state, device, precision, flops, "; ".join(notes), init)


def rank_states(rng: dict) -> list[dict]:
    """The per-rank random states a checkpoint holds ({"ranks": [...]}; before per-rank states: one)."""
    if not rng:
        return []
    return list(rng["ranks"]) if "ranks" in rng else [rng]


def find_resume(cfg: Config, path: Path, tokenizer: Optional[Tokenizer] = None) -> Optional[Path]:
    """The latest valid checkpoint of the run at ``path``, checked against cfg (and the tokenizer the data
    was prepared with, when given); None for a new run."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        return None
    check_resumable(cfg, load_config_of(ckpt), ckpt)
    if tokenizer is not None and load_tokenizer(ckpt)._to_json() != tokenizer._to_json():
        raise ConfigError(f"cannot resume {ckpt}: the data is now tokenized differently ({tokenizer!r}) from "
                          f"what the run trained on ({load_tokenizer(ckpt)!r}); use another train.run_name "
                          f"for a new run, or the data settings the run used")
    return ckpt


def skipped_lines(path: Path) -> list[str]:
    """A line for each checkpoint of the run at ``path`` that a resume skips (a file missing or cut short)."""
    return [f"resume: skipped {child.name}: {problem} (a save or copy that did not finish; never resumed from)"
            for child, problem in incomplete_checkpoints(path)]


def resume_points(cfg: Config, tokenizer: Tokenizer, path: Path) -> list[TrainState]:
    """Where each valid checkpoint of the run at ``path`` stands (empty for a new run), after checking that
    the latest one can resume with cfg and tokenizer. Ray may pick any of them to restart from."""
    if find_resume(cfg, path, tokenizer) is None:
        return []
    points = []
    for child in sorted(path.glob("step_*")):
        try:
            meta = read_meta(child)
        except CheckpointError:
            continue  # a partial save: never resumed from
        points.append(TrainState(step=meta["step"], tokens_seen=meta["tokens_seen"]))
    return points


def save_run_checkpoint(path: Path, cfg: Config, tokenizer: Tokenizer, t: Training, metrics: dict,
                        data_state: dict) -> Path:
    """Write step_NNNNNN in the run folder (the layout Ray Train writes too) and keep what Ray Train's
    CheckpointConfig keeps: the best train.keep_checkpoints by val loss, and the newest."""
    ckpt = save_checkpoint(path / f"step_{t.state.step:06d}", t.model, cfg, tokenizer,
                           optimizer=t.optimizer, scaler=t.scaler, train_state=t.state,
                           rng={"ranks": [rng_state(t.device)]},
                           data_state=data_state, metrics=metrics)
    keep_best_checkpoints(path, cfg.train.keep_checkpoints)
    return ckpt


def format_progress(m: dict, max_steps: int) -> str:
    """One line per log interval: step/total, loss, val loss, speed, elapsed and ETA."""
    parts = [f"step {m['step']:>{len(str(max_steps))}}/{max_steps}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"{m['tokens_per_s'] / 1e3:.1f}k tok/s",
              f"{m['step_time_ms']:.1f} ms/step", f"data {100 * m['data_wait']:.0f}%"]
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    elapsed = m["elapsed_s"]
    eta = m["step_time_ms"] / 1000 * (max_steps - m["step"])  # at the current speed (start-up excluded)
    parts.append(f"{_hms(elapsed)} elapsed, ETA {_hms(eta)}")
    return " | ".join(parts)


@torch.no_grad()
def eval_sample(model: nn.Module, tokenizer: Tokenizer, cfg: Config, precision: str) -> str:
    """The sample printed and logged at every eval: sample.eval_tokens tokens from sample.prompt with
    sample.seed, so samples compare across evals. Uses its own generator: training's RNG is untouched."""
    raw = unwrap(model)
    device = next(raw.parameters()).device
    s = cfg.sample
    was_training = raw.training
    raw.eval()
    try:
        ids = generate_tokens(raw, tokenizer.encode(s.prompt) or [tokenizer.eot_id], s.eval_tokens, s.temperature,
                              s.top_k, s.top_p, generator=torch.Generator(device=device).manual_seed(s.seed),
                              precision=precision)
        return s.prompt + tokenizer.decode(list(ids))
    finally:
        raw.train(was_training)


def report_sample(model: nn.Module, tokenizer: Tokenizer, cfg: Config, precision: str, step: int, print_fn,
                  tracker=None) -> None:
    """At an eval (both training paths, rank 0): print the eval sample and log it to W&B when on."""
    if not cfg.sample.eval_tokens:
        return
    text = eval_sample(model, tokenizer, cfg, precision)
    print_fn(f"--- sample at step {step} ---\n{text}\n---")
    if tracker:
        tracker.sample(step, text)


def error_line(error: BaseException) -> str:
    """The line of a failed run's error that says what went wrong: Ray wraps the worker's exception in its
    own tracebacks, so take the last `SomeError: message` line, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line)]
    if not said:
        return (lines[0] if lines else type(error).__name__)[:300]
    line = lines[said[-1]]
    if line.endswith(":") and said[-1] + 1 < len(lines):  # "...worker errors:" says what on the next line
        line += " " + lines[said[-1] + 1]
    return line[:300]


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def device_for(cfg: Config) -> torch.device:
    try:
        return resolve_device(cfg.train.device, "train.device")
    except ValueError as e:
        raise ConfigError(str(e)) from None


__all__ = ["run_dir", "with_vocab", "check_sample_prompt", "build_training", "find_resume", "resume_points",
           "save_run_checkpoint", "format_progress", "Training", "CheckpointError", "device_for"]
