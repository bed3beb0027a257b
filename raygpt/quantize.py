"""Quantized and half-precision inference for serving: ``quantize(model, how, device)``.

    none  the model as trained
    int8  CPU only: every nn.Linear, the output head included, becomes a dynamic int8 Linear
          (torch.ao.quantization.quantize_dynamic: int8 weights prepacked for the fbgemm / x86 kernels,
          activations quantized per call). Embeddings and LayerNorms stay fp32.
    bf16  the weights cast to bfloat16: GPUs with bf16 in hardware, and CPUs (fast only with AVX512-BF16/AMX)
    fp16  the weights cast to float16: GPUs only

In memory only: the checkpoint on disk is never read or written here. bench/quantize.py measures speed, logit
drift, top-1 agreement and val loss against fp32, and torch.ao against torchao (int8_torchao below); the
figures and the reasons for torch.ao are in bench/RESULTS.md. No Ray here.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

HOWS = ("none", "int8", "bf16", "fp16")


def quantize(model: nn.Module, how: str, device) -> nn.Module:
    """``model`` (a GPT, already on ``device``) made ready for inference as ``how`` says: one of none, int8,
    bf16, fp16 (see the module docstring). Changes the model in place and returns it; an unknown ``how``, or
    one the device cannot run, is a ValueError that says what to use instead.

    Generate from the result without autocast (``precision="fp32"`` in raygpt.generate; see
    ``precision_for``): the weights' own dtype then decides, and the KV cache takes it."""
    device = torch.device(device)
    check_quantize(how, device)
    if how == "int8":
        return int8_dynamic(model)
    if how in ("bf16", "fp16"):
        # .to() converts each tensor in place of the old one, so lm_head and wte stay one (tied) Parameter.
        model.to(torch.bfloat16 if how == "bf16" else torch.float16)
    return model


def check_quantize(how: str, device) -> None:
    """A ValueError saying what to use instead when ``how`` is unknown or ``device`` cannot run it."""
    device = torch.device(device)
    if how not in HOWS:
        raise ValueError(f"quantize={how!r} is not one of {', '.join(HOWS)}")
    if how == "int8" and device.type != "cpu":
        raise ValueError(f"quantize=int8 is for CPU replicas (its int8 kernels run on CPU only); "
                         f"on {device.type} use quantize=bf16 or fp16")
    if how == "fp16" and device.type == "cpu":
        # As train.precision: on a 2-core AVX512-FP16 Xeon it decoded GPT-2 124M at 0.7x bf16's speed in
        # batches of 8 and below int8's everywhere (bench/RESULTS.md); CPUs without AVX512-FP16 emulate it.
        raise ValueError("quantize=fp16 needs a GPU; on CPU use quantize=int8 or bf16")
    if how == "bf16" and device.type == "cuda":
        from raygpt.train import has_native_bf16

        if not has_native_bf16(device):
            raise ValueError(f"quantize=bf16: {torch.cuda.get_device_name(device)} has no bf16 in hardware; "
                             f"use quantize=fp16")


def precision_for(how: str, device) -> str:
    """The ``precision`` to generate a ``quantize(model, how, device)`` model with: the usual autocast
    choice (raygpt.train.resolve_precision's auto) for an unquantized model, "fp32" (no autocast) otherwise.
    Autocast would recast a cast model's weights to autocast's dtype at every matmul (an fp16 model under
    bf16 autocast), and would hand int8 Linear layers bf16 activations, which they refuse."""
    if how == "none":
        from raygpt.train import resolve_precision

        return resolve_precision("auto", torch.device(device))
    return "fp32"


def int8_dynamic(model: nn.Module, head: bool = True) -> nn.Module:
    """Every nn.Linear (``head=False``: but lm_head) swapped in place for torch.ao's dynamic int8 Linear.

    The output head is tied to wte (one matrix): lm_head gets its own int8 copy, wte keeps the fp32 matrix
    for the embedding lookup, so the tie ends in the quantized model (by design; it is never trained)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and (head or name != "lm_head")]
    with warnings.catch_warnings():
        # torch 2.14 warns on every call that torch.ao.quantization is deprecated (in favour of torchao) and
        # that quantized tensor creation is; it still works, and it is what runs fastest in eager mode
        # (bench/quantize.py). Silenced here so a serving replica's log does not repeat it per load.
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {name: default_dynamic_qconfig for name in names}, inplace=True)


def int8_torchao(model: nn.Module, head: bool = True) -> nn.Module:
    """The torchao alternative to int8_dynamic (measured against it in bench/quantize.py): int8 per-token
    activations and per-channel int8 weights (Int8DynamicActivationInt8WeightConfig), in place. Needs
    ``pip install torchao``; lm_head gets a new (quantized) weight, so its tie to wte ends here too."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    # set_inductor_config=False: otherwise torchao changes torch._inductor's global settings, for a
    # torch.compile that generation here never runs.
    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and (head or name != "lm_head"))
    return model
