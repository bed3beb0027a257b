"""The serving rules without Ray: OpenAI request checks (raygpt/serve/api.py), per-row decoding
(raygpt.generate.decode_rows) and which checkpoint --follow serves (raygpt.checkpoint.best_checkpoint)."""

import json
import shutil

import pytest
import torch

from raygpt.checkpoint import best_checkpoint, save_checkpoint
from raygpt.config import ServeConfig, load_config
from raygpt.generate import Row, TextGenerator, decode_rows
from raygpt.model import GPT
from raygpt.serve.api import ApiError, parse_completion
from raygpt.tokenizer import train_tokenizer
from raygpt.train import TrainState
from tests.conftest import TEXT


@pytest.fixture(scope="module")
def gen():
    tok = train_tokenizer("char", [TEXT])
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                             f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    return TextGenerator(GPT(cfg.model), tok, cfg, torch.device("cpu"))


def parse(gen, body, **settings):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_completion(raw, gen, ServeConfig(**settings), "demo")


def test_a_request_becomes_one_row_per_prompt_and_choice(gen):
    c = parse(gen, {"model": "demo", "prompt": ["def f", "ret"], "n": 2, "max_tokens": 7, "temperature": 0.5,
                    "top_p": 0.9, "top_k": 5, "seed": 11, "stop": "\n"})
    assert [r.ids for r in c.rows] == [gen.prompt_ids("def f")] * 2 + [gen.prompt_ids("ret")] * 2
    assert {(r.max_new_tokens, r.temperature, r.top_p, r.top_k, tuple(r.stops)) for r in c.rows} == \
        {(7, 0.5, 0.9, 5, ("\n",))}
    # choice j of every prompt samples with seed + j, as generate(seed=seed + j) does
    draws = [torch.randint(0, 1000, (3,), generator=r.generator).tolist() for r in c.rows]
    assert draws[0] == draws[2] != draws[1] == draws[3]
    assert c.prompt_tokens == 8 and not c.stream and c.warnings == []
    # token ids as the prompt (OpenAI's other forms), and the defaults
    c = parse(gen, {"prompt": [[1, 2, 3], [4]]})
    assert [r.ids for r in c.rows] == [[1, 2, 3], [4]] and c.rows[0].max_new_tokens == 16
    assert parse(gen, {"prompt": ""}).rows[0].ids == [gen.tokenizer.eot_id]  # a new document


@pytest.mark.parametrize("body, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    ({}, "prompt", "prompt is required"),
    ({"prompt": []}, "prompt", "must be a string"),
    ({"prompt": [[1, 10**6]]}, "prompt", "token ids from 0 to"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", "max_tokens=-3 must be an integer of at least 0"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens", "cap of 1024 (serve.max_tokens_cap)"),
    ({"prompt": "x", "temperature": -1}, "temperature", "must not be negative"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
    ({"prompt": "x", "top_p": 0}, "top_p", "must be in (0, 1]"),
    ({"prompt": "x", "top_k": 0}, "top_k", "at least 1"),
    ({"prompt": "x", "seed": -1}, "seed", "from 0 to 2**63 - 1"),
    ({"prompt": "x", "n": 1000}, "n", "more than 64 choices"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "x", "logprobs": 5}, "logprobs", "not supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "zebra\u00e9"}, "prompt", "'\u00e9' (U+00E9)"),
])
def test_each_bad_field_is_named(gen, body, param, words):
    with pytest.raises(ApiError) as e:
        parse(gen, body)
    assert e.value.status == 400 and e.value.param == param and words in str(e.value), str(e.value)
    assert e.value.body()["error"]["param"] == param


def test_fields_openai_clients_send_by_default_are_accepted(gen):
    c = parse(gen, {"model": "demo", "prompt": "x", "echo": False, "logprobs": None, "best_of": 1,
                    "frequency_penalty": 0, "presence_penalty": 0, "user": "u", "suffix": None, "n": None,
                    "max_tokens": None, "stream": True, "stream_options": {"include_usage": True}})
    assert c.stream and c.include_usage and len(c.rows) == 1


