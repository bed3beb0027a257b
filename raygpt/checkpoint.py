"""One checkpoint directory format for every path (local loop, Ray workers, Tune trials).

    model.safetensors   weights (tied weights stored once)
    trainer_state.pt    optimizer, scaler, step, tokens seen, RNG states, data position
                        (plain tensors and containers: loads with torch.load(weights_only=True))
    config.yaml         the resolved config: the run can be re-run from its own folder
    tokenizer.json      the tokenizer
    meta.json           format version, step, tokens seen, val loss, size and sha256 of every file

A sharded model (FSDP) writes, in place of model.safetensors and the optimizer's part of trainer_state.pt,

    shards/             torch.distributed.checkpoint: __R_0.distcp from each rank R (its shard of the
                        weights and optimizer state) and .metadata (the index, from rank 0)

Every rank saves into a directory of its own (Ray Train merges the ranks' directories into one in storage);
rank 0's meta.json lists every rank's files, so a checkpoint that lacks one (an upload that died half-way)
is never taken for a good one. `raygpt export` turns one into a single-file checkpoint.

meta.json is written last and the whole directory is built under a temporary name and renamed into
place, so a crash mid-save never leaves something that looks like a checkpoint. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_model, save_model

from raygpt.config import Config, ConfigError, config_from_dict
from raygpt.tokenizer import Tokenizer, load_tokenizer

FORMAT = "raygpt-checkpoint"
FORMAT_VERSION = 1  # single-file weights
SHARDED_VERSION = 2  # the weights and optimizer state in shards/ (raygpt releases before it cannot read it)
META, WEIGHTS, STATE, CONFIG, TOKENIZER = "meta.json", "model.safetensors", "trainer_state.pt", "config.yaml", "tokenizer.json"
SHARDS = "shards"
ADAPTER = "adapter.safetensors"  # LoRA runs: the adapters' weights (raygpt.lora), beside the frozen ones


class CheckpointError(ValueError):
    """A path that is not a usable raygpt checkpoint; the message says which and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        else:
            return model


def save_checkpoint(path: str | Path, model: nn.Module, config: Config, tokenizer: Tokenizer, *,
                    optimizer: Optional[torch.optim.Optimizer] = None, scaler=None, train_state=None,
                    rng: Optional[dict] = None, data_state: Optional[dict] = None,
                    metrics: Optional[dict] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing one already there). ``optimizer``: the
    optimizer, or its state_dict().

    A sharded model's checkpoint is written by every rank (a collective), each into a ``path`` of its own
    that holds its shard; rank 0's also holds everything else and a meta.json that lists every rank's files."""
    from raygpt.lora import has_adapters, split_state
    from raygpt.parallel import is_sharded, save_shards

    sharded = is_sharded(unwrap(model))
    rank = torch.distributed.get_rank() if sharded else 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        if sharded:
            save_shards(tmp / SHARDS, unwrap(model), optimizer)
            mine = {f"{SHARDS}/{f.name}": _described(f) for f in sorted((tmp / SHARDS).iterdir())}
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
            for rank_files in everyone:
                files.update(rank_files)
        elif has_adapters(unwrap(model)):  # LoRA: the frozen weights as a plain GPT's, the adapters beside them
            from safetensors.torch import save_file

            from raygpt.model import GPT

            base, adapters = split_state(unwrap(model))
            plain = GPT(config.model)
            plain.load_state_dict(base)
            save_model(plain, str(tmp / WEIGHTS))
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / ADAPTER))
            files[ADAPTER] = _described(tmp / ADAPTER)
        else:
            save_model(unwrap(model), str(tmp / WEIGHTS))
        if rank == 0:
            state = {"rng": rng or {}, "data": data_state or {}}
            if train_state is not None:
                state["train"] = asdict(train_state)
            if optimizer is not None and not sharded:
                state["optimizer"] = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            torch.save(state, tmp / STATE)
            config.save(tmp / CONFIG)
            tokenizer.save(tmp)
            for name in ((STATE, CONFIG, TOKENIZER) if sharded else (WEIGHTS, STATE, CONFIG, TOKENIZER)):
                files[name] = _described(tmp / name)
            meta = {"format": FORMAT, "format_version": SHARDED_VERSION if sharded else FORMAT_VERSION,
                    "step": train_state.step if train_state else 0,
                    "tokens_seen": train_state.tokens_seen if train_state else 0,
                    "val_loss": (metrics or {}).get("val_loss"), "files": files,
                    # the metrics of the step it was taken at (loss, lr, grad norm, ...), numbers only
                    "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
            if sharded:
                meta["sharded"] = {"ranks": len(everyone), "format": "torch.distributed.checkpoint"}
            _write_synced(tmp / META, json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        if path.exists():
            # Rename the old one out of the way first: at every instant one complete checkpoint is at `path`
            # or at the trash name, never a mix.
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _described(f: Path) -> dict:
    """Size and sha256 of a file, once it is on disk (before meta.json says it is)."""
    _fsync_file(f)
    return {"bytes": f.stat().st_size, "sha256": _sha256(f)}


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint directory, checked: raises CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a raygpt checkpoint directory")
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a raygpt checkpoint (no {META}); an interrupted save leaves "
                              f"no {META}, so this may be a partial one")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a raygpt checkpoint ({META} has format {meta.get('format')!r})")
    if meta.get("format_version") not in (FORMAT_VERSION, SHARDED_VERSION):
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('format_version')!r}; this raygpt "
                              f"reads versions {FORMAT_VERSION} and {SHARDED_VERSION}: use the raygpt release that "
                              f"wrote it")
    return meta


def is_sharded_checkpoint(meta: dict) -> bool:
    """Weights and optimizer state in shards/ (written by a sharded model) rather than model.safetensors."""
    return "sharded" in meta


def verify(path: str | Path, meta: Optional[dict] = None) -> None:
    """Check every file's size and sha256 against meta.json: catches truncated or corrupt files."""
    path = Path(path)
    meta = meta or read_meta(path)
    for name, expect in meta["files"].items():
        f = path / name
        if not f.is_file():
            if name.startswith(f"{SHARDS}/"):
                raise CheckpointError(f"sharded checkpoint {path} is missing {name}, one of the "
                                      f"{meta['sharded']['ranks']} ranks' files its {META} lists (a copy that did "
                                      f"not finish?); use an earlier checkpoint, or copy the file there")
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != expect["bytes"]:
            raise CheckpointError(f"{f} is truncated or corrupt: {f.stat().st_size} bytes, expected {expect['bytes']}")
        if _sha256(f) != expect["sha256"]:
            raise CheckpointError(f"{f} is corrupt: its sha256 does not match {META}")


