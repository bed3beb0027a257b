"""train.init_from: a new run from pretrained weights (a raygpt checkpoint or a Hugging Face GPT-2 folder)."""

import json

import pytest
import torch

from raygpt.checkpoint import load_checkpoint, read_meta
from raygpt.config import ConfigError, load_config
from raygpt.local import train_local
from raygpt.pretrained import apply_init_from
from raygpt.runs import build_training

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_arrays_module):
    """A small char-level run trained for 60 steps: what the fine-tunes start from."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(tmp, "train.run_name=base", "train.max_steps=60", "train.checkpoint_interval=60",
                      "train.eval_interval=60", "model.block_size=32")
    result = train_local(cfg, tiny_arrays_module, print_fn=lambda s: None)
    return result.checkpoint, read_meta(result.checkpoint)


@pytest.fixture(scope="module")
def tiny_arrays_module():
    from raygpt.data.corpus import encode_documents
    from raygpt.tokenizer import train_tokenizer

    from tests.conftest import TEXT

    tok = train_tokenizer("char", [TEXT])
    ids = encode_documents([TEXT], tok)
    cut = int(len(ids) * 0.9)
    return tok, ids[:cut], ids[cut:]


def fine_tune_config(tmp_path, *over):
    """As a user writes it: only what differs (the model's shape is left to init_from)."""
    return load_config(None, ["train.max_steps=10", "optim.warmup_steps=2", "train.log_interval=1",
                              "train.eval_interval=10", "train.eval_steps=2", "train.checkpoint_interval=10",
                              "train.batch_size=8", f"train.out_dir={tmp_path}", "train.device=cpu",
                              "train.run_name=ft", *over])


def test_a_fine_tune_starts_at_step_0_from_the_checkpoints_weights(base, tmp_path, tiny_arrays_module):
    ckpt, meta = base
    lines = []
    result = train_local(fine_tune_config(tmp_path, f"train.init_from={ckpt}", "optim.lr=1e-4"),
                         tiny_arrays_module, print_fn=lines.append)
    assert f"init: weights of {ckpt} (step 60)" in lines
    first = next(line for line in lines if line.startswith("step  1/10"))
    # the first step's loss is the trained model's, far below a fresh model's ln(23) = 3.1
    assert float(first.split("loss ")[1].split()[0]) < meta["metrics"]["loss"] + 0.3
    *_, state = load_checkpoint(result.checkpoint)
    assert state["train"]["step"] == 10 and state["train"]["resumed_from"] == []
    saved = load_checkpoint(result.checkpoint)[1]
    assert (saved.model.n_layer, saved.model.block_size, saved.train.init_from) == (2, 32, str(ckpt))


def test_the_model_takes_the_pretrained_shape_and_a_shorter_block(reference, tmp_path):
    """An HF folder: GPT-2's settings and its tokenizer; model.block_size lowered crops the position table."""
    folder, hf_model = reference
    cfg = apply_init_from(fine_tune_config(tmp_path, f"train.init_from={folder}", "model.block_size=16",
                                           "model.dropout=0.1"))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size, cfg.model.dropout,
            cfg.data.tokenizer) == (2, 32, 16, hf_model.config.vocab_size, 0.1, "bpe")
    assert cfg.data.tokenizer_path == str((folder / "tokenizer.json").resolve())
    t = build_training(cfg, torch.device("cpu"))
    assert t.init.startswith(f"init: weights of {folder} (Hugging Face GPT-2), position table cropped from 64 to 16")
    hf_wpe = hf_model.transformer.wpe.weight.detach()
    assert torch.equal(t.model.transformer.wpe.weight.detach(), hf_wpe[:16])
    assert torch.equal(t.model.transformer.wte.weight.detach(), hf_model.transformer.wte.weight.detach())
    assert t.state.step == 0 and not t.optimizer.state  # a fresh optimizer


@pytest.mark.parametrize("over, says", [
    (["model.block_size=128"], "model.block_size=128 is above the 64 positions"),
    (["model.n_layer=6"], "model.n_layer=6, but train.init_from="),
    (["data.tokenizer=char"], "data.tokenizer=char, but train.init_from="),
])
def test_what_the_weights_fix_cannot_be_changed(reference, tmp_path, over, says):
    folder, _ = reference
    with pytest.raises(ConfigError, match=says):
        apply_init_from(fine_tune_config(tmp_path, f"train.init_from={folder}", *over))


