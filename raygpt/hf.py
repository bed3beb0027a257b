"""Hugging Face GPT-2 checkpoints in and out: a translation layer over raygpt's checkpoint format.

    raygpt import-hf SRC OUT     an HF GPT-2 folder (or a hub id, on a machine with internet) -> raygpt checkpoint
    raygpt export-hf CKPT OUT    a raygpt checkpoint -> a folder GPT2LMHeadModel / AutoTokenizer / pipeline open

Safetensors, JSON and torch.load(weights_only=True) for old pytorch_model.bin files: `transformers` is never
imported (it is a test dependency, the reference the tests compare with). No Ray here.

The one real difference between the two layouts: HF GPT-2 stores c_attn, c_proj and c_fc as Conv1D, whose
weight is (in, out), the transpose of nn.Linear's (out, in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from raygpt.checkpoint import CheckpointError, check_new, load_checkpoint, resolve_checkpoint, save_checkpoint
from raygpt.config import Config, ModelConfig
from raygpt.tokenizer import EOT, FILENAME, BPETokenizer, Tokenizer, load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers of older GPT-2 files (the causal mask, and the value masked positions get): not weights.
DROPPED = (".attn.bias", ".attn.masked_bias")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GPT-2's tanh approximation, as raygpt's MLP


def import_hf(src: str | Path, out: str | Path, print_fn: Callable[[str], None] = lambda s: None) -> Path:
    """Write the raygpt checkpoint of an HF GPT-2 model: ``src`` is a folder (config.json, model.safetensors or
    pytorch_model.bin, and tokenizer.json or vocab.json + merges.txt) or a hub id such as ``gpt2``."""
    out = Path(out)
    check_new(out, "import-hf")
    folder = _folder(src, print_fn)
    model_cfg = model_config_of(folder)
    tokenizer = tokenizer_of(folder)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids and the model only "
                              f"{model_cfg.vocab_size} rows of embeddings; they do not belong together")
    from raygpt.model import GPT

    model = GPT(model_cfg)
    model.load_state_dict(raygpt_state(hf_weights(folder), model_cfg), strict=True)
    config = Config()
    config.model = model_cfg
    # The data a fine-tune prepares must be tokenized as GPT-2 was: with this very tokenizer.
    config.data.tokenizer = "bpe"
    config.data.bpe_vocab_size = tokenizer.vocab_size
    path = save_checkpoint(out, model, config, tokenizer)
    print_fn(f"imported: {folder} -> {path} ({model.num_params() / 1e6:.1f}M parameters, {model_cfg.n_layer} "
             f"layers, {model_cfg.n_embd} wide, block {model_cfg.block_size}, vocab {model_cfg.vocab_size})")
    return path


def _folder(src: str | Path, print_fn) -> Path:
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise CheckpointError(f"{src} is not a folder; pass an HF GPT-2 folder (config.json and weights) or a hub "
                              f"id such as gpt2 or openai-community/gpt2-medium")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{src} is no folder here, and downloading it as a hub id needs huggingface_hub: "
                              f"pip install huggingface_hub, or pass a local folder") from None
    print_fn(f"import-hf: downloading {src} from the Hugging Face hub")
    try:
        return Path(snapshot_download(str(src), allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin",
                                                                "tokenizer.json", "vocab.json", "merges.txt"]))
    except Exception as e:  # no network, no such repository, ...: all mean the same to a user
        raise CheckpointError(f"{src} is no folder here and could not be downloaded from the Hugging Face hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a local "
                              f"folder, or check the id and the network") from None


def model_config_of(folder: Path) -> ModelConfig:
    """raygpt's ModelConfig for an HF GPT-2 config.json; anything GPT-2-shaped raygpt cannot match exactly is
    refused by name."""
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    c = json.loads(f.read_text())
    if c.get("model_type") != "gpt2":
        raise CheckpointError(f"{f} has model_type {c.get('model_type')!r}; raygpt imports GPT-2 models "
                              f"(model_type gpt2) only")
    checks = {"activation_function": (c.get("activation_function", "gelu_new") in GELU_TANH, "a tanh GELU"),
              "layer_norm_epsilon": (abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-05"),
              "n_inner": (c.get("n_inner") in (None, 4 * c["n_embd"]), "4 x n_embd"),
              "scale_attn_by_inverse_layer_idx": (not c.get("scale_attn_by_inverse_layer_idx", False), "false"),
              "scale_attn_weights": (c.get("scale_attn_weights", True), "true")}
    for key, (ok, want) in checks.items():
        if not ok:
            raise CheckpointError(f"{f}: {key}={c.get(key)!r}; raygpt's GPT-2 has {want}")
    return ModelConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["n_positions"],
                       vocab_size=c["vocab_size"], dropout=0.0, bias=True,
                       tie_weights=c.get("tie_word_embeddings", True))


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors (or its shards), else of pytorch_model.bin (weights_only)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if files:
        out: dict[str, torch.Tensor] = {}
        for file in files:
            out.update(load_file(str(file)))
        return out
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def raygpt_state(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensor names and layouts -> raygpt's GPT state dict."""
    out = {}
    for name, value in hf.items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if key.endswith(DROPPED):
            continue
        if key.endswith(CONV1D):
            value = value.t()
        out[key if key == "lm_head.weight" else "transformer." + key] = value.contiguous().float()
    if m.tie_weights:  # one matrix: the file may carry the head (equal to wte) or not
        out["lm_head.weight"] = out["transformer.wte.weight"]
    elif "lm_head.weight" not in out:
        raise CheckpointError("the model's config unties the output head from wte but its weights have no "
                              "lm_head.weight")
    return out


