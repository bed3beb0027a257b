"""One checkpoint directory format for every path (local loop, Ray workers, Tune trials).

    model.safetensors   weights (tied weights stored once)
    trainer_state.pt    optimizer, scaler, step, tokens seen, RNG states, data position
                        (plain tensors and containers: loads with torch.load(weights_only=True))
    config.yaml         the resolved config: the run can be re-run from its own folder
    tokenizer.json      the tokenizer
    meta.json           format version, step, tokens seen, val loss, size and sha256 of every file

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
FORMAT_VERSION = 1
META, WEIGHTS, STATE, CONFIG, TOKENIZER = "meta.json", "model.safetensors", "trainer_state.pt", "config.yaml", "tokenizer.json"


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
                    metrics: Optional[dict] = None, whole: Optional[tuple[dict, dict]] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing one already there). ``whole``: the
    (model, optimizer) state dicts of a sharded model, gathered (raygpt.parallel.full_state), written in
    place of ``model``'s and ``optimizer``'s own, so the files are the same whatever the strategy."""
    if whole is not None:
        from raygpt.model import GPT

        model = GPT(config.model)
        model.load_state_dict(whole[0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(unwrap(model), str(tmp / WEIGHTS))
        state = {"rng": rng or {}, "data": data_state or {}}
        if train_state is not None:
            state["train"] = asdict(train_state)
        if optimizer is not None:
            state["optimizer"] = whole[1] if whole is not None else optimizer.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        torch.save(state, tmp / STATE)
        config.save(tmp / CONFIG)
        tokenizer.save(tmp)
        files = {}
        for name in (WEIGHTS, STATE, CONFIG, TOKENIZER):
            _fsync_file(tmp / name)  # on disk before meta.json says they are
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "step": train_state.step if train_state else 0,
                "tokens_seen": train_state.tokens_seen if train_state else 0,
                "val_loss": (metrics or {}).get("val_loss"), "files": files,
                # the metrics of the step it was taken at (loss, lr, grad norm, ...), numbers only
                "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('format_version')!r}; this raygpt "
                              f"reads version {FORMAT_VERSION}: use the raygpt release that wrote it")
    return meta


def verify(path: str | Path, meta: Optional[dict] = None) -> None:
    """Check every file's size and sha256 against meta.json: catches truncated or corrupt files."""
    path = Path(path)
    meta = meta or read_meta(path)
    for name, expect in meta["files"].items():
        f = path / name
        if not f.is_file():
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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", check: bool = True):
    """Load a checkpoint: returns (model, config, tokenizer, trainer_state dict).

    The trainer state is loaded with weights_only=True; pass it to ``restore_training`` to resume."""
    from raygpt.model import GPT  # here, so reading meta does not build torch modules

    path = Path(path)
    meta = read_meta(path)
    if check:
        verify(path, meta)
    config = load_config_of(path)
    tokenizer = load_tokenizer(path / TOKENIZER)
    model = GPT(config.model)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    except Exception as e:  # safetensors raises several types for a bad file; all mean the same to a user
        raise CheckpointError(f"{path / WEIGHTS} cannot be loaded into the model of {CONFIG}: {e}") from None
    model.to(device)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return model, config, tokenizer, state


def restore_training(state: dict, optimizer=None, scaler=None):
    """Put a loaded trainer state back into an optimizer and scaler; returns (TrainState, rng, data)."""
    from raygpt.train import TrainState

    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return TrainState(**state.get("train", {})), state.get("rng", {}), state.get("data", {})


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The valid checkpoint with the highest step below ``directory``. Partial saves are skipped: no
    meta.json, or a file missing or of the wrong size (a copy to storage that died half-way)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best, best_step = None, -1
    for child in directory.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            meta = read_meta(child)
        except CheckpointError:
            continue
        step = meta["step"]
        if any(not (child / name).is_file() or (child / name).stat().st_size != f["bytes"]
               for name, f in meta["files"].items()):
            continue
        if step > best_step:
            best, best_step = child, step
    return best


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