def test_another_model_is_404_and_a_long_prompt_is_cut_from_the_left(gen):
    with pytest.raises(ApiError) as e:
        parse(gen, {"model": "gpt-4o", "prompt": "x"})
    assert e.value.status == 404 and e.value.code == "model_not_found" and "'demo'" in str(e.value)
    prompt = "def f(x):\n" * 5  # 50 characters, context 32
    c = parse(gen, {"prompt": prompt})
    assert c.rows[0].ids == gen.prompt_ids(prompt)[-32:] and c.prompt_tokens == 32
    assert c.warnings == ["prompt 0 has 50 tokens, more than the model's context of 32: its first 18 tokens were "
                          "dropped (truncated from the left)"]


def test_rows_with_their_own_settings_decode_as_they_would_alone(gen):
    def rows():
        return [Row(gen.prompt_ids("def f1(x):"), 12, 0.0), Row(gen.prompt_ids("re"), 5, 0.9, 4, None,
                                                                   gen.generator(3)),
                Row(gen.prompt_ids("x"), 0), Row(gen.prompt_ids("def"), 9, 1.3, None, 0.8, gen.generator(4), ["r"])]

    def texts(steps, n):
        out, finish, counts = [""] * n, [None] * n, [0] * n
        for step in steps:
            for i, piece, end in step:
                assert finish[i] is None, "a row ended twice"
                out[i] += piece
                finish[i] = end
                counts[i] += 1
        return out, finish, counts

    together, finish, counts = texts(decode_rows(gen.model, gen.tokenizer, rows()), 4)
    alone = [texts(decode_rows(gen.model, gen.tokenizer, [r]), 1) for r in rows()]
    assert together == [a[0][0] for a in alone]
    assert finish[0] == "length" and counts[0] == 12 and counts[1] == 5 and finish[2] == "length" and counts[2] == 1
    assert together[2] == "" and "r" not in together[3]
    # generate() is the same path
    assert together[1] == gen.generate("re", max_new_tokens=5, temperature=0.9, top_k=4, seed=3)


def test_a_cancelled_row_leaves_the_batch(gen):
    cancelled = set()
    rows = [Row(gen.prompt_ids("def"), 30, 0.0), Row(gen.prompt_ids("x"), 30, 0.0)]
    seen = {0: 0, 1: 0}
    for n, step in enumerate(decode_rows(gen.model, gen.tokenizer, rows, cancelled=lambda i: i in cancelled)):
        for i, _, _ in step:
            seen[i] += 1
        if n == 3:
            cancelled.add(1)
    # cancelled after step 3: the step already computed (4) still comes, then row 1 is out; row 0 goes on
    assert seen[1] == 5 and seen[0] > 5


def test_follow_serves_the_best_checkpoint_below_a_folder(gen, tmp_path):
    def save(path, step, val_loss):
        save_checkpoint(path, gen.model, gen.config, gen.tokenizer, train_state=TrainState(step=step),
                        metrics={"val_loss": val_loss} if val_loss is not None else None)

    run = tmp_path / "run"
    save(run / "step_000010", 10, 2.0)
    save(run / "step_000020", 20, 1.5)
    save(run / "step_000030", 30, 1.7)
    assert best_checkpoint(run) == run / "step_000020"
    # a tune experiment: trials' checkpoints, deeper down; a better one anywhere wins; a cut one is skipped
    save(tmp_path / "exp" / "trial_1" / "checkpoint_000001", 5, 1.1)
    shutil.copytree(run, tmp_path / "exp" / "trial_0")
    assert best_checkpoint(tmp_path / "exp") == tmp_path / "exp" / "trial_1" / "checkpoint_000001"
    (tmp_path / "exp" / "trial_1" / "checkpoint_000001" / "model.safetensors").write_bytes(b"cut")
    assert best_checkpoint(tmp_path / "exp") == tmp_path / "exp" / "trial_0" / "step_000020"
    assert best_checkpoint(tmp_path / "nothing") is None


