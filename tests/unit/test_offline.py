"""The parts of offline generation and eval that need no Ray (raygpt/offline_io.py): prompt files checked line by
line, one seed per prompt in a batch, perplexity windows and their scores, BLEU, atomic output, and the CLI's
refusals, which come before Ray is imported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raygpt.checkpoint import save_checkpoint
from raygpt.cli import main
from raygpt.generate import load
from raygpt.model import GPT
from raygpt import offline_io
from raygpt.offline_io import (bleu, check_output, corpus_stream, perplexity_result, plan_eval,
                               plan_generate, read_prompt_lines, score_windows, windows, write_atomic)
from raygpt.runs import with_vocab
from raygpt.tokenizer import train_tokenizer

from tests.conftest import TEXT, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TOK = train_tokenizer("char", [TEXT])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random char-level checkpoint of TEXT's characters (block_size 32). Its weights are drawn wide
    (std 0.5, not GPT-2's 0.02), so that its next token depends on tokens far back in the context."""
    folder = tmp_path_factory.mktemp("offline")
    cfg = with_vocab(tiny_config(folder), TOK)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return save_checkpoint(folder / "ckpt", model, cfg, TOK)


def write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_prompt_lines_keep_their_numbers_and_ids_and_skip_blank_lines_saying_so(tmp_path):
    f = write(tmp_path / "in.jsonl", '{"prompt": "def f", "id": 7}', "", '{"prompt": "", "id": null, "x": 1}',
              '{"prompt": "return x"}')
    rows, blank = read_prompt_lines(str(f), TOK)
    assert [(r.line, r.prompt, r.id, r.has_id) for r in rows] == [(1, "def f", 7, True), (3, "", None, True),
                                                                  (4, "return x", None, False)]
    assert blank == 1


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "def f"', "line 2: not valid JSON (Expecting ',' delimiter at column 19)"),
    ('["def f"]', "line 2: a JSON array, not an object"),
    ('{"text": "def f"}', 'line 2: no "prompt" field (its fields: text)'),
    ('{"prompt": 3}', 'line 2: "prompt" is a JSON number, not a string'),
    ('{"prompt": "déf"}', "line 2: prompt='déf' cannot be encoded: 'é' (U+00E9) not in the char vocabulary"),
    ('{"prompt": "def", "temperature": 0}', 'line 2: sets "temperature", but sampling settings apply to the whole '
                                            'file: give them as options (--temperature)'),
])
def test_a_bad_line_is_one_error_naming_its_number_and_what_to_fix(tmp_path, line, message):
    f = write(tmp_path / "in.jsonl", '{"prompt": "def"}', line, '{"prompt": "x"}')
    with pytest.raises(ValueError) as e:
        read_prompt_lines(str(f), TOK)
    assert str(e.value).startswith(f"--input {f} {message}"), str(e.value)
    assert "\n" not in str(e.value) and str(e.value).endswith("nothing was run")


def test_every_bad_line_is_counted_and_bytes_that_are_not_utf8_are_named(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"prompt": "d"}\n{"prompt": "\xff"}\nnope\n{"prompt": 1}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8 .* \(also bad: lines 3, 4\)"):
        read_prompt_lines(str(f), TOK)
    with pytest.raises(ValueError, match="holds no lines"):
        read_prompt_lines(str(write(tmp_path / "empty.jsonl", "", " ")), TOK)
    with pytest.raises(ValueError, match="no such file"):
        read_prompt_lines(str(tmp_path / "missing.jsonl"), TOK)


def test_pairs_need_a_reference_string(tmp_path):
    f = write(tmp_path / "p.jsonl", '{"prompt": "def", "reference": " f(x)"}', '{"prompt": "def"}')
    with pytest.raises(ValueError, match='--pairs .* line 2: no "reference" field'):
        read_prompt_lines(str(f), TOK, "--pairs", ("prompt", "reference"))


def test_plans_check_everything_before_any_work(tmp_path, ckpt):
    good = write(tmp_path / "in.jsonl", '{"prompt": "def"}')
    out = tmp_path / "out.jsonl"
    job = plan_generate(str(ckpt), str(good), str(out), seed=3, max_new_tokens=5, temperature=0.5, stop="\n")
    assert job.sampling["stop"] == ["\n"] and job.checkpoint == ckpt.resolve() and len(job.rows) == 1
    with pytest.raises(ValueError, match="--top-p=1.5 must be in"):
        plan_generate(str(ckpt), str(good), str(out), top_p=1.5)
    with pytest.raises(ValueError, match="not a raygpt checkpoint"):
        plan_generate(str(tmp_path), str(good), str(out))
    out.write_text("kept")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        plan_generate(str(ckpt), str(good), str(out))
    assert plan_generate(str(ckpt), str(good), str(out), overwrite=True).output == out
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        check_output(str(tmp_path / "no" / "out.jsonl"), False)
    with pytest.raises(ValueError, match="give --data SOURCE"):
        plan_eval(str(ckpt))
    corpus = write(tmp_path / "held.txt", "def f(x): é")
    with pytest.raises(ValueError, match=r"--data .*held.txt: document held.txt=.* cannot be encoded: 'é'"):
        plan_eval(str(ckpt), data=str(corpus))


