import pytest
import torch

from raygpt.config import ModelConfig
from raygpt.generate import (TextGenerator, TextStream, filter_top_k, filter_top_p, generate_batch, generate_tokens,
                             load, sample_next, sample_rows)
from raygpt.model import GPT
from raygpt.tokenizer import BytesTokenizer
from raygpt.local import train_local

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few seconds (300 steps) on TEXT: its checkpoint path."""
    from raygpt.data.corpus import encode_documents
    from raygpt.tokenizer import train_tokenizer
    from tests.conftest import TEXT

    tok = train_tokenizer("char", [TEXT])
    ids = encode_documents([TEXT], tok)
    cfg = tiny_config(tmp_path_factory.mktemp("gen"), "train.max_steps=300", "optim.lr=3e-3", "train.run_name=g")
    return train_local(cfg, (tok, ids[:4000], ids[4000:]), print_fn=lambda s: None).checkpoint


def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    kept = filter_top_k(logits, 7)
    assert (torch.isfinite(kept).sum(dim=-1) == 7).all()
    assert torch.equal(torch.isfinite(kept), logits >= logits.topk(7).values[:, [-1]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.05]])
    kept = torch.isfinite(filter_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, False, True, False, False]]  # 0.5 + 0.3 reaches 0.75; 0.5 alone does not
    kept = torch.isfinite(filter_top_p(probs.log(), 0.85))
    assert kept.tolist() == [[True, False, True, True, False]]
    assert torch.isfinite(filter_top_p(probs.log(), 0.1)).sum() == 1  # the top token always stays
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(probs.log(), 1.0, top_p=0.75, generator=g)) for _ in range(200)}
    assert draws == {0, 2}


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]


def test_a_batch_draws_what_each_row_draws_alone():
    """sample_rows filters rows that share settings together and reads the ids once, but each row's id is
    the one sample_next draws for that row alone from its own generator, draw after draw."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    per_row = [dict(temperature=0.8, top_k=20, top_p=None)] * 5  # shared settings: filtered in one go
    mixed = [dict(temperature=t, top_k=k, top_p=p) for t, k, p in
             ((0.8, 20, None), (0, None, None), (1.0, None, 0.9), (1.3, 5, 0.5), (0.8, 20, None))]
    for rows in (per_row, mixed):
        gens = [torch.Generator().manual_seed(i) for i in range(5)]
        alone = [torch.Generator().manual_seed(i) for i in range(5)]
        for _ in range(20):
            ids = sample_rows(logits, [r["temperature"] for r in rows], [r["top_k"] for r in rows],
                              [r["top_p"] for r in rows], gens)
            assert ids == [int(sample_next(logits[i:i + 1], **r, generator=g))
                           for i, (r, g) in enumerate(zip(rows, alone))]
    assert sample_rows(logits, [0] * 5, [None] * 5, [None] * 5, [None] * 5) == logits.argmax(-1).tolist()


