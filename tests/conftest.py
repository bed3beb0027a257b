"""Shared fixtures. Unit tests (tests/unit) run without Ray in seconds; integration tests start one real
local Ray cluster per session (tests/integration/conftest.py)."""

import pytest
import torch

from raygpt.config import load_config
from raygpt.data.corpus import encode_documents
from raygpt.tokenizer import train_tokenizer

# A small corpus with structure a tiny model can learn quickly.
TEXT = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)  # CI has 2 cores; more threads only add contention


def tiny_config(tmp_path, *overrides):
    """A config that trains in about a second on CPU."""
    return load_config(None, [
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=8", "train.max_steps=30", "optim.warmup_steps=5", "train.log_interval=10",
        "train.eval_interval=10", "train.eval_steps=2", "train.checkpoint_interval=10",
        f"train.out_dir={tmp_path}", "train.device=cpu", *overrides])


@pytest.fixture
def tiny_arrays():
    """(tokenizer, train ids, val ids) of TEXT, char-level; no corpus read."""
    tok = train_tokenizer("char", [TEXT])
    ids = encode_documents([TEXT], tok)
    cut = int(len(ids) * 0.9)
    return tok, ids[:cut], ids[cut:]
