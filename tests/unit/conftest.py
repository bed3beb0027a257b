"""Fixtures of the unit tests that compare with Hugging Face transformers: a GPT-2 built and saved by
transformers itself (random init, tiny), with a byte-level BPE tokenizer trained here. Nothing downloads."""

import pytest
import torch

from raygpt.tokenizer import EOT

from tests.conftest import TEXT

# Unicode, runs of spaces and newlines, a CRLF, and <|endoftext|> inside the text.
VARIED = ("Héllo wörld — naïve café 東京 🚀\n\n\n    four spaces,\ttab   three\r\nwindows line"
          f"{EOT}after the end{EOT}{EOT}  x  \n \n def f(x):\n        return x ** 2  # ok?!\n")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Nothing may go online: the hub is switched off for transformers and huggingface_hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        yield


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A byte-level BPE tokenizer trained here, GPT-2's way (ByteLevel, no prefix space, <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, VARIED * 3], trainer=trainer)
    return tok


def save_reference(folder, hf_tokenizer, seed=0, **config):
    """A GPT2LMHeadModel and GPT2TokenizerFast saved with save_pretrained; returns the model (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=hf_tokenizer.get_vocab_size(),
                     bos_token_id=hf_tokenizer.token_to_id(EOT), eos_token_id=hf_tokenizer.token_to_id(EOT),
                     **config)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    GPT2TokenizerFast(tokenizer_object=hf_tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_tokenizer, offline):
    """(folder, GPT2LMHeadModel) of a tiny GPT-2 saved with save_pretrained."""
    pytest.importorskip("transformers", reason="pip install transformers (a test dependency)")
    folder = tmp_path_factory.mktemp("hf-gpt2")
    return folder, save_reference(folder, hf_tokenizer)


