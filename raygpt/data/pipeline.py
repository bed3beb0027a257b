"""Prepare: raw text -> tokenized Parquet shards + manifest, with Ray Data (this module imports Ray).

    prepared/<name>-<fingerprint>/
        manifest.json         tokenizer, vocab size, tokens per split, shards (rows, tokens, sha256),
                              fingerprint of sources and settings, format version
        tokenizer.json
        split=train/*.parquet rows of token ids (column `tokens`), documents joined by end-of-text, in
        split=val/*.parquet   row groups of UNIT_ROWS rows: the units training reads and shuffles

The same sources and settings reuse the folder; any change prepares anew under another fingerprint. The
folder is written under a temporary name (.NAME.tmp-HOST-PID-RANDOM: who writes it) and renamed into place
only when complete, so an interrupted prepare never leaves shards that look prepared; the next prepare in
the same prepared_dir removes the temporaries whose writer is gone. Reading, splitting and tokenizing
stream through Ray Data in batches: memory stays bounded by the object store, not by the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raygpt.config import DataConfig
from raygpt.data.corpus import check_split_sizes, no_text_error, split_text
from raygpt.data.sources import (PrepareError, Skipped, SourceFile, check_writable, count_skipped,
                                 list_sources, parse_file, record_name, skipped_error)
from raygpt.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: val rows in the sources' order (doc, chunk columns)
CHUNK_TOKENS = 4096  # tokens per Parquet row
UNIT_ROWS = 2  # rows per Parquet row group: the unit of reading and of the per-epoch shuffle (8k tokens)
ROWS_PER_FILE = 128  # 64 row groups per file, so opening a file to read one unit stays cheap
PARQUET_EXT = (".parquet",)
RECORDS = 2**24  # documents of one file (its JSON records) at most, for the order of documents
STALE_SECONDS = 24 * 3600  # another host's temporary folder untouched this long is taken as abandoned


def fingerprint(files: list[SourceFile], data: DataConfig) -> str:
    """Changes when any file (path, size, mtime) or any setting that shapes the shards changes."""
    settings = {k: v for k, v in asdict(data).items() if k not in ("prepared_dir",)}
    if settings["tokenizer_path"]:
        settings["tokenizer_sha256"] = hashlib.sha256(Path(settings["tokenizer_path"]).read_bytes()).hexdigest()
    blob = json.dumps({"version": FORMAT_VERSION, "chunk": CHUNK_TOKENS, "unit": UNIT_ROWS, "settings": settings,
                       "files": [(f.path, f.size, f.mtime) for f in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- Ray Data stages (run in tasks)


def _parse(batch: dict, text_field: str, max_chars: Optional[int], file_order: dict) -> dict:
    """Raw files -> document rows (a text file is one, a JSON record one: sources.parse_file, as the local
    loop reads them); what is skipped becomes rows with `bad` (what) and `bad_records` set. `order` is a
    document's place in the sources (file, then record), which the val split is put back into."""
    rows = {"name": [], "text": [], "bad": [], "bad_records": [], "order": []}

    def add(name: str, text: str, bad: str = "", bad_records: int = 0, order: int = 0) -> None:
        for key, value in zip(rows, (name, text, bad, bad_records, order)):
            rows[key].append(value)

    for raw, name in zip(batch["bytes"], batch["name"]):
        docs, skipped = parse_file(raw, name, text_field)
        for k, doc in enumerate(docs):
            add(doc.name, doc.text[:max_chars] if max_chars else doc.text, order=file_order[name] * RECORDS + k)
        for s in skipped:
            add(name, "", s.what, s.records)
    return {key: np.array(values, dtype=np.int64 if key in ("bad_records", "order") else object)
            for key, values in rows.items()}


def _charset(batch: dict) -> dict:
    chars = set()
    for text in batch["text"]:
        chars.update(text)
    return {"chars": np.array(["".join(sorted(chars))], dtype=object)}


