"""Hugging Face GPT-2 in and out, against `transformers` itself as the reference.

The reference models are built here with transformers (random init, a few layers) and saved with
save_pretrained, with a byte-level BPE tokenizer trained here and saved in HF's format: nothing downloads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import raygpt
from raygpt.checkpoint import load_checkpoint, read_meta
from raygpt.cli import main
from raygpt.data.corpus import encode_documents
from raygpt.generate import generate_tokens
from raygpt.hf import export_hf, import_hf
from raygpt.local import train_local
from raygpt.tokenizer import EOT

from tests.conftest import TEXT, tiny_config
from tests.unit.conftest import VARIED, save_reference

transformers = pytest.importorskip("transformers", reason="pip install transformers (a test dependency)")



@pytest.fixture(scope="module", autouse=True)
def _offline(offline):
    yield


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position: raygpt's GPT returns only the last one without targets."""
    with torch.no_grad():
        if hasattr(model, "generation_config"):  # transformers
            return model(ids).logits
        return model(ids, ids)[0]


def test_import_gives_transformers_logits(reference, tmp_path):
    folder, hf_model = reference
    ckpt = import_hf(folder, tmp_path / "ckpt")
    model, config, tokenizer, _ = load_checkpoint(ckpt)
    assert (config.model.n_layer, config.model.n_embd, config.model.block_size, config.model.vocab_size,
            config.model.bias, config.model.tie_weights) == (2, 32, 64, hf_model.config.vocab_size, True, True)
    assert model.lm_head.weight is model.transformer.wte.weight and tokenizer.eot_id == hf_model.config.eos_token_id
    ids = torch.randint(0, hf_model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    assert (full_logits(model.eval(), ids) - full_logits(hf_model, ids)).abs().max().item() <= 1e-5


def test_old_style_folders_import_too(reference, hf_tokenizer, tmp_path):
    """pytorch_model.bin (read with weights_only=True) holding the attn.bias / attn.masked_bias buffers and
    no lm_head.weight, and vocab.json + merges.txt instead of tokenizer.json."""
    folder, hf_model = reference
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, old / "pytorch_model.bin")
    hf_tokenizer.model.save(str(old))  # vocab.json + merges.txt
    model, _, tokenizer, _ = load_checkpoint(import_hf(old, tmp_path / "ckpt"))
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    assert (full_logits(model.eval(), ids) - full_logits(hf_model, ids)).abs().max().item() <= 1e-5
    assert tokenizer.encode(VARIED) == hf_tokenizer.encode(VARIED).ids


def test_token_ids_equal_gpt2_tokenizer_fast(reference, tmp_path):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder, _ = reference
    ours = raygpt.load(import_hf(folder, tmp_path / "ckpt"), device="cpu").tokenizer
    theirs = GPT2TokenizerFast.from_pretrained(folder)
    for text in (VARIED, TEXT[:2000], " leading space", "\n\n\n", EOT, "a" * 300):
        want = theirs(text)["input_ids"]
        assert ours.encode(text) == want, text[:40]
        assert ours.decode(want) == theirs.decode(want)
    assert ours.encode(VARIED).count(ours.eot_id) == 3  # <|endoftext|> inside the text is the one token
    assert AutoTokenizer.from_pretrained(folder)(VARIED)["input_ids"] == ours.encode(VARIED)


def test_greedy_generation_equals_transformers_generate(reference, tmp_path):
    folder, hf_model = reference
    gen = raygpt.load(import_hf(folder, tmp_path / "ckpt"), device="cpu")
    prompt = gen.tokenizer.encode("def f1(x):\n")
    ours = list(generate_tokens(gen.model, prompt, 50, temperature=0))
    hf_model.generation_config.eos_token_id = None  # 50 tokens whatever comes, as raygpt's loop
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=50, min_new_tokens=50, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs and len(ours) == 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hf_tokenizer):
    """A raygpt run trained on the BPE tokenizer (untied head too, to export the general case)."""
    from raygpt.tokenizer import BPETokenizer

    tmp = tmp_path_factory.mktemp("trained")
    tok = BPETokenizer(hf_tokenizer)
    ids = encode_documents([TEXT], tok)
    cut = int(len(ids) * 0.9)
    cfg = tiny_config(tmp, "train.run_name=bpe", "train.max_steps=10", "train.checkpoint_interval=10",
                      "data.tokenizer=bpe", "model.dropout=0.1")
    return train_local(cfg, (tok, ids[:cut], ids[cut:]), print_fn=lambda s: None).checkpoint