def test_write_atomic_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def lines():
        yield "one"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_atomic(out, lines())
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    write_atomic(out, ["a", "b"])
    assert out.read_text() == "a\nb\n"


def test_each_prompt_of_a_batch_gets_its_own_seed(ckpt):
    gen = load(ckpt, device="cpu")
    # Prompts of 10, 0, 14 and 3 characters, two past block_size (32) and one that fills it: with 12 new tokens
    # no row reaches block_size; with 30 the rows' windows slide, which a shared batch would do together.
    prompts = ["def f1(x):", "", "    return x *", "def", TEXT[:40], TEXT[:32], TEXT[50:90]]
    seeds = [5, 6, 7, 8, 9, 10, 11]
    for new, sampling in ((12, {"temperature": 0.9, "top_k": 20}), (30, {"temperature": 0.0}),
                          (30, {"temperature": 1.0, "stop": "e"})):
        texts = gen.generate(prompts, seed=seeds, max_new_tokens=new, **sampling)
        alone = [gen.generate(p, max_new_tokens=new, seed=s, **sampling) for p, s in zip(prompts, seeds)]
        assert texts == alone, (new, sampling)
    assert len(set(gen.generate(["def"] * 4, seed=seeds[:4], max_new_tokens=12, temperature=1.0))) > 1


def test_windows_cover_every_token_once_and_score_as_the_model_does(ckpt, monkeypatch):
    gen = load(ckpt, device="cpu")
    (ckpt.parent / "held.txt").write_text(TEXT[:1000])
    stream = corpus_stream(str(ckpt.parent / "held.txt"), TOK)
    assert stream[0] == TOK.eot_id and stream[-1] == TOK.eot_id and len(stream) == 1002
    w = windows(stream, 32)
    assert w.shape == (-(-1001 // 32), 33)
    assert np.array_equal(np.concatenate([row[1:] for row in w])[:1001], stream[1:])  # targets: every token once
    assert (w[-1][1 + 1001 % 32:] == -1).all() and (w[-1][:1 + 1001 % 32] >= 0).all()  # the last block: 9 targets
    nll, tokens = score_windows(gen.model, w)
    assert tokens.sum() == 1001 and tokens[-1] == 1001 % 32
    # Plainly: each block alone (the last one unpadded), the model's own mean loss times its tokens.
    with torch.no_grad():
        plain = [gen.model(torch.as_tensor(s[:-1][None]).long(), torch.as_tensor(s[1:][None]).long())[1].item()
                 * (len(s) - 1) for s in (stream[k:k + 33] for k in range(0, 1001, 32))]
    assert np.allclose(nll, plain, rtol=1e-5, atol=1e-5)
    assert math.isclose(math.fsum(nll) / 1001, math.fsum(plain) / 1001, rel_tol=1e-6)
    monkeypatch.setattr(offline_io, "LOGITS_PER_PASS", 1)  # one window per forward pass: the same sums
    assert np.allclose(score_windows(gen.model, w)[0], nll, rtol=1e-6, atol=1e-6)
    # Ray hands the blocks back in any order: the sum (math.fsum, exactly rounded) does not depend on it.
    order = np.random.default_rng(0).permutation(len(w))
    result = perplexity_result(nll[order], tokens[order], 32)
    assert result == perplexity_result(nll, tokens, 32)
    assert result["last_block_tokens"] == 9 and result["blocks"] == len(w) and result["tokens"] == 1001


def test_bleu_is_sacrebleus_corpus_bleu():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "a dog barked"]
    assert bleu(hyps, refs)["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert bleu(refs, refs)["bleu"] == pytest.approx(100) and "tok:13a" in bleu(refs, refs)["signature"]


def test_cli_usage_mistakes_are_one_line(capsys, tmp_path, ckpt):
    for argv, message in (
            (["generate", str(ckpt), "def", "--input", "in.jsonl", "--output", "o"], "give no PROMPT with it"),
            (["generate", str(ckpt), "--output", "o.jsonl"], "--input and --output go together"),
            (["generate", str(ckpt), "--actors", "2"], "apply to --input only"),
            (["eval", str(ckpt)], "give --data SOURCE (perplexity), --pairs FILE (BLEU), or both")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_a_bad_line_is_refused_before_ray_is_imported_and_nothing_is_written(tmp_path, ckpt):
    bad = write(tmp_path / "in.jsonl", '{"prompt": "def"}', '{"prompt": "def", "id": 2', '{"prompt": "x"}')
    code = ("import sys; from raygpt.cli import main; rc = main(sys.argv[1:]); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "generate", str(ckpt), "--input", str(bad), "--output",
                          str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout.strip() == "no ray", out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and f"--input {bad} line 2: not valid JSON" in out.stderr, out.stderr
    assert not (tmp_path / "out.jsonl").exists()
    pairs = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "def"}))
    out = subprocess.run([sys.executable, "-c", code, "eval", str(ckpt), "--pairs", str(pairs)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout.strip() == "no ray", out.stdout + out.stderr
    assert f"--pairs {pairs} line 1: no \"reference\" field" in out.stderr, out.stderr
