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


def wandb_records(folder):
    """Every record W&B wrote to the offline runs under ``folder``, as {"kind", "run_id", "data"}.

    A `.wandb` file is a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB blocks of records, each
    with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of wandb_internal_pb2.Record
    messages. Reading it back is how a test sees what `wandb sync` would upload, with no network."""
    import json
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(Path(folder).rglob("run-*.wandb")):
        data, pos, block, buf = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little left in this block for a header: padding
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            buf += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                what = record.WhichOneof("record_type")
                if what == "history":
                    item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                elif what == "config":
                    item = {i.key: json.loads(i.value_json) for i in record.config.update}
                elif what == "run":  # the run's start: its id, project and the config given to wandb.init
                    item = {"run_id": record.run.run_id, "project": record.run.project, "group": record.run.run_group,
                            "config": {i.key: json.loads(i.value_json) for i in record.run.config.update}}
                else:
                    continue
                out.append({"kind": what, "file": path, "data": item})
    return out