def _tokenize(batch: dict, tokenizer: Tokenizer, data: DataConfig) -> dict:
    """Documents -> chunks of at most CHUNK_TOKENS ids per split, each document followed by end-of-text.
    Each chunk keeps (`doc`, `chunk`): the order of the batch's first document and its place among the
    batch's chunks, by which _put_in_order restores the sources' order."""
    per_split: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    rows = {"split": [], "tokens": [], "bad": [], "bad_records": [], "chunk": []}
    eot = np.array([tokenizer.eot_id], dtype=np.int32)
    by_order = np.argsort(batch["order"], kind="stable")
    first = int(batch["order"][by_order[0]]) if len(by_order) else 0
    for i in by_order:
        name, text, bad, bad_records = batch["name"][i], batch["text"][i], batch["bad"][i], batch["bad_records"][i]
        if bad:
            rows["split"].append("bad")
            rows["tokens"].append(np.zeros(0, dtype=np.int32))
            rows["bad"].append(bad)
            rows["bad_records"].append(int(bad_records))
            rows["chunk"].append(0)
            continue
        if not text:
            continue  # an empty file is no document (the local loop skips it too)
        for split, part in split_text(name, text, data):
            per_split[split] += [tokenizer.encode_array(part), eot]
    for split, arrays in per_split.items():
        if not arrays:
            continue
        ids = np.concatenate(arrays)
        for chunk, start in enumerate(range(0, len(ids), CHUNK_TOKENS)):
            rows["split"].append(split)
            rows["tokens"].append(ids[start:start + CHUNK_TOKENS])
            rows["bad"].append("")
            rows["bad_records"].append(0)
            rows["chunk"].append(chunk)
    # A plain list<int32> column (any Parquet reader sees token ids), built from offsets without copies.
    lengths = np.array([len(t) for t in rows["tokens"]], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows["tokens"]) if rows["tokens"] else np.zeros(0, dtype=np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))
    return pa.table({"split": rows["split"], "tokens": tokens, "n_tokens": lengths, "bad": rows["bad"],
                     "bad_records": pa.array(rows["bad_records"], type=pa.int64()),
                     "doc": pa.array([first] * len(lengths), type=pa.int64()),
                     "chunk": pa.array(rows["chunk"], type=pa.int32())})


# --------------------------------------------------------------------------- the pipeline


def _put_in_order(folder: Path) -> None:
    """Rewrite a split's shards with their rows in the sources' order (by `doc`, `chunk`) unless they are
    already. Done for val: its token stream is then the local loop's, document for document, so both paths
    evaluate on the same fixed windows. (Val is a small share of the corpus; this reads it once.)"""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return
    table = pa.concat_tables([pq.read_table(f) for f in files])
    keys = np.lexsort((table.column("chunk").to_numpy(), table.column("doc").to_numpy()))
    if np.array_equal(keys, np.arange(len(keys))):
        return
    table = table.take(pa.array(keys))
    for f in files:
        f.unlink()
    for i, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        pq.write_table(table.slice(start, ROWS_PER_FILE), folder / f"ordered-{i:06d}.parquet",
                       row_group_size=UNIT_ROWS)


