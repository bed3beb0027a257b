"""Unit tests for raygpt.tokenizer (no network, a few seconds)."""

import json
import random

import numpy as np
import pytest

from raygpt import tokenizer as tok_mod
from raygpt.tokenizer import EOT, Tokenizer, load_tokenizer, train_tokenizer

CHAR_CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcödé ✓\n"
UNICODE_TEXT = "héllo wörld 👋🏽 — 日本語のテキスト, emoji 🚀🎉, Ω≈ç√, tab\tnew\nline  \n\n  end"


def _bpe_corpus(n_docs=100, seed=0):
    """Deterministic pseudo-English documents with some unicode and ragged whitespace.

    Multi-line with runs like " \n" and "\n\n" so BPE learns whitespace merges,
    which is what makes chunked encoding differ if it cuts in the wrong place.
    """
    rng = random.Random(seed)
    words = ["the", "king", "queen", "speak", "hear", "citizen", "proceed", "further",
             "lord", "naïve", "café", "日本", "über", "1234", "don't", "we're"]
    docs = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                 + rng.choice([".", ",", "!", "?", "", " ", "  "]) for _ in range(rng.randint(2, 8))]
        docs.append("".join(line + rng.choice(["\n", "\n\n", "\n ", "\n\n  "]) for line in lines))
    return docs


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", iter(_bpe_corpus()), vocab_size=350)


# --- char ---------------------------------------------------------------------------------

def test_char_vocab_and_round_trip():
    tok = train_tokenizer("char", [CHAR_CORPUS])
    n_chars = len(set(CHAR_CORPUS))
    assert tok.kind == "char"
    assert tok.vocab_size == n_chars + 1
    assert tok.eot_id == n_chars
    ids = tok.encode(CHAR_CORPUS)
    assert len(ids) == len(CHAR_CORPUS)
    assert max(ids) < tok.eot_id
    assert tok.decode(ids) == CHAR_CORPUS
    assert tok.decode(np.array(ids)) == CHAR_CORPUS
    assert tok.decode([tok.eot_id]) == EOT
    assert repr(tok) == f"Tokenizer(kind='char', vocab_size={n_chars + 1})"


def test_char_ids_are_sorted_char_order():
    tok = train_tokenizer("char", ["cab", "\nb"])
    assert tok.encode("\nabc") == [0, 1, 2, 3]
    assert tok.vocab_size == 5 and tok.eot_id == 4


def test_char_encode_array_matches_encode():
    tok = train_tokenizer("char", [CHAR_CORPUS])
    big = CHAR_CORPUS * 200
    arr = tok.encode_array(big)
    assert arr.dtype == np.int32
    assert arr.tolist() == tok.encode(big)
    assert tok.encode_array("").shape == (0,)


def test_characters_is_the_set_of_characters():
    from raygpt.tokenizer import characters

    rng = random.Random(0)
    texts = ["", "abc", UNICODE_TEXT, CHAR_CORPUS * 50, "日本語" * 3000 + "late ascii", "lone \ud800 surrogate",
             "".join(chr(rng.randint(0, 700)) for _ in range(20_000))]
    for text in texts:
        assert characters([text]) == set(text)
    assert characters(texts) == set("".join(texts))


def test_char_encode_array_on_non_ascii_text():
    tok = train_tokenizer("char", [UNICODE_TEXT + "abc"])
    assert tok.encode_array(UNICODE_TEXT).tolist() == [tok.chars.index(c) for c in UNICODE_TEXT]
    with pytest.raises(ValueError, match=r"'\?' \(U\+003F\) at position 3 is not in the char vocabulary"):
        tok.encode("日本語?")
    with pytest.raises(ValueError, match=r"U\+1F600\) at position 1"):  # past the largest code point it knows
        tok.encode("a\U0001F600")


def test_char_unknown_character_error():
    tok = train_tokenizer("char", ["abc abc"])
    with pytest.raises(ValueError) as info:
        tok.encode("abc é")
    msg = str(info.value)
    assert "'é'" in msg and "U+00E9" in msg and "position 4" in msg
    assert "bytes or bpe" in msg
    # the literal EOT string is not special for char: its characters are just unknown here
    with pytest.raises(ValueError, match="'<'"):
        tok.encode(EOT)


def test_char_needs_text():
    with pytest.raises(ValueError, match="at least one character"):
        train_tokenizer("char", [""])


# --- bytes --------------------------------------------------------------------------------

def test_bytes_vocab_and_round_trip():
    tok = train_tokenizer("bytes", ["ignored"])
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT
    arr = tok.encode_array(UNICODE_TEXT)
    assert arr.dtype == np.int32 and arr.tolist() == ids


