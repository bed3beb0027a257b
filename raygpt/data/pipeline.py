"""Prepare: raw text -> tokenized Parquet shards + manifest, in Ray tasks (this module imports Ray).

    prepared/<name>-<fingerprint>/
        manifest.json         tokenizer, vocab size, tokens per split, shards (rows, tokens, sha256),
                              fingerprint of sources and settings, format version
        tokenizer.json
        split=train/*.parquet rows of token ids (column `tokens`), documents joined by end-of-text, in
        split=val/*.parquet   row groups of UNIT_ROWS rows: the units training reads and shuffles

The same sources and settings reuse the folder; any change prepares anew under another fingerprint. The
folder is written under a temporary name (.NAME.tmp-HOST-PID-RANDOM: who writes it) and renamed into place
only when complete, so an interrupted prepare never leaves shards that look prepared; the next prepare in
the same prepared_dir removes the temporaries whose writer is gone.

The files are dealt, in the sources' order, into groups of about GROUP_BYTES, and one Ray task (1 CPU) per
group reads its files, splits and tokenizes its documents and writes its own shards, named after the group:
the shards in name order hold the sources' order. Tasks get file lists and give back what the manifest
lists of their shards (paths, token counts, sha256); no text or token id crosses the object store, so
memory stays bounded by the tasks running (a group, or one file larger than that), not by the corpus.
Big batches, not rows, are the unit of work: bytes and char spend their time in C (bytes.translate, numpy
lookups, Parquet encoding), BPE in HF's encode_batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raygpt.config import ConfigError, DataConfig
from raygpt.data.corpus import build_tokenizer, check_split_sizes, encode_documents, no_text_error, split_text
from raygpt.data.sources import (Document, PrepareError, Skipped, SourceFile, check_writable, count_skipped,
                                 list_sources, parse_file, read_file, record_name, skipped_error)
from raygpt.tokenizer import Tokenizer, characters, load_tokenizer, tokenizer_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: val rows in the sources' order (doc, chunk columns)
CHUNK_TOKENS = 4096  # tokens per Parquet row
UNIT_ROWS = 2  # rows per Parquet row group: the unit of reading and of the per-epoch shuffle (8k tokens)
ROWS_PER_FILE = 128  # 64 row groups per file, so opening a file to read one unit stays cheap
PARQUET_EXT = (".parquet",)
RECORDS = 2**24  # documents of one file (its JSON records) at most, for the order of documents
STALE_SECONDS = 24 * 3600  # another host's temporary folder untouched this long is taken as abandoned
GROUP_BYTES = 8 << 20  # source bytes per prepare task: tens of tasks for 2 cores at 200 MB, little idle at the end
ENCODE_CHARS = 8 << 20  # a task tokenizes and writes what it read every this many characters (a big file)
# A BPE tokenizer trains on a seeded sample of whole files, about this many bytes (all of a smaller corpus):
# training on all of a big corpus would cost more than tokenizing it. On 8.6 MB of held-out Python (installed
# packages' sources) a 16 MB sample took 1.1% more tokens than training on 64 MB did, 2 MB 3.3% (a 4096
# vocabulary; bench/prepare_speed.py --bpe-sample-cost, bench/RESULTS.md).
BPE_SAMPLE_BYTES = 16 << 20
BPE_SAMPLE_SEED = 0
# Token ids dictionary-encoded (bit-packed: about a byte a token for bytes and char), no compression on top,
# no statistics: some 70% of the CPU time of pyarrow's defaults (snappy and dictionaries on every column,
# statistics), for files up to a sixth bigger. (Per file, most of the time goes to its 64 row groups x 6
# columns, not to the ids.)
WRITE_OPTIONS = dict(row_group_size=UNIT_ROWS, use_dictionary=["tokens.list.element"], compression="none",
                     write_statistics=False)


def fingerprint(files: list[SourceFile], data: DataConfig) -> str:
    """Changes when any file (path, size, mtime) or any setting that shapes the shards changes."""
    settings = {k: v for k, v in asdict(data).items() if k not in ("prepared_dir",)}
    if settings["tokenizer_path"]:
        path = tokenizer_file(settings["tokenizer_path"])
        if not path.is_file():
            raise ConfigError(f"data.tokenizer_path={settings['tokenizer_path']}: no such file; give a tokenizer.json "
                              "(raygpt's or Hugging Face tokenizers') or a folder holding one")
        settings["tokenizer_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    elif data.tokenizer == "bpe":
        settings["bpe_sample"] = [BPE_SAMPLE_BYTES, BPE_SAMPLE_SEED]
    blob = json.dumps({"version": FORMAT_VERSION, "chunk": CHUNK_TOKENS, "unit": UNIT_ROWS, "settings": settings,
                       "files": [(f.path, f.size, f.mtime) for f in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the pipeline


def prepare(data: DataConfig, print_fn=print) -> Path:
    """Prepare data.source into tokenized shards, or reuse the ones already prepared; returns the folder."""
    fs, files = list_sources(data)
    fp = fingerprint(files, data)
    out = Path(data.prepared_dir) / f"{_slug(data.source)}-{fp}"
    remove_stale_temporaries(out.parent, print_fn)
    if (out / MANIFEST).is_file():
        print_fn(f"prepare: reusing {out} (same sources and settings)")
        return out
    _check_parquet(fs, files, data.text_field)
    check_writable(data.prepared_dir, "data.prepared_dir")
    t0 = time.perf_counter()
    total_bytes = sum(f.size for f in files)
    print_fn(f"prepare: {len(files)} files, {total_bytes / 1e6:.1f} MB from {data.source} -> {out}")
    # Text and JSON files in the sources' order, then the Parquet files (whose records have no path).
    ordered = sorted(files, key=lambda f: f.path.endswith(PARQUET_EXT))
    groups = _groups(ordered)
    tokenizer = _build_tokenizer(fs, ordered, groups, data)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split in ("train", "val"):  # here, not in the tasks: a task never re-creates a removed folder
            (tmp / f"split={split}").mkdir(parents=True)
        width = len(str(len(groups)))
        results = _run(_write_group, [(fs, [ordered[i] for i in g], g[0] * RECORDS, f"{n:0{width}d}")
                                      for n, g in enumerate(groups)],
                       tokenizer=tokenizer, data=data, root=str(tmp.resolve()))
        manifest = _manifest(results, tokenizer, data, files, fp)
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
             f"{count_skipped(skipped)} skipped, {total_bytes / 1e6 / max(manifest['seconds'], 0.01):.2f} MB/s")
    for line in manifest["skipped_files"][:5]:
        print_fn(f"prepare: skipped {line}")
    if len(skipped) > 5:
        print_fn(f"prepare: ... {len(skipped) - 5} more: skipped_files in {out / MANIFEST}")
    return out


def _groups(files: list[SourceFile]) -> list[list[int]]:
    """The files' indices dealt in order into groups of about GROUP_BYTES (a bigger file is one on its own)."""
    groups: list[list[int]] = []
    size = 0
    for i, f in enumerate(files):
        if not groups or (size and size + f.size > GROUP_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += f.size
    return groups


def _run(fn, calls: list[tuple], **shared) -> list:
    """``fn(*call, **shared)`` for every call, each in a Ray task of 1 CPU; the results in order. ``shared``
    goes to the object store once. The first task that fails stops the others; a user mistake it raises
    (PrepareError, ValueError) comes back as itself, one line, not inside Ray's traceback."""
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    refs = {k: ray.put(v) for k, v in shared.items()}
    pending = [remote.remote(*call, **refs) for call in calls]
    done = list(pending)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        return ray.get(done)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):
            raise e.cause from None
        raise
    finally:
        for ref in pending:  # a failure or an interrupt: stop what still runs before the caller cleans up
            ray.cancel(ref)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=30)