def load_config_of(path: str | Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load((Path(path) / CONFIG).read_text()))
    except ConfigError as e:
        raise CheckpointError(f"{path}/{CONFIG} is not a valid config: {e}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", check: bool = True,
                    optimizer_for=None):
    """Load a checkpoint: returns (model, config, tokenizer, trainer_state dict).

    The trainer state is loaded with weights_only=True; pass it to ``restore_training`` to resume. A sharded
    checkpoint loads whole in this one process (no process group needed), its optimizer state too when
    ``optimizer_for`` (a function of the model that builds its optimizer) is given: the trainer state then
    holds it as a single-file checkpoint would."""
    from raygpt.model import GPT  # here, so reading meta does not build torch modules

    path = Path(path)
    meta = read_meta(path)
    if check:
        verify(path, meta)
    config = load_config_of(path)
    tokenizer = load_tokenizer(path / TOKENIZER)
    model = GPT(config.model)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if is_sharded_checkpoint(meta):
        optimizer = optimizer_for(model) if optimizer_for is not None else None
        load_shards_of(path, model, optimizer)
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        return model.to(device), config, tokenizer, state
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
        if ADAPTER in meta["files"]:  # LoRA: the adapters go back on the frozen weights
            from safetensors.torch import load_file

            from raygpt.lora import add_adapters, load_adapters

            add_adapters(model, config.lora)
            load_adapters(model, load_file(str(path / ADAPTER)))
    except (ConfigError, CheckpointError):
        raise
    except Exception as e:  # safetensors raises several types for a bad file; all mean the same to a user
        raise CheckpointError(f"{path} cannot be loaded into the model of {CONFIG}: {e}") from None
    model.to(device)
    return model, config, tokenizer, state


def load_shards_of(path: Path, model: nn.Module, optimizer=None) -> None:
    """The weights (and optimizer state) of a sharded checkpoint into ``model``, sharded or not (see
    raygpt.parallel.load_shards); a file that does not match its index is one CheckpointError."""
    from raygpt.parallel import load_shards

    try:
        load_shards(path / SHARDS, model, optimizer)
    except (RuntimeError, ValueError, KeyError) as e:  # DCP wraps a rank's failure; the first line says what
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / SHARDS} cannot be loaded into the model of {CONFIG}: {first}") from None


