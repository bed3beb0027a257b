"""Where documents come from: named corpora, listing and reading files on any pyarrow filesystem, parsing
a file into documents, and checking that a place to write to can be written.

Shared by the local loop (raygpt.data.corpus) and the Ray Data pipeline (raygpt.data.pipeline), so both
accept the same sources, skip the same files and records and name documents the same way (the train/val
split hashes the names). pyarrow, no Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raygpt.config import ConfigError, DataConfig

# Folders of the standard library that are test suites or installed packages, not the library itself.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}



class PrepareError(ValueError):
    """Data input that cannot be read or prepared; the message names it and says what to do."""


@dataclass
class Document:
    name: str  # stable identity (a file's relative path, a record's text hash): the train/val split hashes it
    text: str


@dataclass
class Skipped:
    """Input left out of a prepare: a whole file, a record, or a file's bad records summed up."""
    what: str  # "image.bin: binary ...", "data.jsonl line 3: not valid JSON ...", "data.jsonl: 120 records ..."
    records: int  # the bad records it stands for (0: a whole file)


@dataclass
class SourceFile:
    path: str  # as the filesystem names it
    name: str  # relative to its source root: the train/val split hashes it
    size: int
    mtime: float


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


def list_sources(data: DataConfig) -> tuple[pafs.FileSystem, list[SourceFile]]:
    """Files of data.source (comma-separated for several): named corpora, files, folders, globs, on any
    pyarrow filesystem (s3://, gs://, file://, local paths). Every source must exist."""
    fs_seen, files = None, []
    for source in [s.strip() for s in data.source.split(",") if s.strip()]:
        fs, listed = _list_one(source)
        if fs_seen is not None and type(fs) is not type(fs_seen):
            raise PrepareError("data.source mixes filesystems; prepare one filesystem at a time")
        fs_seen = fs
        files.extend(listed)
    if not files:
        raise PrepareError(f"data.source={data.source!r} holds no files")
    if data.max_chars is not None:  # a size cap, counted in file bytes (the text is read later)
        kept, total = [], 0
        for f in files:
            if total >= data.max_chars:
                break
            kept.append(f)
            total += f.size
        files = kept
    return fs_seen, files