def test_past_block_size_each_token_is_the_recompute_of_the_window_the_cache_holds():
    """When the cache is full the window slides: it is refilled from the last 3/4 block and grows again
    one token at a time. Every cached greedy token equals a full recompute over exactly that window."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()
    block, keep = 16, 12
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]  # the short row's first slide drops only its padding
    out = [[] for _ in prompts]
    for step in generate_batch(model, prompts, 3 * block, temperature=0):
        for row, t in step:
            out[row].append(t)
    for prompt, ids in zip(prompts, out):
        tokens, context = list(prompt), len(prompt)
        for t in ids:
            with torch.no_grad():
                logits, _ = model(torch.tensor([tokens[-context:]]))
            assert t == int(logits[0, -1].argmax())
            tokens.append(t)
            context = context + 1 if context < block else keep
        assert len(ids) == 3 * block


def test_generate_strings_lists_streams_and_seeds(trained):
    gen = load(trained, device="cpu")
    assert isinstance(gen, TextGenerator)
    a = gen.generate("def f1", max_new_tokens=40, temperature=0.9, top_k=10, seed=3)
    assert a == gen.generate("def f1", max_new_tokens=40, temperature=0.9, top_k=10, seed=3)  # same seed, same text
    assert isinstance(a, str) and 0 < len(a) <= 40
    assert a != gen.generate("def f1", max_new_tokens=40, temperature=0.9, top_k=10, seed=4)
    pieces = list(gen.generate("def f1", max_new_tokens=40, temperature=0.9, top_k=10, seed=3, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == a
    both = gen.generate(["def f1", "    return"], max_new_tokens=20, temperature=0, seed=0)
    assert isinstance(both, list) and len(both) == 2
    assert both[0] == gen.generate("def f1", max_new_tokens=20, temperature=0)
    with pytest.raises(ValueError, match="one prompt"):
        gen.generate(["a", "b"], stream=True)


def test_it_learned_the_corpus(trained):
    out = load(trained).generate("def f3(x):\n", max_new_tokens=12, temperature=0)
    assert out.startswith("    return x"), out


def test_stop_strings_cut_before_the_stop(trained):
    gen = load(trained)
    full = gen.generate("def f1(x):\n", max_new_tokens=60, temperature=0)
    assert "\n" in full
    cut = gen.generate("def f1(x):\n", max_new_tokens=60, temperature=0, stop="\n")
    assert cut == full[:full.index("\n")]
    streamed = "".join(gen.generate("def f1(x):\n", max_new_tokens=60, temperature=0, stop=["\n\n", "\n"],
                                    stream=True))
    assert streamed == cut


def test_cache_and_recompute_agree_and_the_window_slides(trained):
    gen = load(trained)
    block = gen.config.model.block_size
    ids = gen.tokenizer.encode("def f2(x):\n")
    with_cache = list(generate_tokens(gen.model, ids, block - len(ids), temperature=0, use_cache=True))
    without = list(generate_tokens(gen.model, ids, block - len(ids), temperature=0, use_cache=False))
    assert with_cache == without  # inside one block the cache is exact
    long = list(generate_tokens(gen.model, ids, 3 * block, temperature=0, use_cache=True))
    assert len(long) == 3 * block  # past block_size the window slides instead of failing
    long_prompt = "def f1(x):\n    return x\n" * 20  # far longer than block_size: cropped from the left
    assert len(gen.tokenizer.encode(long_prompt)) > block
    assert len(gen.generate(long_prompt, max_new_tokens=5, temperature=0)) > 0


def test_a_list_is_decoded_together_and_each_text_is_the_one_it_gets_alone(trained):
    gen = load(trained, device="cpu")
    prompts = ["def f1(x):\n", "x", "    return x + 1\n\ndef f", ""]  # mixed lengths, one empty
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_k=20, seed=7), dict(temperature=1.0, seed=1)):
        alone = [gen.generate(p, max_new_tokens=25, **kwargs) for p in prompts]
        assert gen.generate(prompts, max_new_tokens=25, **kwargs) == alone, kwargs
        assert gen.generate(prompts, max_new_tokens=25, batch_size=3, **kwargs) == alone
    stopped = gen.generate(prompts, max_new_tokens=40, temperature=0, stop="\n")
    assert stopped == [gen.generate(p, max_new_tokens=40, temperature=0, stop="\n") for p in prompts]
    assert all("\n" not in t for t in stopped)
    assert gen.generate([], max_new_tokens=5) == []
    with pytest.raises(ValueError, match="batch_size=0 must be an integer of at least 1"):
        gen.generate(prompts, batch_size=0)


def test_one_forward_pass_per_token_for_the_whole_batch(trained):
    """Rows leave the batch when the caller finishes them, the cache shrinks with them, and the window
    slides past block_size for every row."""
    gen = load(trained, device="cpu")
    block = gen.config.model.block_size
    calls = []
    forward = gen.model.forward

    def spy(idx, *args, **kwargs):
        calls.append(idx.shape[0])
        return forward(idx, *args, **kwargs)

    gen.model.forward = spy
    prompts = [gen.tokenizer.encode(p) for p in ("def f1(x):\n", "x", "    return x\n")]
    finished, seen = set(), {0: 0, 1: 0, 2: 0}
    for step in generate_batch(gen.model, prompts, 3 * block, temperature=0, finished=finished):
        for row, _ in step:
            seen[row] += 1
        if seen[1] == 10:
            finished.add(1)  # row 1 is done after 10 tokens
    assert seen == {0: 3 * block, 1: 10, 2: 3 * block}
    assert len(calls) == 3 * block and calls[:10] == [3] * 10 and set(calls[10:]) == {2}


class Counting(BytesTokenizer):
    """The bytes tokenizer, counting the ids it decodes."""
    decoded = 0

    def decode(self, ids):
        Counting.decoded += len(ids)
        return super().decode(ids)


def test_streamed_text_is_decoded_incrementally():
    """Each id costs a bounded amount of decoding however long the text (no re-decoding of the output so
    far), and the pieces join to the whole text: multi-byte characters whose bytes arrive one id at a time,
    stop strings that span pieces, a stop string that never completes, invalid bytes."""
    tok = Counting()
    text = ("naïve café — 東京 🚀 done\n" * 200) + "the end"
    ids = list(text.encode("utf-8"))
    stream = TextStream(tok, stops=["THE END", "🚀🚀"])
    Counting.decoded = 0
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == text and not stream.done
    assert Counting.decoded < 8 * len(ids), Counting.decoded  # a few ids per id pushed (4.4 here), not len**2 / 2
    assert all("\ufffd" not in p for p in pieces)  # a partial character waits for its bytes

    stream = TextStream(tok, stops=["東京 🚀", "zzz"])
    shown = "".join(stream.push(i) for i in ids)
    assert shown == "naïve café — " and stream.done and stream.finish() == ""
    bad = TextStream(tok)
    out = "".join(bad.push(i) for i in [0xE6, 0x9D] + [0xFF] * 9 + list(b"ok")) + bad.finish()
    assert out == tok.decode([0xE6, 0x9D] + [0xFF] * 9 + list(b"ok"))  # shown as decode shows it


def test_empty_prompt_starts_a_new_document(trained):
    assert len(load(trained).generate("", max_new_tokens=10, seed=0)) > 0


@pytest.mark.parametrize("args, says", [
    (["--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature=-1.0 must not be negative (0 is greedy)"),
    (["--top-k", "0"], "--top-k=0 must be an integer of at least 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens=-1 must be an integer of at least 0"),
    (["--num-samples", "0"], "--num-samples=0 must be an integer of at least 1"),
    (["--seed", "-1"], "--seed=-1 must be an integer from 0 to 2**63 - 1"),
    (["--stop", ""], "--stop strings must be non-empty strings"),
    (["--device", "nonsense"], "device='nonsense' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "device=cuda:99 but"),
    (["déf", "--num-samples", "2"], "PROMPT='déf' cannot be encoded: 'é' (U+00E9) not in the char vocabulary"),
])
def test_the_cli_checks_every_argument_before_any_output(trained, capsys, args, says):
    from raygpt.cli import main

    prompt = [] if args[0] == "déf" else ["def "]
    assert main(["generate", str(trained), *prompt, *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and says in out.err, out


def test_generate_checks_its_arguments_before_the_first_token(trained):
    gen = load(trained, device="cpu")
    with pytest.raises(ValueError, match=r"^top_p=1.5 must be in \(0, 1\]"):
        gen.generate("def ", top_p=1.5)
    with pytest.raises(ValueError, match=r"^prompt='déf' cannot be encoded"):
        gen.generate("déf", stream=True)  # at the call, not at the first piece
    with pytest.raises(ValueError, match="prompt='x€' cannot be encoded"):
        gen.generate(["def ", "x€"])
    assert gen.generate("def ", max_new_tokens=0) == ""  # 0 new tokens: the same rule as sample.max_new_tokens


def test_the_eval_sample_decodes_like_load_generate(trained, monkeypatch):
    """One decoding path: under bf16 the eval sample keeps its KV cache in bf16, as TextGenerator does (not
    in fp32, which attention would cast in full per layer and token)."""
    from raygpt import generate as gen_module
    from raygpt.runs import eval_sample

    dtypes = []
    empty = gen_module.KVCache.empty

    def spy(config, batch, device, dtype):
        dtypes.append(dtype)
        return empty(config, batch, device, dtype)

    monkeypatch.setattr(gen_module.KVCache, "empty", staticmethod(spy))
    g = load(trained, device="cpu")
    g.precision = "bf16"
    g.generate("def ", max_new_tokens=5, seed=0)
    text = eval_sample(g.model, g.tokenizer, g.config, "bf16")
    assert dtypes == [torch.bfloat16, torch.bfloat16] and text.startswith(g.config.sample.prompt)
