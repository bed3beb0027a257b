"""Where documents come from: named corpora, and listing and reading files on any pyarrow filesystem.

Shared by the local loop (raygpt.data.corpus) and the Ray Data pipeline (raygpt.data.pipeline), so both
accept the same sources, skip the same files and name documents the same way (the train/val split hashes
the names). pyarrow, no Ray.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raygpt.config import DataConfig

# Folders of the standard library that are test suites or installed packages, not the library itself.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}



class PrepareError(ValueError):
    """Data input that cannot be read or prepared; the message names it and says what to do."""


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
    if "://" in source:
        fs, path = pafs.FileSystem.from_uri(source)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))
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


def _walk(fs: pafs.FileSystem, base: str, source: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise PrepareError(f"data.source={source!r}: {base} does not exist") from None
    keep = [i for i in infos if i.type == pafs.FileType.File
            and not any(part.startswith(".") for part in os.path.relpath(i.path, base).split("/"))]
    return sorted(keep, key=lambda i: i.path)


def _info_to_file(info: pafs.FileInfo, root: str) -> SourceFile:
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    return SourceFile(info.path, os.path.relpath(info.path, root), info.size or 0, mtime)


def decode_file(raw: bytes) -> tuple[str, str]:
    """(text, "") for UTF-8 text, ("", reason) for a file that is binary or not UTF-8."""
    if b"\x00" in raw[:8192]:
        return "", "binary (contains NUL bytes)"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return "", f"not UTF-8 ({e.reason} at byte {e.start})"


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()