def _list_one(source: str) -> tuple[pafs.FileSystem, list[SourceFile]]:
    if source in NAMED_SOURCES:
        local = NAMED_SOURCES[source]()
        root = os.path.commonpath([str(p.parent) for p in local])
        fs = pafs.LocalFileSystem()
        return fs, [_info_to_file(i, root) for i in fs.get_file_info([str(p) for p in local])]
    fs, path = filesystem_of(os.path.expanduser(source))
    if any(c in path for c in "*?["):
        base = path[:min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "/"
        infos = [i for i in _walk(fs, base, source) if fnmatch.fnmatch(i.path, path)]
        if not infos:
            raise PrepareError(f"data.source={source!r}: the glob matches no files")
        return fs, [_info_to_file(i, base) for i in infos]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise PrepareError(f"data.source={source!r} does not exist (not a named corpus: "
                           f"{', '.join(NAMED_SOURCES)}); give a file, a folder, a glob or a URI")
    if info.type == pafs.FileType.File:
        return fs, [_info_to_file(info, os.path.dirname(info.path))]
    infos = _walk(fs, path, source)
    if not infos:
        raise PrepareError(f"data.source={source!r} is an empty folder")
    return fs, [_info_to_file(i, path) for i in infos]


def filesystem_of(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a URI (s3://, gs://, file://, ...) or a local path (made absolute)."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def check_writable(location: str, key: str) -> None:
    """Create the folder ``location`` (a local path or a URI) if need be and check that it can be written
    (locally: a temporary file, removed; a URI: creating the folder), so a place a run or a prepare cannot
    write to stops it before any work, in one line naming ``key``, not in a traceback from deep inside Ray."""
    try:
        if "://" in location:
            fs, path = pafs.FileSystem.from_uri(location)
            fs.create_dir(path, recursive=True)
        else:
            os.makedirs(location, exist_ok=True)
            with tempfile.TemporaryFile(dir=location):
                pass
    except (OSError, ValueError, pa.ArrowException) as e:
        reason = (f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename
                  else (str(e).splitlines() or [type(e).__name__])[0])
        raise ConfigError(f"{key}={location!r} cannot be written to ({reason}); give a folder that can be "
                          f"created and written to") from None


def _walk(fs: pafs.FileSystem, base: str, source: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise PrepareError(f"data.source={source!r}: {base} does not exist") from None
    keep = [i for i in infos if i.type == pafs.FileType.File
            and not any(part.startswith(".") for part in _relative(i.path, base).split("/"))]
    return sorted(keep, key=lambda i: i.path)


def _info_to_file(info: pafs.FileInfo, root: str) -> SourceFile:
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    return SourceFile(info.path, _relative(info.path, root), info.size or 0, mtime)


def _relative(path: str, root: str) -> str:
    """os.path.relpath(path, root), without its cost per call (a listing can hold a million files) where
    ``path`` lies under ``root`` as the filesystem spells it."""
    prefix = root if root.endswith("/") else root + "/"
    plain = path.startswith(prefix) and not any(odd in path for odd in ("//", "/./", "/../"))
    return path[len(prefix):] if plain else os.path.relpath(path, root)


def decode_file(raw: bytes) -> tuple[str, str]:
    """(text, "") for UTF-8 text, ("", reason) for a file that is binary or not UTF-8."""
    if b"\x00" in raw[:8192]:
        return "", "binary (contains NUL bytes)"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return "", f"not UTF-8 ({e.reason} at byte {e.start})"


JSON_EXT = (".jsonl", ".json")
LISTED = 5  # bad records of a file listed one by one; more are summed up in one entry per file


def record_name(text: str) -> str:
    """A record's document name (JSON, Parquet): a hash of its text. Records have no path of their own; the
    same text always lands in the same split."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def parse_file(raw: bytes, name: str, text_field: str) -> tuple[list[Document], list[Skipped]]:
    """The documents of one source file, and what of it was skipped. A text file is one document; a
    ``.jsonl`` file gives one per line and a ``.json`` file one per record of its array (or its one object,
    or one per line), each the record's ``text_field``. Empty texts are no documents. A file that is binary
    or not UTF-8 is skipped whole; so is a ``.json`` array that is not valid JSON. Lines that are not JSON,
    records that are not objects and records without a string ``text_field`` are skipped with where they
    are (line or item number), summed up per file when there are more than LISTED. The local loop and the
    Ray Data pipeline both read files through here."""
    text, reason = decode_file(raw)
    if reason:
        return [], [Skipped(f"{name}: {reason}", 0)]
    if not name.endswith(JSON_EXT):
        return ([Document(name, text)] if text else []), []
    records = _json_records(text, name.endswith(".json"))
    if isinstance(records, str):
        return [], [Skipped(f"{name}: {records}", 0)]
    docs, bad = [], []  # bad: (where, what is wrong, detail)
    for where, record, error in records:
        if error:
            bad.append((where, "not valid JSON", f" ({error})"))
        elif not isinstance(record, dict):
            bad.append((where, "not a JSON object", f" (got {type(record).__name__})"))
        elif text_field not in record:
            bad.append((where, f"without field {text_field!r}", f" (its fields: {', '.join(record)[:100]}; "
                                                                   f"set data.text_field)"))
        elif not isinstance(record[text_field], str):
            bad.append((where, f"field {text_field!r} not a string", f" (got {type(record[text_field]).__name__})"))
        elif record[text_field]:
            docs.append(Document(record_name(record[text_field]), record[text_field]))
    if len(bad) <= LISTED:
        return docs, [Skipped(f"{name} {where}: {what}{detail}", 1) for where, what, detail in bad]
    kinds: dict[str, list] = {}
    for where, what, detail in bad:
        kinds.setdefault(what, []).append((where, detail))
    parts = [f"{len(found)} {what}{found[0][1]} at {', '.join(w for w, _ in found[:3])}"
             + (", ..." if len(found) > 3 else "") for what, found in kinds.items()]
    return docs, [Skipped(f"{name}: {len(bad):,} records skipped: {'; '.join(parts)}", len(bad))]


def _json_records(text: str, whole_file: bool):
    """[(where, record, error)] of JSON text: JSON Lines, or (``whole_file``, for .json) one array of records
    or one object. A string when the file as a whole is unreadable (an array that is not valid JSON)."""
    start = text.lstrip()[:1]
    if whole_file and start in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if start == "[":
                return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            # "{...}\n{...}": JSON Lines under a .json name, read line by line below
        else:
            if isinstance(whole, list):
                return [(f"item {i}", item, "") for i, item in enumerate(whole, 1)]
            return [("record 1", whole, "")]
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 raw
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line), ""))
        except json.JSONDecodeError as e:
            out.append((f"line {n}", None, f"{e.msg} at column {e.colno}"))
    return out


def skipped_error(skipped: list[Skipped]) -> PrepareError:
    """data.on_bad_file=fail: the error that stops a prepare, naming what it would have skipped."""
    return PrepareError(f"{count_skipped(skipped)} cannot be read (data.on_bad_file=fail): "
                        f"{'; '.join(s.what for s in skipped[:5])}{' ...' if len(skipped) > 5 else ''}; fix or "
                        f"remove them, or set data.on_bad_file=skip to leave them out")


def count_skipped(skipped: list[Skipped]) -> str:
    """'2 files', '0 files and 14 JSON records'."""
    files, records = sum(1 for s in skipped if not s.records), sum(s.records for s in skipped)
    return f"{files} files" + (f" and {records:,} JSON records" if records else "")


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()