def test_bytes_decode_eot_and_invalid_utf8():
    tok = train_tokenizer("bytes", [])
    ids = tok.encode("a😀") + [256] + tok.encode("b")
    assert tok.decode(ids) == "a😀" + EOT + "b"
    # a truncated multi-byte character becomes U+FFFD rather than raising
    assert tok.decode(tok.encode("😀")[:2] + [256]) == "\ufffd" + EOT
    # the literal EOT text is plain bytes, not the EOT id
    assert 256 not in tok.encode(EOT)


# --- bpe ----------------------------------------------------------------------------------

def test_bpe_vocab_and_round_trip_on_unseen_text(bpe):
    assert bpe.kind == "bpe"
    # HF may stop short of the request on a tiny corpus, never above it
    assert 257 < bpe.vocab_size <= 350
    assert bpe.decode([bpe.eot_id]) == EOT
    unseen = "The quick brown fox über alles! 👋 日本語 " + UNICODE_TEXT
    ids = bpe.encode(unseen)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == unseen
    # merges were learned: common corpus words take fewer tokens than bytes
    seen = "the king and the queen speak"
    assert len(bpe.encode(seen)) < len(seen.encode("utf-8"))
    assert bpe.encode("a" + EOT + "b").count(bpe.eot_id) == 1


def test_bpe_encode_array_matches_encode_across_chunks(bpe, monkeypatch):
    # tiny chunks force many cuts; whitespace-heavy text probes the cut rule
    monkeypatch.setattr(tok_mod, "_BPE_CHUNK_CHARS", 7)
    rng = random.Random(1)
    pieces = ["the", "king", " ", "  ", "\n", "\n\n", " \n", "\n ", "é", "👋", "'s", EOT, ".", "\t"]
    text = "".join(rng.choice(pieces) for _ in range(3000))
    arr = bpe.encode_array(text)
    assert arr.dtype == np.int32
    assert arr.tolist() == bpe.encode(text)
    assert bpe.decode(arr) == text


def test_bpe_encode_batch_matches_encode_across_pieces_and_calls(bpe, monkeypatch):
    monkeypatch.setattr(tok_mod, "_BPE_CHUNK_CHARS", 50)  # texts cut into pieces
    monkeypatch.setattr(tok_mod, "_BPE_BATCH_CHARS", 300)  # and HF called many times, pieces of one text apart
    texts = _bpe_corpus(40, seed=3) + ["", "x"]
    arrays = bpe.encode_batch(texts)
    assert [a.tolist() for a in arrays] == [bpe.encode(t) for t in texts]
    assert all(a.dtype == np.int32 for a in arrays) and bpe.encode_batch([]) == []


def test_bpe_vocab_size_validation():
    for bad in (None, 257, 100):
        with pytest.raises(ValueError, match="vocab_size > 257"):
            train_tokenizer("bpe", ["some text"], vocab_size=bad)


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"'wordpiece'.*char, bytes, bpe"):
        train_tokenizer("wordpiece", ["x"])


# --- save / load --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bytes", "bpe"])
def test_save_load_round_trip(kind, bpe, tmp_path):
    tok = bpe if kind == "bpe" else train_tokenizer(kind, [CHAR_CORPUS])
    path = tok.save(tmp_path / "nested" / "tok")
    assert path == tmp_path / "nested" / "tok" / "tokenizer.json" and path.is_file()
    for where in (path.parent, path):  # directory or file both work
        loaded = load_tokenizer(where)
        assert isinstance(loaded, Tokenizer)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
        assert loaded.encode(CHAR_CORPUS) == tok.encode(CHAR_CORPUS)
        assert loaded.decode(tok.encode(CHAR_CORPUS)) == CHAR_CORPUS


def test_load_plain_hf_tokenizer_without_eot(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world"] * 10, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    path = tmp_path / "hf.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match=r"has no <\|endoftext\|> token"):
        load_tokenizer(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_tokenizer(bad)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="odd.json"):
        load_tokenizer(odd)
    odd.write_text(json.dumps({"raygpt_tokenizer": "words"}))
    with pytest.raises(ValueError, match="'words'"):
        load_tokenizer(odd)


@pytest.mark.parametrize("kind", ["char", "bytes", "bpe"])
def test_decode_out_of_range(kind, bpe):
    tok = bpe if kind == "bpe" else train_tokenizer(kind, [CHAR_CORPUS])
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} .*vocab_size {tok.vocab_size}"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode(np.array([-1]))