def test_rows_that_arrive_while_a_batch_runs_join_it_and_each_text_is_its_own(gen):
    """The server's continuous batching (raygpt/serve/batcher.py), without Ray: rows arriving at different
    times join the running batch (at the next step) and each text is the one its row gets alone; a row whose
    client goes away leaves."""
    import asyncio

    from raygpt.serve.batcher import Batcher, Pending

    cases = [("def f1(x):", 20, 0.0, 1), ("re", 12, 0.9, 2), ("x", 16, 1.2, 3), ("def", 9, 0.7, 4),
             ("    ", 14, 0.0, 5)]

    def row(prompt, n, temperature, seed):
        return Row(gen.prompt_ids(prompt), n, temperature, None, None, gen.generator(seed))

    async def main():
        batcher = Batcher(max_batch_size=3, wait_s=0.0)

        async def ask(delay, case):
            await asyncio.sleep(delay)
            pieces = [piece async for piece, _, _ in batcher.decode(Pending(row(*case), gen))]
            return "".join(pieces)

        texts = await asyncio.gather(*(ask(0.004 * i, case) for i, case in enumerate(cases)))
        # a client that goes away after 3 pieces
        stream = batcher.decode(gone := Pending(row("def", 30, 0.0, 0), gen))
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
        return texts, batcher.stats, gone

    texts, stats, gone = asyncio.run(main())
    assert texts == [gen.generate(p, max_new_tokens=n, temperature=t, seed=s) for p, n, t, s in cases]
    assert stats["largest"] == 3 and stats["joined"] >= 2 and stats["rows"] == 6, stats  # rows joined running batches
    assert gone.cancelled and gone.row.made < 30


def test_rows_joining_a_running_batch_decode_as_alone_also_when_longer(gen):
    """generate_batch's incoming, through decode_rows: a row with a longer prompt than the running rows have
    filled (their cache slots move right) and a shorter one join at given steps; each text is its own alone.
    Past block_size (the window slides for the batch) rows still join and every row ends once."""
    def row(prompt, n, temperature=0.0, seed=0):
        return Row(gen.prompt_ids(prompt), n, temperature, None, None, gen.generator(seed))

    def run(first, incoming_at):
        rows, texts, ends = list(first), {}, {}
        step_no = [0]

        def incoming():
            step_no[0] += 1
            new = incoming_at.get(step_no[0], [])
            rows.extend(new)
            return new

        for step in decode_rows(gen.model, gen.tokenizer, first, incoming=incoming):
            for i, piece, finish in step:
                texts[i] = texts.get(i, "") + piece
                assert i not in ends
                if finish:
                    ends[i] = finish
        return [texts.get(i, "") for i in range(len(rows))], ends, len(rows)

    cases = [("x", 20, 0.0, 0), ("def f1(x):\n    ret", 10, 0.9, 1), ("re", 8, 1.1, 2), ("de", 0, 0.0, 3)]
    texts, ends, _ = run([row(*cases[0])], {2: [row(*cases[1])], 5: [row(*cases[2]), row(*cases[3])]})
    assert texts == [gen.generate(p, max_new_tokens=n, temperature=t, seed=s) for p, n, t, s in cases]
    assert set(ends) == {0, 1, 2, 3} and ends[3] == "length"
    # past block_size (32; the first prompt fills it): the batch slides, rows join while it does, each ends once
    long = [("def f1(x):\n    return x" * 2, 40, 0.0, 4)]
    texts, ends, n = run([row(*long[0])], {k: [row("def" * k, 30, 0.8, k)] for k in (1, 2, 3, 4)})
    assert n == 5 and len(ends) == n and all(len(t) <= 40 for t in texts)
