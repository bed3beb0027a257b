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