def test_export_opens_in_transformers_with_the_same_logits(trained, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

    assert main(["export-hf", str(trained.parent), str(tmp_path / "hf")]) == 0  # a run folder: its latest
    assert capsys.readouterr().out.startswith(f"exported: {tmp_path / 'hf'} (GPT2LMHeadModel, 2 layers")
    ours = raygpt.load(trained, device="cpu")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    assert (full_logits(ours.model, ids) - full_logits(theirs, ids)).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok(VARIED)["input_ids"] == ours.tokenizer.encode(VARIED)
    out = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")(
        "def f1(x):\n", max_new_tokens=12, do_sample=False)
    assert out[0]["generated_text"].startswith("def f1(x):\n")
    greedy = ours.generate("def f1(x):\n", max_new_tokens=12, temperature=0)
    assert out[0]["generated_text"] == "def f1(x):\n" + greedy or EOT in greedy


def test_untied_heads_go_both_ways(hf_tokenizer, tmp_path):
    folder = tmp_path / "untied"
    hf_model = save_reference(folder, hf_tokenizer, seed=4, tie_word_embeddings=False)
    ckpt = import_hf(folder, tmp_path / "ckpt")
    model = load_checkpoint(ckpt)[0].eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    assert (full_logits(model, ids) - full_logits(hf_model, ids)).abs().max().item() <= 1e-5
    from transformers import GPT2LMHeadModel

    back = GPT2LMHeadModel.from_pretrained(export_hf(ckpt, tmp_path / "back")).eval()
    assert (full_logits(back, ids) - full_logits(hf_model, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("change, says", [
    ({"model_type": "llama"}, "model_type 'llama'; raygpt imports GPT-2 models"),
    ({"activation_function": "relu"}, "activation_function='relu'; raygpt's GPT-2 has a tanh GELU"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
])
def test_what_raygpt_cannot_hold_is_one_line(reference, tmp_path, capsys, change, says):
    folder, _ = reference
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **change}))
    assert main(["import-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not (tmp_path / "out").exists()


def test_bad_paths_and_tokenizers_are_one_line(reference, tmp_path, tiny_arrays, capsys):
    folder, _ = reference
    assert main(["import-hf", str(tmp_path / "nowhere" / "x"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["import-hf", str(folder), str(folder)]) == 2  # never over something that exists
    assert "already exists" in capsys.readouterr().err
    char = train_local(tiny_config(tmp_path, "train.run_name=char", "train.max_steps=2", "optim.warmup_steps=1",
                                   "train.checkpoint_interval=2"), tiny_arrays, print_fn=lambda s: None)
    assert main(["export-hf", str(char.checkpoint), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "char tokenizer, which has no Hugging Face equivalent" in err[0]
    assert read_meta(char.checkpoint)["step"] == 2 and not (tmp_path / "hf").exists()


def test_neither_direction_imports_transformers(reference, trained, tmp_path):
    """import-hf and export-hf in a process where `transformers` cannot be imported: safetensors and JSON."""
    folder, _ = reference
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformers", "peft"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        from raygpt.cli import main
        assert main(["import-hf", {str(folder)!r}, {str(tmp_path / "in")!r}]) == 0
        assert main(["export-hf", {str(trained)!r}, {str(tmp_path / "out")!r}]) == 0
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "in" / "meta.json").is_file() and (tmp_path / "out" / "config.json").is_file()


def test_a_hub_id_offline_is_one_line(tmp_path, capsys):
    """A hub id is downloaded through huggingface_hub; with no network (here: HF_HUB_OFFLINE=1) it is one line
    that says what to do, and nothing is written."""
    assert main(["import-hf", "openai-community/gpt2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be downloaded from the Hugging Face hub" in err[-1]
    assert "pass a local folder" in err[-1] and not (tmp_path / "out").exists()
