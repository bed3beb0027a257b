"""Tokenizers: character-level, raw UTF-8 bytes, and byte-level BPE.

All three share one small interface (:class:`Tokenizer`) and one file format
entry point (:func:`load_tokenizer`). Char/bytes tokenizers are pure numpy; the
HF ``tokenizers`` package is imported only when a BPE tokenizer is trained or
loaded, so the simple kinds work without it.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re
from typing import Iterable

import numpy as np

EOT = "<|endoftext|>"
KINDS = ("char", "bytes", "bpe")
FILENAME = "tokenizer.json"

# Target size of the pieces a big text is cut into for HF batch encoding.
_BPE_CHUNK_CHARS = 1 << 16
# Characters handed to HF per encode_batch call: enough pieces for its threads, while the Encodings it
# returns (ids, tokens, offsets: some 100 bytes a token) stay a few hundred MB at most.
_BPE_BATCH_CHARS = 1 << 21
# UTF-8 bytes that characters() takes together.
_CHARACTERS_BATCH = 1 << 23
# A newline between two non-space characters is always a pre-token boundary of
# the GPT-2 byte-level regex, so encoding the pieces separately is exact.
_SAFE_SPLIT = re.compile(r"(?<=\S)\n(?=\S)")


class Tokenizer:
    """Base class: maps text to integer ids and back.

    Attributes:
        kind: ``"char"``, ``"bytes"`` or ``"bpe"``.
        vocab_size: number of ids, including the end-of-text token.
        eot_id: id of the end-of-text token (:data:`EOT`).
    """

    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as :meth:`encode`, as an ``np.int32`` array (fast for big corpora)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """:meth:`encode_array` of each text (BPE encodes them together, on all cores)."""
        return [self.encode_array(text) for text in texts]

    def decode(self, ids) -> str:
        """Return the text of ``ids`` (any iterable of ints); EOT decodes to ``"<|endoftext|>"``."""
        raise NotImplementedError

    def save(self, directory) -> pathlib.Path:
        """Write ``directory/tokenizer.json`` (creating ``directory``) and return its path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        path.write_text(self._to_json(), encoding="utf-8")
        return path

    def _to_json(self) -> str:
        raise NotImplementedError

    def _check_ids(self, ids) -> np.ndarray:
        """Coerce ``ids`` to a 1-D int64 array and reject out-of-range ids."""
        arr = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids))
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"decode expects integer token ids, got dtype {arr.dtype}")
        arr = arr.reshape(-1).astype(np.int64, copy=False)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"token id {int(arr[np.argmax(bad)])} is out of range for this {self.kind} "
                f"tokenizer (vocab_size {self.vocab_size}); were these ids made by a different tokenizer?"
            )
        return arr

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character of a closed vocabulary; EOT gets the last id."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("char tokenizer needs at least one character of training text; got none")
        self.chars = chars
        self.vocab_size = len(chars) + 1
        self.eot_id = len(chars)
        self._itos = chars + [EOT]
        # Lookup tables: code point -> id (-1: not in the vocabulary; the last entry stands for every code
        # point past the largest one), and for ASCII text a bytes.translate table (ASCII characters sort
        # first, so their ids are below 128 and fit a byte; 255 marks one not in the vocabulary).
        self._lut = np.full(ord(chars[-1]) + 2, -1, dtype=np.int32)
        self._lut[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
        ascii_ids = self._lut[:128]
        table = np.full(256, 255, dtype=np.uint8)
        table[:len(ascii_ids)] = np.where(ascii_ids >= 0, ascii_ids, 255)
        self._ascii = table.tobytes()

    def encode_array(self, text: str) -> np.ndarray:
        if text.isascii():  # (a flag CPython keeps: no scan) one C pass of bytes.translate
            ids = text.encode("ascii").translate(self._ascii)
            pos = ids.find(255)
            if pos < 0:
                return np.frombuffer(ids, dtype=np.uint8).astype(np.int32)
        else:
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            ids = np.take(self._lut, codes, mode="clip")
            unknown = ids < 0
            if not unknown.any():
                return ids
            pos = int(np.argmax(unknown))
        ch = text[pos]
        raise ValueError(
            f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the char vocabulary "
            f"({len(self.chars)} characters built from the training corpus); "
            "use data.tokenizer=bytes or bpe for open-vocabulary text"
        )

    def decode(self, ids) -> str:
        itos = self._itos
        return "".join(itos[i] for i in self._check_ids(ids).tolist())

    def _to_json(self) -> str:
        return json.dumps({"raygpt_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)


class BytesTokenizer(Tokenizer):
    """The 256 UTF-8 byte values as ids, plus EOT = 256. Open vocabulary, no training."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        arr = self._check_ids(ids)
        # Decode each run of bytes between EOTs on its own so a multi-byte
        # character can never be glued together across a document boundary.
        cuts = np.flatnonzero(arr == self.eot_id)
        parts, start = [], 0
        for cut in cuts.tolist() + [len(arr)]:
            parts.append(arr[start:cut].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            start = cut + 1
        return EOT.join(parts)

    def _to_json(self) -> str:
        return json.dumps({"raygpt_tokenizer": "bytes"})


class BPETokenizer(Tokenizer):
    """Wrapper around an HF ``tokenizers.Tokenizer`` (raygpt-trained or e.g. GPT-2's)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, source: str = "this tokenizer"):
        self._hf = hf_tokenizer
        eot_id = hf_tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(
                f"{source} has no {EOT} token; raygpt needs it to separate documents. "
                f"Add {EOT} as a special token or use a tokenizer that has one (e.g. GPT-2's)"
            )
        self.eot_id = int(eot_id)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self._chunkable = _is_plain_byte_level(json.loads(hf_tokenizer.to_str()))

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS etc.): callers decide where EOT goes.
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Big texts are cut at pre-token boundaries only, so encoding the pieces together (in parallel, in
        # HF) yields exactly the ids of encoding each text whole. HF gets about _BPE_BATCH_CHARS at a time.
        out: list[list[np.ndarray]] = [[] for _ in texts]
        batch: list[tuple[int, str]] = []  # (the text it is of, a piece)
        held = 0
        for i, text in enumerate(texts):
            for piece in self._pieces(text):
                batch.append((i, piece))
                held += len(piece)
                if held >= _BPE_BATCH_CHARS:
                    self._encode_pieces(batch, out)
                    batch, held = [], 0
        if batch:
            self._encode_pieces(batch, out)
        # Every text has one piece at least (an empty text is one empty piece).
        return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in out]

    def _encode_pieces(self, batch: list[tuple[int, str]], out: list[list[np.ndarray]]) -> None:
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking we never use.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        for (owner, _), encoding in zip(batch, encode([piece for _, piece in batch], add_special_tokens=False)):
            out[owner].append(np.asarray(encoding.ids, dtype=np.int32))

    def _pieces(self, text: str) -> list[str]:
        """``text`` cut into pieces of about _BPE_CHUNK_CHARS at _SAFE_SPLIT boundaries (when exact)."""
        if not self._chunkable or len(text) <= _BPE_CHUNK_CHARS:
            return [text]
        pieces, start = [], 0
        while start < len(text):
            m = _SAFE_SPLIT.search(text, start + _BPE_CHUNK_CHARS)
            end = m.end() if m else len(text)
            pieces.append(text[start:end])
            start = end
        return pieces

    def decode(self, ids) -> str:
        return self._hf.decode(self._check_ids(ids).tolist(), skip_special_tokens=False)

    def _to_json(self) -> str:
        return self._hf.to_str()


def _is_plain_byte_level(spec: dict) -> bool:
    """True if the pipeline is GPT-2 style, where :data:`_SAFE_SPLIT` cuts are exact."""
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and not any("\n" in t.get("content", "") for t in spec.get("added_tokens") or [])
    )


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of ``kind`` from ``texts`` (an iterable of strings, may be a generator).

    ``"char"``: sorted distinct characters of ``texts`` plus EOT. ``"bytes"``:
    ignores ``texts``; 257 ids. ``"bpe"``: byte-level BPE with at most
    ``vocab_size`` ids (required, > 257; HF stops early if the corpus runs out
    of merges).
    """
    if isinstance(texts, str):  # a bare string would otherwise be iterated per character
        texts = [texts]
    if kind == "char":
        return CharTokenizer(characters(texts))
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "bpe":
        return _train_bpe(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds are {', '.join(KINDS)}")


def characters(texts: Iterable[str]) -> set[str]:
    """The distinct characters of ``texts`` (a char vocabulary), at C speed rather than one Python step
    per character: texts are taken together, some MB at a time, as UTF-8, and the ASCII characters found
    in a look at the start are deleted from all of it with bytes.translate, until a look finds no new one;
    only what is then left (other characters, usually few) is gone through one by one. Deleting whole
    one-byte characters leaves valid UTF-8."""
    chars: set[str] = set()
    batch: list[bytes] = []
    held = 0
    for text in itertools.chain(texts, [None]):
        if text is not None:
            batch.append(text.encode("utf-8", "surrogatepass"))
            held += len(batch[-1])
            if held < _CHARACTERS_BATCH:
                continue
        rest = b"".join(batch)
        while new := {b for b in set(rest[:4096]) if b < 0x80}:
            chars.update(map(chr, new))
            rest = rest.translate(None, bytes(new))
        chars.update(rest.decode("utf-8", "surrogatepass"))
        batch, held = [], 0
    return chars


def _train_bpe(texts: Iterable[str], vocab_size: int | None) -> BPETokenizer:
    if vocab_size is None or isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 257:
        raise ValueError(
            f"bpe tokenizer needs an integer vocab_size > 257 (256 byte tokens + {EOT} + at least "
            f"one merge), got {vocab_size!r}; set data.bpe_vocab_size, e.g. to 4096"
        )
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(hf, source="the trained BPE tokenizer")


def tokenizer_file(path) -> pathlib.Path:
    """The file a tokenizer path names: ``path`` itself, or ``tokenizer.json`` in it when it is a directory."""
    path = pathlib.Path(path)
    return path / FILENAME if path.is_dir() else path


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from a directory holding ``tokenizer.json`` or from a ``.json`` file.

    Reads raygpt's own char/bytes files and any HF ``tokenizers`` JSON (loaded
    as kind ``"bpe"``; it must contain an ``<|endoftext|>`` token).
    """
    path = tokenizer_file(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path}; pass a directory containing {FILENAME} or the path of a .json file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from e
    if not isinstance(spec, dict):
        raise ValueError(f"tokenizer file {path} is not a raygpt or HF tokenizers JSON object")

    if "raygpt_tokenizer" in spec:
        kind = spec["raygpt_tokenizer"]
        if kind == "bytes":
            return BytesTokenizer()
        if kind == "char":
            chars = spec.get("chars")
            if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
                raise ValueError(f"tokenizer file {path}: 'chars' must be a list of single characters")
            return CharTokenizer(chars)
        raise ValueError(f"tokenizer file {path} has unknown raygpt_tokenizer kind {kind!r}; expected char or bytes")

    if "model" in spec:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # HF raises a bare Exception subclass; re-raise with the file name
            raise ValueError(f"tokenizer file {path} could not be loaded by HF tokenizers: {e}") from e
        return BPETokenizer(hf, source=f"tokenizer file {path}")

    raise ValueError(
        f"tokenizer file {path} is neither a raygpt tokenizer (no 'raygpt_tokenizer' key) "
        "nor an HF tokenizers file (no 'model' key)"
    )
