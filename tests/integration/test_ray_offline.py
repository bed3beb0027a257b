"""`raygpt generate --input` and `raygpt eval` on the session's Ray cluster: Ray Data with a pool of 2 actors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import raygpt
from raygpt.checkpoint import save_checkpoint
from raygpt.model import GPT
from raygpt.runs import with_vocab
from raygpt.tokenizer import train_tokenizer

from tests.conftest import TEXT, tiny_config
from tests.integration.conftest import ENV

ROOT = Path(__file__).resolve().parents[2]
TOK = train_tokenizer("char", [TEXT])
PROMPTS = [TEXT[i:i + n] for i, n in zip(range(0, 4000, 97), [0, 1, 5, 9, 17, 30, 45] * 6)][:40]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny char-level checkpoint of random weights (block_size 32): what is checked is that Ray's batches
    give exactly what the model gives prompt by prompt."""
    folder = tmp_path_factory.mktemp("offline")
    cfg = with_vocab(tiny_config(folder), TOK)
    torch.manual_seed(0)
    return save_checkpoint(folder / "ckpt", GPT(cfg.model), cfg, TOK)


def raygpt_cli(*args, cwd):
    """The CLI in a subprocess, joining the session's cluster (RAY_ADDRESS, set by the fixture)."""
    return subprocess.run([sys.executable, "-m", "raygpt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **ENV}, cwd=cwd)


def generate_actors() -> int:
    """The actors of generation's pool (Ray Data names them after the class) that the cluster has ever started."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(Generate))")], limit=10_000,
                         raise_on_missing_output=False)
    return len(actors)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_prompt_gets_one_output_in_order_equal_to_generating_it_alone(ray_cluster, ckpt, tmp_path):
    records = [{"prompt": p, **({"id": f"p{i}"} if i % 3 else {})} for i, p in enumerate(PROMPTS)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 10 else "") for i, r in enumerate(records)))
    before = generate_actors()
    out = raygpt_cli("generate", ckpt, "--input", src, "--output", tmp_path / "out.jsonl", "--actors", 2,
                     "--batch-size", 6, "--seed", 100, "--temperature", 0.9, "--top-k", 20, "--max-new-tokens", 16,
                     cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert generate_actors() - before == 2  # a pool of 2 actors, each loading the model once
    assert f"generate: 40 prompts from {src} (1 blank line skipped) on 2 actors, 1 CPU each" in out.stdout, out.stdout
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in lines] == [i + 1 + (i > 10) for i in range(40)]  # input order; line 12 is blank
    assert [r.get("id") for r in lines] == [r.get("id") for r in records]
    assert [r["prompt"] for r in lines] == PROMPTS
    gen = raygpt.load(ckpt, device="cpu")
    alone = [gen.generate(p, seed=100 + i, temperature=0.9, top_k=20, max_new_tokens=16) for i, p in enumerate(PROMPTS)]
    assert [r["completion"] for r in lines] == alone
    assert len(set(alone)) > 30  # sampled, each with its own seed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_bad_line_is_reported_and_no_output_is_written(ray_cluster, ckpt, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "def"}, {"prompt": "def", "id": 1}, {"prompt": "dé"}])
    out = raygpt_cli("generate", ckpt, "--input", src, "--output", tmp_path / "out.jsonl", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and f"--input {src} line 3: prompt='dé' cannot be encoded: 'é'" in out.stderr
    assert list(tmp_path.iterdir()) == [src]


def test_eval_perplexity_equals_a_plain_computation_and_bleu_is_sacrebleus(ray_cluster, ckpt, tmp_path):
    import sacrebleu

    gen = raygpt.load(ckpt, device="cpu")
    held = tmp_path / "held.txt"
    held.write_text(TEXT[5000:7000])
    prompts = PROMPTS[:24]
    own = [gen.generate(p, temperature=0, max_new_tokens=12) for p in prompts]  # greedy: the model's own text
    # Half the references are the model's own continuations, half the corpus's: a BLEU between 0 and 100.
    refs = [o if i % 2 else TEXT[100 * i + 3:100 * i + 15] for i, o in enumerate(own)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "reference": r} for p, r in zip(prompts, refs)])
    out = raygpt_cli("eval", ckpt, "--data", held, "--pairs", pairs, "--json", tmp_path / "eval.json", "--actors", 2,
                     "--batch-size", 4, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert "perplexity" in out.stdout and "BLEU" in out.stdout and f"json: {tmp_path / 'eval.json'}" in out.stdout

    # Perplexity, plainly: [eot] + the text + [eot], every token after the first predicted once, in windows
    # of block_size (32) tokens, each the model's mean loss times its tokens.
    ids = [TOK.eot_id, *TOK.encode(held.read_text()), TOK.eot_id]
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(ids) - 1, 32):
            n = min(32, len(ids) - 1 - k)
            x, y = (torch.tensor(ids[k + d:k + d + n])[None] for d in (0, 1))
            total += gen.model(x, y)[1].item() * n
    ppl = report["perplexity"]
    assert ppl["tokens"] == len(ids) - 1 == 2001 and ppl["blocks"] == 63 and ppl["last_block_tokens"] == 2001 - 62 * 32
    assert ppl["loss"] == pytest.approx(total / 2001, rel=1e-5)
    assert ppl["perplexity"] == pytest.approx(math.exp(total / 2001), rel=1e-5)

    # BLEU: sacrebleu's on the same continuations (greedy, as many tokens as the longest reference)
    b = report["bleu"]
    assert b["max_new_tokens"] == max(len(TOK.encode(r)) for r in refs) == 12 and b["temperature"] == 0
    assert b["bleu"] == pytest.approx(sacrebleu.corpus_bleu(own, [refs]).score, abs=1e-9)
    assert 0 < b["bleu"] < 100 and b["pairs"] == 24

    # References that are the model's own greedy output: BLEU 100.
    write_jsonl(pairs, [{"prompt": p, "reference": o} for p, o in zip(prompts, own)])
    out = raygpt_cli("eval", ckpt, "--pairs", pairs, "--json", tmp_path / "own.json", "--actors", 2, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "own.json").read_text())["bleu"]["bleu"] == pytest.approx(100)