def prepare(data: DataConfig, print_fn=print) -> Path:
    """Prepare data.source into tokenized shards, or reuse the ones already prepared; returns the folder."""
    fs, files = list_sources(data)
    fp = fingerprint(files, data)
    out = Path(data.prepared_dir) / f"{_slug(data.source)}-{fp}"
    remove_stale_temporaries(out.parent, print_fn)
    if (out / MANIFEST).is_file():
        print_fn(f"prepare: reusing {out} (same sources and settings)")
        return out
    check_writable(data.prepared_dir, "data.prepared_dir")
    t0 = time.perf_counter()
    total_bytes = sum(f.size for f in files)
    print_fn(f"prepare: {len(files)} files, {total_bytes / 1e6:.1f} MB from {data.source} -> {out}")
    docs = _documents(fs, files, data)
    tokenizer = _build_tokenizer(docs, data)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        ds = docs.map_batches(_tokenize, fn_kwargs={"tokenizer": tokenizer, "data": data}, batch_format="numpy",
                              batch_size=16)
        # Shards in the sources' order as far as Ray Data keeps it (it does not always: _put_in_order makes
        # sure of it for the val split).
        ds.context.execution_options.preserve_order = True
        ds.write_parquet(str(tmp.resolve()), partition_cols=["split"], row_group_size=UNIT_ROWS,
                         max_rows_per_file=ROWS_PER_FILE)
        _put_in_order(tmp / "split=val")
        manifest = _manifest(tmp, tokenizer, data, files, fp)
        skipped = manifest.pop("skipped")
        if skipped and data.on_bad_file == "fail":
            raise skipped_error(skipped)
        sizes = {s: manifest["splits"][s]["tokens"] for s in ("train", "val")}
        if not any(sizes.values()):
            raise no_text_error(data.source, skipped)
        check_split_sizes(sizes, len(files), data)
        manifest["skipped_files"] = [s.what for s in skipped]
        manifest["skipped_records"] = sum(s.records for s in skipped)
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
             f"{count_skipped(skipped)} skipped, {total_bytes / 1e6 / manifest['seconds']:.2f} MB/s")
    for line in manifest["skipped_files"][:5]:
        print_fn(f"prepare: skipped {line}")
    if len(skipped) > 5:
        print_fn(f"prepare: ... {len(skipped) - 5} more: skipped_files in {out / MANIFEST}")
    return out


# Temporary folders are named .NAME.tmp-HOST-PID-RANDOM after their writer (earlier ones .NAME.tmp-RANDOM).
_TEMP = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")


def remove_stale_temporaries(folder: Path, print_fn=print) -> list[Path]:
    """Remove what interrupted prepares (killed, their machine lost) left in ``folder``: temporary folders
    whose writer was a process of this host that is gone, and any other (another host's, or one from before
    writers were named) that nothing has changed for STALE_SECONDS. A live writer's folder stays. (Hosts
    are told apart by name: two machines with one host name sharing a prepared_dir would confuse this.)"""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for path in sorted(folder.glob(".*.tmp-*")):
        m = _TEMP.match(path.name)
        if m is None or not path.is_dir():
            continue
        if m["host"] == host:
            if _alive(int(m["pid"])):
                continue
            why = f"pid {m['pid']}"
        else:
            idle = time.time() - _last_change(path)
            if idle < STALE_SECONDS:
                continue
            why = (f"pid {m['pid']} on {m['host']}, " if m["host"] else "") + f"untouched for {idle / 3600:.0f} h"
        shutil.rmtree(path, ignore_errors=True)
        print_fn(f"prepare: removed {path} left by an interrupted prepare ({why})")
        removed.append(path)
    return removed


def _last_change(folder: Path) -> float:
    """The newest mtime of the folder and everything in it."""
    newest = 0.0
    for d, _, names in os.walk(folder):
        for name in [".", *names]:
            try:
                newest = max(newest, os.stat(os.path.join(d, name)).st_mtime)
            except FileNotFoundError:
                return time.time()  # changing right now
    return newest


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return True