def restore_training(state: dict, optimizer=None, scaler=None):
    """Put a loaded trainer state back into an optimizer and scaler; returns (TrainState, rng, data)."""
    from raygpt.train import TrainState

    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return TrainState(**state.get("train", {})), state.get("rng", {}), state.get("data", {})


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, a run directory's latest valid checkpoint when it is one."""
    if path.is_dir() and not (path / META).exists():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    return path


def check_new(out: Path, command: str) -> None:
    """The output of export, import-hf and export-hf is a new directory: never written over one that exists."""
    if out.exists():
        raise CheckpointError(f"{out} already exists; {command} writes a new directory: remove it or name another")


def export_checkpoint(src: str | Path, out: str | Path, weights_only: bool = False) -> Path:
    """A single-file copy (model.safetensors, the optimizer state in trainer_state.pt) of any checkpoint, a
    sharded one consolidated in this one process: `raygpt export`. ``weights_only`` leaves the optimizer
    state out (a resume from it starts AdamW's moments from zero, and says so)."""
    from raygpt.train import TrainState, configure_optimizer

    src, out = resolve_checkpoint(Path(src)), Path(out)
    check_new(out, "export")
    meta = read_meta(src)
    optim = load_config_of(src).optim
    build = None if weights_only else (lambda model: configure_optimizer(model, optim, torch.device("cpu")))
    model, config, tokenizer, state = load_checkpoint(src, optimizer_for=build)
    return save_checkpoint(out, model, config, tokenizer, optimizer=None if weights_only else state.get("optimizer"),
                           train_state=TrainState(**state.get("train", {})), rng=state.get("rng"),
                           data_state=state.get("data"), metrics={**meta["metrics"], "val_loss": meta["val_loss"]})


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The valid checkpoint with the highest step below ``directory``. Partial saves are skipped: no
    meta.json, or a file missing or of the wrong size (a copy to storage that died half-way)."""
    best, best_step = None, -1
    for child, meta, problem in _checkpoints(directory):
        if problem is None and meta["step"] > best_step:
            best, best_step = child, meta["step"]
    return best


def best_checkpoint(directory: str | Path, depth: int = 4) -> Optional[Path]:
    """The valid checkpoint with the lowest val loss anywhere below ``directory`` (a run folder, or a tune
    experiment's trial folders, ``depth`` levels down); the highest step among equals, and the latest when
    none has a val loss. What `raygpt serve --follow` serves."""
    def ranked(meta: dict, path: Path) -> tuple:  # sorts best first
        loss = meta.get("val_loss")
        return loss is None, loss if loss is not None else 0.0, -meta["step"], str(path), path

    found = [ranked(meta, child) for child, meta, problem in _checkpoints(directory) if problem is None]
    if depth > 1 and Path(directory).is_dir():
        for sub in sorted(Path(directory).iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and not (sub / META).exists():
                best = best_checkpoint(sub, depth - 1)
                if best is not None:
                    found.append(ranked(read_meta(best), best))
    return min(found)[-1] if found else None


def keep_best_checkpoints(directory: Path, keep: int) -> None:
    """Ray Train's rule (CheckpointConfig num_to_keep, scored by val_loss, lower is better) for checkpoints a
    process writes itself (Ray Train's local mode): keep the ``keep`` best and the newest, delete the rest.
    Only complete checkpoints count; equal losses keep the newer."""
    found = [(child, meta) for child, meta, problem in _checkpoints(directory) if problem is None]
    if len(found) <= keep:
        return
    newest = max(found, key=lambda cm: cm[1]["step"])[0]
    loss = lambda cm: (cm[1].get("val_loss") is None, cm[1].get("val_loss") or 0.0, -cm[1]["step"])  # noqa: E731
    for child, _ in sorted(found, key=loss)[keep:]:
        if child != newest:
            shutil.rmtree(child, ignore_errors=True)


def incomplete_checkpoints(directory: str | Path) -> list[tuple[Path, str]]:
    """The checkpoints below ``directory`` that latest_checkpoint skips for a missing or cut file, and which."""
    return [(child, problem) for child, _, problem in _checkpoints(directory) if problem is not None]


def _checkpoints(directory: str | Path):
    """(path, meta, what is wrong or None) of each folder below ``directory`` with a readable meta.json; a
    file missing or of another size than meta.json says is wrong (sizes only: cheap on a large run)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in sorted(directory.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            meta = read_meta(child)
        except CheckpointError:
            continue
        problem = None
        for name, f in meta["files"].items():
            if not (child / name).is_file():
                problem = f"{name} is missing"
            elif (child / name).stat().st_size != f["bytes"]:
                problem = f"{name} is cut short or corrupt"
            if problem:
                break
        yield child, meta, problem


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