def test_a_source_that_is_not_a_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train.init_from=.*is not a raygpt checkpoint"):
        apply_init_from(fine_tune_config(tmp_path, f"train.init_from={tmp_path}"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert'; raygpt imports GPT-2 models"):
        apply_init_from(fine_tune_config(tmp_path, f"train.init_from={tmp_path / 'hf'}"))


def lora_run(tmp_path, base_ckpt, arrays, name, steps, *over):
    lines = []
    cfg = fine_tune_config(tmp_path, f"train.init_from={base_ckpt}", "finetune.method=lora", "lora.r=4",
                           "optim.lr=1e-2", f"train.run_name={name}", f"train.max_steps={steps}",
                           f"train.checkpoint_interval={steps}", "model.dropout=0.0", *over)
    return train_local(cfg, arrays, print_fn=lines.append), lines


def test_lora_trains_only_the_adapters(base, tmp_path, tiny_arrays_module):
    """The frozen weights are bit for bit the pretrained ones after training; the adapters moved; the
    progress output says how many parameters train; the checkpoint loads with its adapters on."""
    from safetensors.torch import load_file

    import raygpt
    from raygpt.lora import merged_state

    ckpt, _ = base
    result, lines = lora_run(tmp_path, ckpt, tiny_arrays_module, "lora", 10)
    line = next(x for x in lines if x.startswith("lora: "))
    # r x (in + out) per adapted Linear: c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32
    trainable = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert line.startswith(f"lora: {trainable:,} trainable of "), line
    before = load_file(str(ckpt / "model.safetensors"))
    after = load_file(str(result.checkpoint / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapters = load_file(str(result.checkpoint / "adapter.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapters.items())  # B starts at 0 and moved
    tuned = raygpt.load(result.checkpoint, device="cpu")
    plain = raygpt.load(ckpt, device="cpu")
    x = torch.randint(0, 23, (2, 32), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(tuned.model(x, x)[0], plain.model(x, x)[0])  # the adapters are on
    assert isinstance(tuned.generate("def", max_new_tokens=8, seed=0), str)
    # folded into the weights (what export-hf writes), the adapters give the same logits
    from raygpt.model import GPT

    folded = GPT(tuned.config.model)
    folded.load_state_dict(merged_state(tuned.model))
    torch.testing.assert_close(folded(x, x)[0], tuned.model(x, x)[0], rtol=0, atol=1e-5)


def test_a_lora_run_resumes_exactly(base, tmp_path, tiny_arrays_module):
    """Stopped after step 5 and run again, a LoRA run ends with the weights of one that never stopped."""
    import shutil

    ckpt, _ = base
    straight, _ = lora_run(tmp_path, ckpt, tiny_arrays_module, "straight", 10)
    first, _ = lora_run(tmp_path, ckpt, tiny_arrays_module, "resumed", 10, "train.checkpoint_interval=5")
    shutil.rmtree(first.checkpoint)  # step 10: as if the run had died after step 5's checkpoint
    again, lines = lora_run(tmp_path, ckpt, tiny_arrays_module, "resumed", 10, "train.checkpoint_interval=5")
    assert any("resuming step_000005" in x for x in lines)
    a = load_checkpoint(straight.checkpoint)[0].state_dict()
    b = load_checkpoint(again.checkpoint)[0].state_dict()
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("over, says", [
    (["ray.strategy=fsdp", "ray.num_workers=2"], "finetune.method=lora runs under ray.strategy=ddp"),
    (["lora.targets=c_attn,wte"], "lora.targets='c_attn,wte': give a comma-separated list"),
    (["lora.r=0"], "lora.r must be positive"),
])
def test_bad_lora_settings_are_one_line(tmp_path, over, says):
    with pytest.raises(ConfigError, match=says):
        fine_tune_config(tmp_path, "finetune.method=lora", *over)


def test_lora_on_gpt2_124m_trains_under_one_percent():
    """The figure the README gives, on GPT-2 124M's shape (built on the meta device: no memory, no time)."""
    from raygpt.config import LoraConfig, ModelConfig
    from raygpt.lora import add_adapters, trainable_line
    from raygpt.model import GPT

    with torch.device("meta"):
        model = add_adapters(GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                             vocab_size=50257)), LoraConfig())
    assert trainable_line(model) == "lora: 1,179,648 trainable of 125.62M parameters (0.94%)"
