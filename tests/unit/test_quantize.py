"""raygpt.quantize: int8 / bf16 inference models that stay close to fp32 and run through the generation path
unchanged (KV cache on and off), in memory only."""

import hashlib
import subprocess
import sys

import pytest
import torch

from raygpt.checkpoint import load_checkpoint, verify
from raygpt.generate import load
from raygpt.quantize import int8_torchao, precision_for, quantize

from tests.conftest import TEXT, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few seconds on TEXT (random weights make agreement with fp32 meaningless):
    (checkpoint path, val ids)."""
    from raygpt.data.corpus import encode_documents
    from raygpt.local import train_local
    from raygpt.tokenizer import train_tokenizer

    tok = train_tokenizer("char", [TEXT])
    ids = encode_documents([TEXT], tok)
    cfg = tiny_config(tmp_path_factory.mktemp("quantize"), "train.max_steps=300", "optim.lr=3e-3", "train.run_name=q")
    return train_local(cfg, (tok, ids[:4000], ids[4000:]), print_fn=lambda s: None).checkpoint, ids[4000:]


def logits_of(model, val, windows=8):
    """Teacher-forced logits (windows, block, vocab) over the first windows of the val ids."""
    block = model.config.block_size
    x = torch.tensor(val[:windows * block], dtype=torch.long).view(windows, block)
    with torch.no_grad():
        return model(x, x)[0].float()


def quantized(path, how):
    return quantize(load_checkpoint(path)[0].eval(), how, "cpu")


@pytest.mark.parametrize("how, max_drift, mean_drift, agree", [("int8", 1.5, 0.08, 0.98), ("bf16", 0.6, 0.03, 0.99)])
def test_logits_stay_close_to_fp32(trained, how, max_drift, mean_drift, agree):
    # Measured on this model (2 layers, 32 wide; fp32 logits' std 2.3) over 256 positions: int8 at most 0.71
    # apart (mean 0.037), the same argmax at 99.6% of positions; bf16 at most 0.27 (mean 0.012), 100%.
    # The bounds leave about 2x headroom.
    path, val = trained
    ref = logits_of(load_checkpoint(path)[0].eval(), val)
    out = logits_of(quantized(path, how), val)
    assert out.shape == ref.shape  # (B, T, V): the tied head still produces the whole vocabulary
    assert (out - ref).abs().max() < max_drift
    assert (out - ref).abs().mean() < mean_drift
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= agree


@pytest.mark.parametrize("how", ["int8", "bf16"])
def test_greedy_generation_through_text_generator(trained, how):
    path, _ = trained
    fp32 = load(path, device="cpu").generate("def f3(x):\n", max_new_tokens=30, temperature=0)
    gen = load(path, device="cpu")
    gen.model, gen.precision = quantize(gen.model, how, gen.device), precision_for(how, gen.device)
    cached = gen.generate("def f3(x):\n", max_new_tokens=30, temperature=0)
    assert cached == gen.generate("def f3(x):\n", max_new_tokens=30, temperature=0, use_cache=False)
    # fp32's greedy text (all 30 characters were equal when measured; 20 leave room for a near tie)
    assert cached[:20] == fp32[:20]
    # batched (left-padded) and sampled generation run too
    texts = gen.generate(["def f1", "    return"], max_new_tokens=10, temperature=0.8, seed=0)
    assert len(texts) == 2 and all(texts)


def test_int8_keeps_wte_for_lookups_and_gives_the_head_its_own_copy(trained):
    path, _ = trained
    model = quantized(path, "int8")
    assert type(model.lm_head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert model.transformer.wte.weight.dtype == torch.float32  # the embedding lookup is not quantized
    logits, loss = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 1, model.config.vocab_size) and loss is None


def test_bf16_keeps_the_tie(trained):
    path, _ = trained
    model = quantized(path, "bf16")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_the_checkpoint_on_disk_is_untouched(trained):
    path, val = trained
    files = sorted(f for f in path.rglob("*") if f.is_file())
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    ref = logits_of(load_checkpoint(path)[0].eval(), val)
    for how in ("int8", "bf16"):
        gen = load(path, device="cpu")
        gen.model, gen.precision = quantize(gen.model, how, gen.device), precision_for(how, gen.device)
        gen.generate("def ", max_new_tokens=5, temperature=0)
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == before
    verify(path)
    assert torch.equal(logits_of(load_checkpoint(path)[0].eval(), val), ref)  # loads as fp32 as before


@pytest.mark.parametrize("how, device, says", [
    ("int4", "cpu", "quantize='int4' is not one of none, int8, bf16, fp16"),
    ("int8", "cuda", "quantize=int8 is for CPU replicas"),
    ("fp16", "cpu", "quantize=fp16 needs a GPU; on CPU use quantize=int8 or bf16"),
])
def test_a_bad_choice_is_one_clear_line(trained, how, device, says):
    model = load_checkpoint(trained[0])[0]
    with pytest.raises(ValueError) as e:
        quantize(model, how, device)  # a device that is only named: refused before anything touches it
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_none_is_the_model_as_trained(trained):
    model = load_checkpoint(trained[0])[0]
    assert quantize(model, "none", "cpu") is model and precision_for("none", "cpu") == "fp32"
    assert precision_for("int8", "cpu") == precision_for("bf16", "cpu") == "fp32"  # no autocast over them


def test_torchao_alternative_is_close_too(trained):
    pytest.importorskip("torchao", reason="pip install torchao (only the benchmark's comparison uses it)")
    path, val = trained
    ref = logits_of(load_checkpoint(path)[0].eval(), val)
    out = logits_of(int8_torchao(load_checkpoint(path)[0].eval()), val)
    assert (out - ref).abs().max() < 1.0  # measured 0.43


def test_importing_it_imports_neither_ray_nor_torchao():
    code = ("import sys, raygpt.quantize; bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'torchao')];"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
