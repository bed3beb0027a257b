"""LoRA: low-rank adapters on a GPT's linear layers (peft), a thin wrapper the train step does not know about.

    model = add_adapters(GPT(cfg.model), cfg.lora)     # the weights freeze; lora_A / lora_B train
    base, adapters = split_state(model)                # the checkpoint's model.safetensors and adapter.safetensors
    plain = merged_state(model)                        # W + (alpha / r) B A: a plain GPT's state dict (export)

peft's `inject_adapter_in_model` replaces each target nn.Linear in place (the module stays a GPT, so its
forward, KV cache and generation are unchanged) and freezes everything else; `task_type` is left unset (it
would expect Hugging Face's generation API). No Ray here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from raygpt.config import ConfigError, LoraConfig



def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("finetune.method=lora needs peft: pip install peft") from None
    return peft


def add_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Adapters on lora.targets (lora_B starts at zero: the model computes what it did before), the rest frozen."""
    peft = _peft()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=[t.strip() for t in lora.targets.split(",")])
    return peft.inject_adapter_in_model(config, model)


def has_adapters(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the frozen weights under a plain GPT's names, the adapters' weights as peft names them)."""
    peft = _peft()
    adapters = peft.get_peft_model_state_dict(model)
    base = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
            if ".lora_" not in name}
    return base, adapters


def load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Put saved adapter weights (split_state's second half) into a model with adapters added."""
    result = _peft().set_peft_model_state_dict(model, adapters)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights that fit no adapter of this model: {', '.join(unexpected[:3])}")


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain GPT's state dict with every adapter folded into its weight: W + scaling * (B @ A). The model
    itself is left as it is."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            w = module.base_layer.weight.detach()
            for key in module.lora_A:
                a, b = module.lora_A[key].weight.detach(), module.lora_B[key].weight.detach()
                w = w + module.scaling[key] * (b @ a)
            out[f"{name}.weight"] = w
    base, _ = split_state(model)
    return {name: out.get(name, value) for name, value in base.items()}


def trainable_line(model: nn.Module) -> str:
    """'lora: 24,576 trainable of 10.79M parameters (0.23%)' for the progress output."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return f"lora: {trainable:,} trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)"
