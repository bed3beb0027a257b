"""Prepare: raw text -> tokenized Parquet shards + manifest, with Ray Data (this module imports Ray).

    prepared/<name>-<fingerprint>/
        manifest.json         tokenizer, vocab size, tokens per split, shards (rows, tokens, sha256),
                              fingerprint of sources and settings, format version
        tokenizer.json
        split=train/*.parquet rows of token ids (column `tokens`), documents joined by end-of-text, in
        split=val/*.parquet   row groups of UNIT_ROWS rows: the units training reads and shuffles

The same sources and settings reuse the folder; any change prepares anew under another fingerprint. The
folder is written under a temporary name and renamed into place only when complete, so an interrupted
prepare never leaves shards that look prepared. Reading, splitting and tokenizing stream through Ray
Data in batches: memory stays bounded by the object store, not by the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raygpt.config import DataConfig
from raygpt.data.corpus import check_split_sizes, split_text
from raygpt.data.sources import PrepareError, SourceFile, decode_file, list_sources
from raygpt.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
CHUNK_TOKENS = 4096  # tokens per Parquet row
UNIT_ROWS = 2  # rows per Parquet row group: the unit of reading and of the per-epoch shuffle (8k tokens)
ROWS_PER_FILE = 128  # 64 row groups per file, so opening a file to read one unit stays cheap
JSON_EXT, PARQUET_EXT = (".jsonl", ".json"), (".parquet",)


def fingerprint(files: list[SourceFile], data: DataConfig) -> str:
    """Changes when any file (path, size, mtime) or any setting that shapes the shards changes."""
    settings = {k: v for k, v in asdict(data).items() if k not in ("prepared_dir",)}
    if settings["tokenizer_path"]:
        settings["tokenizer_sha256"] = hashlib.sha256(Path(settings["tokenizer_path"]).read_bytes()).hexdigest()
    blob = json.dumps({"version": FORMAT_VERSION, "chunk": CHUNK_TOKENS, "unit": UNIT_ROWS, "settings": settings,
                       "files": [(f.path, f.size, f.mtime) for f in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- Ray Data stages (run in tasks)


def _decode(batch: dict, max_chars: Optional[int]) -> dict:
    """Raw bytes -> text rows; files that are not UTF-8 or look binary become rows with `bad` set."""
    names, texts, bad = [], [], []
    for raw, name in zip(batch["bytes"], batch["name"]):
        text, reason = decode_file(raw)
        names.append(name)
        texts.append(text[:max_chars] if max_chars else text)
        bad.append(reason)
    return {"name": np.array(names, dtype=object), "text": np.array(texts, dtype=object),
            "bad": np.array(bad, dtype=object)}


def _charset(batch: dict) -> dict:
    chars = set()
    for text in batch["text"]:
        chars.update(text)
    return {"chars": np.array(["".join(sorted(chars))], dtype=object)}


def _tokenize(batch: dict, tokenizer: Tokenizer, data: DataConfig) -> dict:
    """Documents -> chunks of at most CHUNK_TOKENS ids per split, each document followed by end-of-text."""
    per_split: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    rows = {"split": [], "tokens": [], "bad": []}
    eot = np.array([tokenizer.eot_id], dtype=np.int32)
    for name, text, bad in zip(batch["name"], batch["text"], batch["bad"]):
        if bad:
            rows["split"].append("bad")
            rows["tokens"].append(np.zeros(0, dtype=np.int32))
            rows["bad"].append(f"{name}: {bad}")
            continue
        if not text:
            continue  # an empty file is no document (the local loop skips it too)
        for split, part in split_text(name, text, data):
            per_split[split] += [tokenizer.encode_array(part), eot]
    for split, arrays in per_split.items():
        if not arrays:
            continue
        ids = np.concatenate(arrays)
        for start in range(0, len(ids), CHUNK_TOKENS):
            rows["split"].append(split)
            rows["tokens"].append(ids[start:start + CHUNK_TOKENS])
            rows["bad"].append("")
    # A plain list<int32> column (any Parquet reader sees token ids), built from offsets without copies.
    lengths = np.array([len(t) for t in rows["tokens"]], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows["tokens"]) if rows["tokens"] else np.zeros(0, dtype=np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))
    return pa.table({"split": rows["split"], "tokens": tokens, "n_tokens": lengths, "bad": rows["bad"]})


# --------------------------------------------------------------------------- the pipeline


def prepare(data: DataConfig, print_fn=print) -> Path:
    """Prepare data.source into tokenized shards, or reuse the ones already prepared; returns the folder."""
    fs, files = list_sources(data)
    fp = fingerprint(files, data)
    out = Path(data.prepared_dir) / f"{_slug(data.source)}-{fp}"
    if (out / MANIFEST).is_file():
        print_fn(f"prepare: reusing {out} (same sources and settings)")
        return out
    t0 = time.perf_counter()
    total_bytes = sum(f.size for f in files)
    print_fn(f"prepare: {len(files)} files, {total_bytes / 1e6:.1f} MB from {data.source} -> {out}")
    docs = _documents(fs, files, data)
    tokenizer = _build_tokenizer(docs, data)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ds = docs.map_batches(_tokenize, fn_kwargs={"tokenizer": tokenizer, "data": data}, batch_format="numpy",
                              batch_size=16)
        ds.write_parquet(str(tmp.resolve()), partition_cols=["split"], row_group_size=UNIT_ROWS,
                         max_rows_per_file=ROWS_PER_FILE)
        manifest = _manifest(tmp, tokenizer, data, files, fp)
        bad = manifest.pop("bad_files")
        if bad and data.on_bad_file == "fail":
            raise PrepareError(f"{len(bad)} files are not UTF-8 text: {'; '.join(bad[:5])}"
                               f"{' ...' if len(bad) > 5 else ''}; remove them or set data.on_bad_file=skip")
        check_split_sizes({s: manifest["splits"][s]["tokens"] for s in ("train", "val")}, len(files), data)
        manifest["skipped_files"] = bad
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        tokenizer.save(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means complete
        if out.exists():  # a concurrent prepare of the same fingerprint finished first: keep that one
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s = manifest["splits"]
    print_fn(f"prepare: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, {tokenizer!r}, "
             f"{len(bad)} files skipped, {total_bytes / 1e6 / manifest['seconds']:.2f} MB/s")
    for line in bad[:5]:
        print_fn(f"prepare: skipped {line}")
    return out


def _documents(fs: pafs.FileSystem, files: list[SourceFile], data: DataConfig):
    """A Ray Dataset of {name, text, bad} rows over every kind of source file."""
    import ray

    text_files = [f for f in files if not f.path.endswith(JSON_EXT + PARQUET_EXT)]
    names = {f.path: f.name for f in files}
    parts = []
    if text_files:
        raw = ray.data.read_binary_files([f.path for f in text_files], filesystem=fs, include_paths=True)
        raw = raw.map_batches(lambda b: {"bytes": b["bytes"], "name": np.array(
            [names.get(p, names.get("/" + p, p)) for p in b["path"]], dtype=object)}, batch_format="numpy")
        parts.append(raw.map_batches(_decode, fn_kwargs={"max_chars": data.max_chars}, batch_format="numpy"))
    for ext, reader in ((JSON_EXT, ray.data.read_json), (PARQUET_EXT, ray.data.read_parquet)):
        paths = [f.path for f in files if f.path.endswith(ext)]
        if paths:
            # read_json reads newline-delimited records (pyarrow's JSON reader) on any filesystem.
            ds = reader(paths, filesystem=fs)
            parts.append(ds.map_batches(_records, fn_kwargs={"field": data.text_field}, batch_format="pyarrow"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _records(table, field: str) -> dict:
    """JSONL / Parquet rows -> {name, text, bad}; a document's name is a hash of its text (no path)."""
    if field not in table.column_names:
        raise PrepareError(f"no field {field!r} in the records (fields: {', '.join(table.column_names)}); "
                           f"set data.text_field")
    texts = [t or "" for t in table.column(field).to_pylist()]
    names = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
    return {"name": np.array(names, dtype=object), "text": np.array(texts, dtype=object),
            "bad": np.array([""] * len(texts), dtype=object)}


