"""Corpora as documents: reading them for the local loop, the train/val split, and tokenizing to arrays.

No Ray: the local loop uses it directly and the Ray Data pipeline reuses its splitting and joining rules,
so a split is the same whichever path prepared it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from raygpt.config import DataConfig
from raygpt.data.sources import decode_file, list_sources, read_file
from raygpt.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

@dataclass
class Document:
    name: str  # stable identity (relative path): the train/val split hashes it
    text: str


def read_documents(source: str, max_chars: int | None = None) -> list[Document]:
    """UTF-8 text documents of a source (see raygpt.data.sources), in a stable order; at most
    ``max_chars`` characters in all. Binary and non-UTF-8 files are skipped."""
    fs, files = list_sources(DataConfig(source=source, max_chars=max_chars))
    docs, total, bad = [], 0, []
    for f in files:
        text, reason = decode_file(read_file(fs, f.path))
        if reason:
            bad.append(f.name)
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[:max_chars - total]
        if text:
            docs.append(Document(f.name, text))
            total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not docs:
        detail = f" ({len(bad)} files are not UTF-8 text, e.g. {bad[0]})" if bad else ""
        raise ValueError(f"data.source={source!r} holds no text{detail}")
    return docs


def is_val(name: str, val_fraction: float) -> bool:
    """Stable per-document split: the same name lands in the same split on every machine and run."""
    return zlib.crc32(name.encode("utf-8")) / 2**32 < val_fraction


def split_text(name: str, text: str, data: DataConfig) -> list[tuple[str, str]]:
    """[(split, text)] of one document by data.split: all of it to the split its name hashes to, or
    (tail) the first 1 - val_fraction to train and the rest to val. Ray Data and the local loop share it."""
    if data.split == "tail":
        cut = int(len(text) * (1 - data.val_fraction))
        return [(s, t) for s, t in (("train", text[:cut]), ("val", text[cut:])) if t]
    return [("val" if is_val(name, data.val_fraction) else "train", text)]


def split_documents(docs: list[Document], data: DataConfig) -> tuple[list[str], list[str]]:
    """(train texts, val texts); an empty split is an error that says what to change."""
    parts: dict[str, list[str]] = {"train": [], "val": []}
    for d in docs:
        for split, text in split_text(d.name, d.text, data):
            parts[split].append(text)
    check_split_sizes({k: len(v) for k, v in parts.items()}, len(docs), data)
    return parts["train"], parts["val"]


def check_split_sizes(sizes: dict[str, int], n_docs: int, data: DataConfig) -> None:
    for split in ("train", "val"):
        if not sizes.get(split):
            raise ValueError(f"the {split} split is empty: {n_docs} documents with data.val_fraction="
                             f"{data.val_fraction}; use data.split=tail for a corpus of one or few documents, "
                             f"or a larger data.val_fraction")


def build_tokenizer(data: DataConfig, texts: Iterable[str]) -> Tokenizer:
    """The tokenizer data.tokenizer_path names, or one trained on ``texts``."""
    if data.tokenizer_path:
        tok = load_tokenizer(data.tokenizer_path)
        if tok.kind != data.tokenizer:
            raise ValueError(f"data.tokenizer_path={data.tokenizer_path!r} holds a {tok.kind} tokenizer but "
                             f"data.tokenizer={data.tokenizer}; make them agree")
        return tok
    return train_tokenizer(data.tokenizer, texts, data.bpe_vocab_size if data.tokenizer == "bpe" else None)


def encode_documents(texts: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token array: each document's ids followed by the end-of-text id (documents never run into
    each other without a boundary the model can see)."""
    parts = []
    eot = np.array([tokenizer.eot_id], dtype=np.int32)
    for text in texts:
        parts.append(tokenizer.encode_array(text))
        parts.append(eot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def prepare_arrays(data: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Read, split, tokenize: (tokenizer, train ids, val ids). Without a tokenizer one is built; it is
    trained on the whole corpus because a char vocabulary must cover the val text too."""
    docs = read_documents(data.source, data.max_chars)
    train_texts, val_texts = split_documents(docs, data)
    tokenizer = tokenizer or build_tokenizer(data, (d.text for d in docs))
    return tokenizer, encode_documents(train_texts, tokenizer), encode_documents(val_texts, tokenizer)

