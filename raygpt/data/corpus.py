"""Corpora as documents: named sources, local paths, the train/val split, and tokenizing to arrays.

Pure Python + numpy: the local loop uses it directly and the Ray Data pipeline reuses its naming,
splitting and joining rules, so a split is the same whichever path prepared it.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from raygpt.config import DataConfig
from raygpt.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# Folders of the standard library that are test suites or installed packages, not the library itself.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Document:
    name: str  # stable identity (relative path): the train/val split hashes it
    text: str


def stdlib_files() -> list[Path]:
    """The running Python's standard library .py sources (about 800 files, 12 MB): the embedded
    default corpus, present wherever Python is, no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def tinyshakespeare_files() -> list[Path]:
    """Tiny Shakespeare (1.1 MB), downloaded once from its canonical address, sha256-checked and cached
    in ~/.cache/raygpt. Offline, give the file itself as data.source=path/to/input.txt."""
    cache = Path(os.environ.get("RAYGPT_CACHE", Path.home() / ".cache" / "raygpt")) / "tinyshakespeare.txt"
    if not cache.is_file():
        import hashlib
        import urllib.request

        try:
            body = urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60).read()
        except OSError as e:
            raise FileNotFoundError(f"data.source=tinyshakespeare: cannot download {TINYSHAKESPEARE_URL} ({e}); "
                                    f"give a local copy as data.source=path/to/input.txt") from None
        if hashlib.sha256(body).hexdigest() != TINYSHAKESPEARE_SHA256:
            raise ValueError(f"{TINYSHAKESPEARE_URL} did not match its expected sha256; not cached")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.rename(cache)  # atomic: a half download is never taken for the corpus
    return [cache]


NAMED_SOURCES = {"python-stdlib": stdlib_files, "tinyshakespeare": tinyshakespeare_files}


def source_files(source: str) -> tuple[Path, list[Path]]:
    """(root, files) for a named corpus, a file, a folder (recursive) or a glob. Names are relative to root."""
    if source in NAMED_SOURCES:
        files = NAMED_SOURCES[source]()
        root = Path(sysconfig.get_paths()["stdlib"]) if source == "python-stdlib" else files[0].parent
        return root, files
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        return path, files
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
    if matches:
        return Path(os.path.commonpath([str(m.parent) for m in matches])), matches
    raise FileNotFoundError(f"data.source={source!r} is not a named corpus ({', '.join(NAMED_SOURCES)}), "
                            f"an existing file or folder, or a glob that matches files")


def read_documents(source: str, max_chars: int | None = None) -> list[Document]:
    """UTF-8 text documents of a source, in a stable order; at most ``max_chars`` characters in all."""
    root, files = source_files(source)
    docs, total, bad = [], 0, []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            bad.append(str(f))
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[:max_chars - total]
        if text:
            docs.append(Document(str(f.relative_to(root)), text))
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

