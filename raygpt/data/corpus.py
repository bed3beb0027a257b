"""Corpora as documents: reading them for the local loop, the train/val split, and tokenizing to arrays.

No Ray: the local loop uses it directly and the Ray Data pipeline reuses its splitting and joining rules,
so a split is the same whichever path prepared it.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable, Optional

import numpy as np

from raygpt.config import DataConfig
from raygpt.data.sources import (Document, Skipped, count_skipped, list_sources, parse_file, read_file,
                                 skipped_error)
from raygpt.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def read_documents(source: str, max_chars: int | None = None, text_field: str = "text",
                   skipped: Optional[list[Skipped]] = None) -> list[Document]:
    """The documents of a source in a stable order (a text file is one, a JSON record one: see
    raygpt.data.sources.parse_file, which the Ray Data prepare uses too); at most ``max_chars`` characters
    in all. What is left out (binary and non-UTF-8 files, bad JSON records) is added to ``skipped``."""
    fs, files = list_sources(DataConfig(source=source, max_chars=max_chars))
    docs, total, bad = [], 0, []
    for f in files:
        found, left_out = parse_file(read_file(fs, f.path), f.name, text_field)
        bad += left_out
        for doc in found:
            if max_chars is not None and total + len(doc.text) > max_chars:
                doc = Document(doc.name, doc.text[:max_chars - total])
            if doc.text:
                docs.append(doc)
                total += len(doc.text)
            if max_chars is not None and total >= max_chars:
                break
        if max_chars is not None and total >= max_chars:
            break
    if skipped is not None:
        skipped += bad
    if not docs:
        raise no_text_error(source, bad)
    return docs


def no_text_error(source: str, skipped: list[Skipped]) -> ValueError:
    """A source with no text left, saying what was skipped (both paths)."""
    detail = f" ({count_skipped(skipped)} skipped, e.g. {skipped[0].what})" if skipped else ""
    return ValueError(f"data.source={source!r} holds no text{detail}")


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
    arrays = tokenizer.encode_batch(list(texts))
    ids = np.empty(sum(len(a) for a in arrays) + len(arrays), dtype=np.int32)
    at = 0
    for a in arrays:
        ids[at:at + len(a)] = a
        ids[at + len(a)] = tokenizer.eot_id
        at += len(a) + 1
    return ids


def prepare_arrays(data: DataConfig, tokenizer: Tokenizer | None = None,
                   print_fn: Optional[Callable[[str], None]] = None) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Read, split, tokenize: (tokenizer, train ids, val ids). Without a tokenizer one is built; it is
    trained on the whole corpus because a char vocabulary must cover the val text too. What is skipped is
    printed (data.on_bad_file=skip) or stops it (fail), as in the Ray Data prepare."""
    skipped: list[Skipped] = []
    docs = read_documents(data.source, data.max_chars, data.text_field, skipped)
    if skipped and data.on_bad_file == "fail":
        raise skipped_error(skipped)
    if skipped and print_fn:
        for s in skipped[:5]:
            print_fn(f"data: skipped {s.what}")
        print_fn(f"data: {count_skipped(skipped)} skipped")
    train_texts, val_texts = split_documents(docs, data)
    tokenizer = tokenizer or build_tokenizer(data, (d.text for d in docs))
    return tokenizer, encode_documents(train_texts, tokenizer), encode_documents(val_texts, tokenizer)