def tokenizer_of(folder: Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's older vocab.json + merges.txt, as a raygpt BPE tokenizer."""
    if (folder / FILENAME).is_file():
        return load_tokenizer(folder / FILENAME)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(f"{folder} has no tokenizer: neither {FILENAME} nor vocab.json + merges.txt")
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return BPETokenizer(hf, source=f"{vocab} + {merges}")


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """A folder that transformers opens as it is: config.json and model.safetensors for GPT2LMHeadModel,
    tokenizer.json and tokenizer_config.json for AutoTokenizer (BPE tokenizers: GPT2TokenizerFast)."""
    from safetensors.torch import save_file

    ckpt, out = resolve_checkpoint(Path(ckpt)), Path(out)
    check_new(out, "export-hf")
    model, config, tokenizer, _ = load_checkpoint(ckpt)
    m = config.model
    if not m.bias:
        raise CheckpointError(f"{ckpt} was trained with model.bias=false; GPT-2 has biases in every Linear and "
                              f"LayerNorm, so transformers' GPT2LMHeadModel cannot hold it")
    if not isinstance(tokenizer, BPETokenizer):
        raise CheckpointError(f"{ckpt} uses raygpt's {tokenizer.kind} tokenizer, which has no Hugging Face "
                              f"equivalent; export-hf needs a BPE one (data.tokenizer=bpe or data.tokenizer_path)")
    from raygpt.lora import has_adapters, merged_state

    state = {}
    # a LoRA run's adapters folded into the weights: GPT2LMHeadModel has no place for them
    for key, value in (merged_state(model) if has_adapters(model) else model.state_dict()).items():
        if key == "lm_head.weight" and m.tie_weights:
            continue  # GPT2LMHeadModel ties it to wte itself
        name = key if key == "lm_head.weight" else key[len("transformer."):]
        state[name] = (value.t() if key.endswith(CONV1D) else value).contiguous()
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    eot = tokenizer.eot_id
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": m.n_layer,
                 "n_head": m.n_head, "n_embd": m.n_embd, "n_positions": m.block_size, "n_ctx": m.block_size,
                 "vocab_size": m.vocab_size, "n_inner": None, "activation_function": "gelu_new",
                 "layer_norm_epsilon": 1e-5, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
                 "attn_pdrop": m.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
                 "tie_word_embeddings": m.tie_weights, "bos_token_id": eot, "eos_token_id": eot,
                 "use_cache": True, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2))
    tokenizer.save(out)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
         "model_max_length": m.block_size, "add_prefix_space": False, "clean_up_tokenization_spaces": False},
        indent=2))
    return out


def describe(folder: Path) -> str:
    """One line on what export-hf wrote, for the CLI."""
    c = json.loads((folder / "config.json").read_text())
    size = sum(f.stat().st_size for f in folder.iterdir())
    return (f"exported: {folder} (GPT2LMHeadModel, {c['n_layer']} layers, {c['n_embd']} wide, vocab "
            f"{c['vocab_size']}; {size / 1e6:,.1f} MB)")