def _build_tokenizer(docs, data: DataConfig) -> Tokenizer:
    from raygpt.data.corpus import build_tokenizer

    if data.tokenizer_path or data.tokenizer == "bytes":
        return build_tokenizer(data, [])
    if data.tokenizer == "char":
        # One pass in parallel: each batch's characters, unioned here (the vocabulary must cover val too).
        sets = docs.map_batches(_charset, batch_format="numpy").take_all()
        chars = set().union(*(row["chars"] for row in sets))
        return build_tokenizer(data, ["".join(sorted(chars))])
    # BPE trains on the driver from a stream of documents: HF keeps word counts, not the corpus.
    return build_tokenizer(data, (row["text"] for row in docs.iter_rows() if row["text"]))


def _manifest(tmp: Path, tokenizer: Tokenizer, data: DataConfig, files: list[SourceFile], fp: str) -> dict:
    splits, bad = {}, []
    for split in ("train", "val", "bad"):
        shards = []
        for f in sorted((tmp / f"split={split}").glob("*.parquet")):
            if split == "bad":
                bad += [b for b in pq.read_table(f, columns=["bad"]).column("bad").to_pylist() if b]
                continue
            pf = pq.ParquetFile(f)
            units = [int(pa.compute.sum(pf.read_row_group(g, columns=["n_tokens"]).column(0)).as_py() or 0)
                     for g in range(pf.num_row_groups)]
            shards.append({"path": str(f.relative_to(tmp)), "rows": pf.metadata.num_rows, "tokens": sum(units),
                           "units": units, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
        if split != "bad":
            splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    shutil.rmtree(tmp / "split=bad", ignore_errors=True)
    return {"format": "raygpt-prepared", "format_version": FORMAT_VERSION, "fingerprint": fp,
            "source": data.source, "files": len(files), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "settings": asdict(data),
            "splits": splits, "bad_files": bad}


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise PrepareError(f"{folder} has no {MANIFEST}: not prepared (or interrupted); run raygpt prepare") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepareError(f"{folder} was prepared with format version {manifest.get('format_version')}; "
                           f"prepare it again")
    return manifest


def shard_paths(folder: str | Path, split: str) -> list[str]:
    folder = Path(folder).resolve()
    return [str(folder / s["path"]) for s in load_manifest(folder)["splits"][split]["shards"]]


def split_units(folder: str | Path, split: str) -> list[tuple[str, int, int]]:
    """Every unit (Parquet row group) of a split as (absolute shard path, row group, tokens), in order."""
    folder = Path(folder).resolve()
    return [(str(folder / s["path"]), group, tokens) for s in load_manifest(folder)["splits"][split]["shards"]
            for group, tokens in enumerate(s["units"])]


def read_units(units: list[tuple[str, int]]) -> list[np.ndarray]:
    """The token ids of each (shard path, row group), each unit's rows concatenated."""
    files: dict[str, pq.ParquetFile] = {}
    out = []
    for path, group in units:
        pf = files.get(path) or files.setdefault(path, pq.ParquetFile(path))
        column = pf.read_row_group(group, columns=["tokens"]).column("tokens")
        out.append(pa.compute.list_flatten(column).to_numpy())
    return out


def prepared_tokenizer(folder: str | Path) -> Tokenizer:
    return load_tokenizer(Path(folder) / "tokenizer.json")


def _slug(source: str) -> str:
    name = os.path.basename(source.split(",")[0].rstrip("/")) or "corpus"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