def _documents(fs: pafs.FileSystem, files: list[SourceFile], data: DataConfig):
    """A Ray Dataset of {name, text, bad, bad_records} rows over every kind of source file."""
    import ray

    # Text and JSON files are read whole as bytes and parsed by sources.parse_file (as the local loop reads
    # them): a JSON line that is not valid, or a record without the text field, is counted and reported,
    # not dropped without a word as a JSON reader would.
    raw_files = [f.path for f in files if not f.path.endswith(PARQUET_EXT)]
    names = {f.path: f.name for f in files}
    parts = []
    if raw_files:
        raw = ray.data.read_binary_files(raw_files, filesystem=fs, include_paths=True)
        raw = raw.map_batches(lambda b: {"bytes": b["bytes"], "name": np.array(
            [names.get(p, names.get("/" + p, p)) for p in b["path"]], dtype=object)}, batch_format="numpy")
        file_order = {f.name: i for i, f in enumerate(files)}
        parts.append(raw.map_batches(_parse, fn_kwargs={"text_field": data.text_field, "max_chars": data.max_chars,
                                                        "file_order": file_order},
                                     batch_format="numpy"))
    parquet = [f.path for f in files if f.path.endswith(PARQUET_EXT)]
    if parquet:
        ds = ray.data.read_parquet(parquet, filesystem=fs)
        parts.append(ds.map_batches(_records, fn_kwargs={"field": data.text_field}, batch_format="pyarrow"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _records(table, field: str) -> dict:
    """Parquet rows -> {name, text, bad, bad_records, order}; a document's name is a hash of its text (no path)."""
    if field not in table.column_names:
        raise PrepareError(f"no field {field!r} in the records (fields: {', '.join(table.column_names)}); "
                           f"set data.text_field")
    texts = [t or "" for t in table.column(field).to_pylist()]
    return {"name": np.array([record_name(t) for t in texts], dtype=object), "text": np.array(texts, dtype=object),
            "bad": np.array([""] * len(texts), dtype=object), "bad_records": np.zeros(len(texts), dtype=np.int64),
            # Parquet rows come after the text and JSON files, in the order Ray Data reads them.
            "order": np.full(len(texts), 2**62, dtype=np.int64)}


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
    splits, skipped = {}, []
    for split in ("train", "val", "bad"):
        shards = []
        for f in sorted((tmp / f"split={split}").glob("*.parquet")):
            if split == "bad":
                t = pq.read_table(f, columns=["bad", "bad_records"]).to_pydict()
                skipped += [Skipped(what, n) for what, n in zip(t["bad"], t["bad_records"]) if what]
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
            "splits": splits, "skipped": sorted(skipped, key=lambda s: s.what)}


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


@dataclass
class Units:
    """A split's units (Parquet row groups), numbered in the order of the split's token stream: the shard
    files and each unit's token count. Small (a path per file, a number per unit), so it travels to every
    worker and read task; a unit's place (file, row group) is computed, not listed."""
    paths: list[str]  # absolute shard paths, in stream order
    first: np.ndarray  # the number of each shard's first unit, and the total at the end
    tokens: np.ndarray  # tokens of each unit

    def __len__(self) -> int:
        return len(self.tokens)

    def locate(self, unit: int) -> tuple[str, int]:
        """(shard path, row group) of a unit."""
        shard = int(np.searchsorted(self.first, unit, side="right")) - 1
        return self.paths[shard], int(unit - self.first[shard])


def split_units(folder: str | Path, split: str) -> Units:
    """Every unit (Parquet row group) of a split, in order."""
    folder = Path(folder).resolve()
    shards = load_manifest(folder)["splits"][split]["shards"]
    counts = [len(s["units"]) for s in shards]
    return Units([str(folder / s["path"]) for s in shards], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                 np.array([t for s in shards for t in s["units"]], dtype=np.int64))


def read_units(units: Units, ids, head: int = 0) -> list[np.ndarray]:
    """The token ids of each unit in ``ids`` (its rows concatenated), followed by the first ``head`` tokens
    of the unit after it in the stream, if there is one."""
    files: dict[str, pq.ParquetFile] = {}

    def tokens(unit: int) -> np.ndarray:
        path, group = units.locate(unit)
        pf = files.get(path) or files.setdefault(path, pq.ParquetFile(path))
        return pa.compute.list_flatten(pf.read_row_group(group, columns=["tokens"]).column("tokens")).to_numpy()

    out = []
    for unit in ids:
        own = tokens(int(unit))
        if head and unit + 1 < len(units):
            own = np.concatenate([own, tokens(int(unit) + 1)[:head]])
        out.append(own)
    return out


def prepared_tokenizer(folder: str | Path) -> Tokenizer:
    return load_tokenizer(Path(folder) / "tokenizer.json")


def _slug(source: str) -> str:
    name = os.path.basename(source.split(",")[0].rstrip("/")) or "corpus"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