def _check_parquet(fs: pafs.FileSystem, files: list[SourceFile], field: str) -> None:
    """Every Parquet source has a text column ``field``: checked from the footers before any work."""
    for f in files:
        if not f.path.endswith(PARQUET_EXT):
            continue
        try:
            schema = pq.read_schema(f.path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(f"{f.name}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                               f"fix or remove it") from None
        if field not in schema.names:
            raise PrepareError(f"{f.name}: no field {field!r} in the records (fields: {', '.join(schema.names)}); "
                               f"set data.text_field")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{f.name}: field {field!r} holds {kind}, not text; set data.text_field")


def _read(fs: pafs.FileSystem, files: list[SourceFile], data: DataConfig, skipped: list[Skipped]) -> Iterator[Document]:
    """The documents of ``files`` in order, each cut to data.max_chars: a text file is one, a JSON record one
    (sources.parse_file, as the local loop reads them), a Parquet row one (named by a hash of its text).
    What is left out goes to ``skipped``."""
    for f in files:
        if f.path.endswith(PARQUET_EXT):
            docs: Iterator[Document] | list[Document] = _parquet_documents(fs, f.path, data.text_field)
        else:
            docs, left_out = parse_file(read_file(fs, f.path), f.name, data.text_field)
            skipped += left_out
        for doc in docs:
            yield Document(doc.name, doc.text[:data.max_chars]) if data.max_chars else doc


def _parquet_documents(fs: pafs.FileSystem, path: str, field: str) -> Iterator[Document]:
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text:
                    yield Document(record_name(text), text)


def _build_tokenizer(fs: pafs.FileSystem, files: list[SourceFile], groups: list[list[int]],
                     data: DataConfig) -> Tokenizer:
    if data.tokenizer_path or data.tokenizer == "bytes":
        return build_tokenizer(data, [])
    if data.tokenizer == "char":
        # A pass of its own, in parallel, before the one that writes: the vocabulary must cover every split.
        return build_tokenizer(data, _run(_characters, [(fs, [files[i] for i in g]) for g in groups], data=data))
    return _run(_train_bpe, [(fs, _bpe_sample(files))], data=data)[0]


def _characters(fs: pafs.FileSystem, files: list[SourceFile], data: DataConfig) -> str:
    """Ray task: the characters of a group's documents."""
    return "".join(sorted(characters(doc.text for doc in _read(fs, files, data, []))))


def _bpe_sample(files: list[SourceFile]) -> list[SourceFile]:
    """Whole files, in a seeded random choice, until BPE_SAMPLE_BYTES (all of a smaller corpus); in order."""
    order = list(range(len(files)))
    random.Random(BPE_SAMPLE_SEED).shuffle(order)
    chosen, size = [], 0
    for i in order:
        if size >= BPE_SAMPLE_BYTES:
            break
        chosen.append(i)
        size += files[i].size
    return [files[i] for i in sorted(chosen)]


def _train_bpe(fs: pafs.FileSystem, files: list[SourceFile], data: DataConfig) -> Tokenizer:
    """Ray task: a BPE tokenizer trained on the documents of ``files``, BPE_SAMPLE_BYTES characters of them at
    most (a sampled file can be big). HF counts words as the texts stream in; the sample is never held whole."""
    def texts() -> Iterator[str]:
        left = BPE_SAMPLE_BYTES
        for doc in _read(fs, files, data, []):
            if left <= 0:
                return
            if doc.text:
                yield doc.text[:left]
                left -= len(doc.text)

    return build_tokenizer(data, texts())


def _write_group(fs: pafs.FileSystem, files: list[SourceFile], doc: int, name: str, tokenizer: Tokenizer,
                 data: DataConfig, root: str) -> dict:
    """Ray task: a group's documents -> its shards in each split (documents joined by end-of-text); returns
    {"shards": {split: [what the manifest lists of each shard]}, "skipped": [Skipped]}. ``doc`` is the order
    of the group's first document (column `doc`: every row of the group, by which rows sort into the
    sources' order with `chunk`, their place in the group)."""
    skipped: list[Skipped] = []
    shards = {split: _Shards(Path(root), split, name, doc) for split in ("train", "val")}
    texts: dict[str, list[str]] = {"train": [], "val": []}
    held = 0
    for document in _read(fs, files, data, skipped):
        for split, part in split_text(document.name, document.text, data):
            texts[split].append(part)
            held += len(part)
        if held >= ENCODE_CHARS:
            for split, parts in texts.items():
                shards[split].add(encode_documents(parts, tokenizer))
                parts.clear()
            held = 0
    for split, parts in texts.items():
        shards[split].add(encode_documents(parts, tokenizer))
    return {"shards": {split: s.close() for split, s in shards.items()}, "skipped": skipped}


class _Shards:
    """One split's shards of one group: token ids in, Parquet files of ROWS_PER_FILE rows of CHUNK_TOKENS
    out (the group's last row and file shorter), each described as the manifest lists it."""

    def __init__(self, root: Path, split: str, group: str, doc: int):
        self.root, self.split, self.group, self.doc = root, split, group, doc
        self.held: list[np.ndarray] = []
        self.count = 0  # tokens held
        self.rows = 0  # rows written
        self.written: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self.held.append(ids)
            self.count += len(ids)
        if self.count >= ROWS_PER_FILE * CHUNK_TOKENS:
            self._flush(last=False)

    def close(self) -> list[dict]:
        if self.count:
            self._flush(last=True)
        return self.written

    def _flush(self, last: bool) -> None:
        per_file = ROWS_PER_FILE * CHUNK_TOKENS
        ids = np.concatenate(self.held) if len(self.held) > 1 else self.held[0]
        end = len(ids) if last else len(ids) // per_file * per_file
        for start in range(0, end, per_file):
            self._write(ids[start:min(start + per_file, end)])
        rest = ids[end:]
        self.held, self.count = ([rest.copy()] if len(rest) else []), len(rest)

    def _write(self, ids: np.ndarray) -> None:
        rows = -(-len(ids) // CHUNK_TOKENS)
        offsets = np.minimum(np.arange(rows + 1) * CHUNK_TOKENS, len(ids)).astype(np.int32)
        lengths = np.diff(offsets)
        # A plain list<int32> column (any Parquet reader sees token ids), built from offsets without copies;
        # the other columns are as format 3 has them (bad, bad_records: always empty in train and val).
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, type=pa.int32())),
                          "n_tokens": lengths, "bad": pa.array([""] * rows, type=pa.string()),
                          "bad_records": np.zeros(rows, dtype=np.int64), "doc": np.full(rows, self.doc, dtype=np.int64),
                          "chunk": np.arange(self.rows, self.rows + rows, dtype=np.int32)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **WRITE_OPTIONS)
        body = sink.getvalue()
        path = f"split={self.split}/{self.group}-{len(self.written):05d}.parquet"
        with open(self.root / path, "wb") as f:  # not "x": a retried task writes the same files again
            f.write(body)
        self.written.append({"path": path, "rows": rows, "tokens": len(ids),
                             "units": np.add.reduceat(lengths, np.arange(0, rows, UNIT_ROWS)).tolist(),
                             "sha256": hashlib.sha256(body).hexdigest()})
        self.rows += rows


def _manifest(results: list[dict], tokenizer: Tokenizer, data: DataConfig, files: list[SourceFile], fp: str) -> dict:
    splits = {}
    for split in ("train", "val"):
        shards = [shard for r in results for shard in r["shards"][split]]  # group order: the sources' order
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    skipped = [s for r in results for s in r["skipped"]]
    return {"format": "raygpt-prepared", "format_version": FORMAT_VERSION, "fingerprint": fp,
            "source": data.source, "files": len(files), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "settings": asdict(data),
            "splits": splits, "skipped": sorted(skipped, key=lambda s: s.what)}


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
