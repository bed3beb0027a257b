"""train.init_from: a new run that starts from pretrained weights (nanoGPT's init_from, litgpt's finetune).

    raygpt train configs/finetune_gpt2.yaml            # train.init_from: gpt2
    raygpt train train.init_from=runs/base data.source=my.txt

The source is a raygpt checkpoint (or a run folder: its latest), a Hugging Face GPT-2 folder, or a hub id.
Its model shape and tokenizer become the run's: the data is prepared with that tokenizer, so the ids mean
what the weights learned. model.block_size may be lowered (the position table is cropped, as nanoGPT does),
never raised, and model.dropout set; anything else that differs is an error that says so. Step 0, a fresh
optimizer and schedule. A run that already has checkpoints resumes from them instead. No Ray here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raygpt.checkpoint import CheckpointError, is_sharded_checkpoint, load_config_of, read_meta, resolve_checkpoint
from raygpt.config import Config, ConfigError, ModelConfig
from raygpt.tokenizer import FILENAME

SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "tie_weights")  # what the weights fix


@dataclasses.dataclass
class Pretrained:
    kind: str  # "raygpt" or "hf"
    path: Path  # the checkpoint, or the HF folder
    model: ModelConfig
    tokenizer_kind: str
    tokenizer_path: Path


def find_pretrained(source: str, print_fn=lambda s: None) -> Pretrained:
    """What train.init_from names, read without loading weights (config.yaml / config.json only)."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ckpt = resolve_checkpoint(path)
        try:
            read_meta(ckpt)
        except CheckpointError as e:
            raise ConfigError(f"train.init_from={source}: {e}") from None
        saved = load_config_of(ckpt)
        return Pretrained("raygpt", ckpt, saved.model, saved.data.tokenizer, ckpt / FILENAME)
    from raygpt.hf import _folder, model_config_of

    try:
        folder = _folder(source, print_fn)
        model = model_config_of(folder)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={source}: {e}") from None
    if not (folder / FILENAME).is_file():
        raise ConfigError(f"train.init_from={source}: the folder has no {FILENAME} (only GPT-2's older vocab.json "
                          f"+ merges.txt?); convert it once with `raygpt import-hf {source} OUT` and init from OUT")
    return Pretrained("hf", folder, model, "bpe", folder / FILENAME)


def apply_init_from(cfg: Config, print_fn=lambda s: None) -> Config:
    """cfg with the model shape and tokenizer of cfg.train.init_from (unchanged without one). Keys the user
    set (cfg.explicit, from load_config) are checked against the pretrained model's; a config without that
    record (already resolved, as a Tune trial's) is checked whole. Call before preparing data."""
    if not cfg.train.init_from:
        return cfg
    p = find_pretrained(cfg.train.init_from, print_fn)
    explicit = getattr(cfg, "explicit", None)
    mine = dataclasses.asdict(cfg.model)
    theirs = dataclasses.asdict(p.model)
    given = (lambda key: f"model.{key}" in explicit) if explicit is not None else (lambda key: True)
    for key in SHAPE:
        if given(key) and mine[key] is not None and mine[key] != theirs[key]:
            raise ConfigError(f"model.{key}={mine[key]!r}, but train.init_from={cfg.train.init_from} is a model with "
                              f"{key}={theirs[key]!r}; its weights fix the shape: leave model.{key} unset")
    block = mine["block_size"] if given("block_size") else theirs["block_size"]
    if block > theirs["block_size"]:
        raise ConfigError(f"model.block_size={block} is above the {theirs['block_size']} positions "
                          f"train.init_from={cfg.train.init_from} was trained with; it can be lowered, not raised")
    cfg.model = dataclasses.replace(p.model, block_size=block,
                                    dropout=mine["dropout"] if given("dropout") else p.model.dropout)
    d = cfg.data
    tokenizer_path = str(p.tokenizer_path.resolve())
    if explicit is not None and "data.tokenizer_path" in explicit and d.tokenizer_path \
            and Path(d.tokenizer_path).resolve() != Path(tokenizer_path):
        raise ConfigError(f"data.tokenizer_path={d.tokenizer_path}, but train.init_from={cfg.train.init_from} "
                          f"comes with its own tokenizer ({tokenizer_path}), the one its weights know: leave "
                          f"data.tokenizer_path unset")
    if (explicit is None or "data.tokenizer" in explicit) and d.tokenizer != p.tokenizer_kind:
        raise ConfigError(f"data.tokenizer={d.tokenizer}, but train.init_from={cfg.train.init_from} was trained "
                          f"with a {p.tokenizer_kind} tokenizer; leave data.tokenizer unset: the data is tokenized "
                          f"with the model's own")
    cfg.data = dataclasses.replace(d, tokenizer=p.tokenizer_kind, tokenizer_path=tokenizer_path)
    return cfg


def load_pretrained(cfg: Config, model) -> str:
    """Put the weights of cfg.train.init_from into ``model`` (built from cfg.model, after apply_init_from);
    returns a line saying where they came from."""
    import torch

    p = find_pretrained(cfg.train.init_from)
    if p.kind == "raygpt":
        from raygpt.checkpoint import load_checkpoint

        state = load_checkpoint(p.path)[0].state_dict()
        meta = read_meta(p.path)
        where = f"{p.path} (step {meta['step']}{', sharded' if is_sharded_checkpoint(meta) else ''})"
    else:
        from raygpt.hf import hf_weights, raygpt_state

        state = raygpt_state(hf_weights(p.path), p.model)
        where = f"{p.path} (Hugging Face GPT-2)"
    block = cfg.model.block_size
    positions = state["transformer.wpe.weight"].shape[0]
    if block < positions:  # nanoGPT's crop_block_size: the first block_size positions
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block]
    with torch.no_grad():
        model.load_state_dict({k: v.to(model.transformer.wte.weight.device) for k, v in state.items()}, strict=True)
    return (f"init: weights of {where}" + (f", position table cropped from {positions} to {block}"
                                            if block < positions else ""))
