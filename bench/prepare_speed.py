"""Prepare throughput: `raygpt prepare` against the tokenizer alone and against a single-process script.

    python bench/prepare_speed.py [--mb 200] [--kinds bytes,char,bpe] [--repeat 1]
    python bench/prepare_speed.py --bpe-sample-cost      # what training BPE on a sample costs in tokens

The corpus is the embedded python-stdlib corpus copied under new names (copy000/..., copy001/..., so each
copy's files hash to splits of their own) until it holds --mb MB, in a temp folder: no download. For each
tokenizer, side by side in one run on one local Ray cluster started here (a private one: its own temp dir
and ports; it ends with this process):

    raygpt     prepare() end to end into a fresh folder: listing, reading, splitting, tokenizing (and
               building the tokenizer: char's vocabulary pass, BPE's training on a sample), writing the
               shards and the manifest
    tokenizer  the tokenizer alone over the same text already in memory: a numpy lookup table for bytes
               and char (one core), HF `encode_batch` for BPE (HF's threads: both cores), the BPE trained
               on all of the distinct text (the stdlib)
    script     a single-process script (SCRIPT below) that reads the files, checks UTF-8, tokenizes and
               writes the same Parquet layout (split=train|val, 128-row files of 4096-token rows, row
               groups of 2 rows, the same columns and writer options); for BPE it trains on the same
               seeded 16 MB sample of files and encodes with encode_batch

A warm-up prepare runs first, so no row pays the cluster's start-up (its time is printed on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from raygpt.config import load_config  # noqa: E402
from raygpt.data import pipeline  # noqa: E402
from raygpt.data.pipeline import load_manifest, prepare  # noqa: E402
from raygpt.data.sources import stdlib_files  # noqa: E402
from raygpt.tokenizer import train_tokenizer  # noqa: E402

TARGET_MBS = 30  # bytes and char, end to end
TARGET_VS_TOKENIZER = 0.7  # BPE: of the tokenizer alone
TARGET_VS_SCRIPT = 1.6  # every kind, on 2 cores

# The single-process baseline: argv = kind, corpus folder, output folder, BPE sample bytes, BPE sample seed.
SCRIPT = r'''
import hashlib, random, sys, time, zlib
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
kind, src, out, sample_bytes, seed = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
files = sorted(p for p in src.rglob("*") if p.is_file())
texts = []
for p in files:
    try:
        texts.append((str(p.relative_to(src)), p.read_bytes().decode("utf-8")))
    except UnicodeDecodeError:
        pass
if kind == "bytes":
    eot, encode = 256, lambda ts: [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in ts]
elif kind == "char":
    chars = sorted(set().union(*(set(t) for _, t in texts)))
    lut = np.full(ord(chars[-1]) + 1, -1, np.int32); lut[[ord(c) for c in chars]] = np.arange(len(chars)); eot = len(chars)
    encode = lambda ts: [lut[np.frombuffer(t.encode("utf-32-le"), np.uint32)] for t in ts]
else:
    from raygpt.tokenizer import train_tokenizer
    order = list(range(len(texts))); random.Random(seed).shuffle(order); sample, n = [], 0
    for i in order:
        if n >= sample_bytes: break
        sample.append(texts[i][1]); n += len(texts[i][1])
    tok = train_tokenizer("bpe", sample, 4096); eot = tok.eot_id
    encode = lambda ts: [np.asarray(e.ids, np.int32) for e in tok._hf.encode_batch_fast(ts, add_special_tokens=False)]
for split in ("train", "val"):
    docs = [t for name, t in texts if (zlib.crc32(name.encode()) / 2**32 < 0.05) == (split == "val")]
    (out / f"split={split}").mkdir(parents=True)
    parts = [a for i in range(0, len(docs), 200) for ids in encode(docs[i:i + 200]) for a in (ids, np.array([eot], np.int32))]
    ids = np.concatenate(parts)
    for n, start in enumerate(range(0, len(ids), 128 * 4096)):
        chunk = ids[start:start + 128 * 4096]; rows = -(-len(chunk) // 4096)
        offsets = np.minimum(np.arange(rows + 1) * 4096, len(chunk)).astype(np.int32)
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(chunk)), "n_tokens": np.diff(offsets),
                          "bad": pa.array([""] * rows), "bad_records": np.zeros(rows, np.int64), "doc": np.zeros(rows, np.int64),
                          "chunk": np.arange(rows, dtype=np.int32)})
        pq.write_table(table, out / f"split={split}/{n:05d}.parquet", row_group_size=2, use_dictionary=["tokens.list.element"],
                       compression="none", write_statistics=False)
print(time.perf_counter() - t0)
'''


def make_corpus(root: Path, mb: float) -> tuple[int, int]:
    """Copies of the stdlib under copyNNN/ until ``mb`` MB; (files, bytes)."""
    files, base = stdlib_files(), Path(sysconfig.get_paths()["stdlib"])
    n = size = copy = 0
    while size < mb * 1e6:
        for f in files:
            dest = root / f"copy{copy:03d}" / f.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            n, size = n + 1, size + f.stat().st_size
        copy += 1
    return n, size


def texts_of(root: Path) -> list[str]:
    return [p.read_bytes().decode("utf-8") for p in sorted(root.rglob("*")) if p.is_file()]


def tokenizer_alone(kind: str, texts: list[str], bpe) -> tuple[float, int]:
    """(seconds, tokens) of the tokenizer alone over ``texts`` in memory."""
    if kind == "bpe":
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 200):  # a few MB a call: HF's Encodings of all of it would not fit
            tokens += sum(len(e.ids) for e in bpe._hf.encode_batch_fast(texts[i:i + 200], add_special_tokens=False))
        return time.perf_counter() - t0, tokens
    if kind == "bytes":
        lut = np.arange(256, dtype=np.int32)
        t0 = time.perf_counter()
        ids = [lut[np.frombuffer(t.encode("utf-8"), np.uint8)] for t in texts]
    else:
        chars = sorted(set().union(*(set(t) for t in texts[:800])))  # every copy holds the same characters
        lut = np.full(ord(chars[-1]) + 1, -1, dtype=np.int32)
        lut[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
        t0 = time.perf_counter()
        ids = [lut[np.frombuffer(t.encode("utf-32-le"), np.uint32)] for t in texts]
    return time.perf_counter() - t0, sum(len(a) for a in ids)


def run_script(kind: str, corpus: Path, out: Path) -> float:
    sample = [str(pipeline.BPE_SAMPLE_BYTES), str(pipeline.BPE_SAMPLE_SEED)]
    r = subprocess.run([sys.executable, "-c", SCRIPT, kind, str(corpus), str(out), *sample], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return float(r.stdout.split()[-1])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB (default 200)")
    p.add_argument("--kinds", default="bytes,char,bpe")
    p.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest is kept")
    p.add_argument("--bpe-sample-cost", action="store_true", help="only measure BPE's sample against more text")
    args = p.parse_args(argv)
    if args.bpe_sample_cost:
        return bpe_sample_cost()
    import ray

    from raygpt.cluster import connect_private

    connect_private()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        tmp = Path(tmp)
        n_files, size = make_corpus(tmp / "corpus", args.mb)
        os.sync()  # the copies on disk now, not flushed under the first measurement
        mb = size / 1e6
        t0 = time.perf_counter()  # the stdlib as bytes: two tasks, so both workers have started
        prepare(load_config(None, [f"data.prepared_dir={tmp}/warmup", "data.tokenizer=bytes"]).data,
                print_fn=lambda s: None)
        warmup = time.perf_counter() - t0
        load = os.getloadavg()[0]
        bpe = None
        for kind in args.kinds.split(","):
            if kind == "bpe":  # the tokenizer alone's: trained on all the distinct text (not timed)
                bpe = train_tokenizer("bpe", [f.read_text() for f in stdlib_files()], 4096)
            best: dict = {}
            for r in range(args.repeat):
                cfg = load_config(None, [f"data.source={tmp}/corpus", f"data.tokenizer={kind}",
                                         f"data.prepared_dir={tmp}/out-{kind}-{r}"])
                t0 = time.perf_counter()
                out = prepare(cfg.data, print_fn=lambda s: None)
                seconds = time.perf_counter() - t0
                m = load_manifest(out)
                best["raygpt"] = min(best.get("raygpt", 1e9), seconds)
                best["tokens"] = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                best["vocab"] = m["vocab_size"]
                shutil.rmtree(out)
                texts = texts_of(tmp / "corpus")
                seconds, tokens = tokenizer_alone(kind, texts, bpe)
                del texts
                best["alone"] = min(best.get("alone", 1e9), seconds)
                best["alone_tokens"] = tokens
                script_out = tmp / f"script-{kind}-{r}"
                best["script"] = min(best.get("script", 1e9), run_script(kind, tmp / "corpus", script_out))
                shutil.rmtree(script_out)
            rows.append((kind, best))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"\nprepare throughput: {platform.processor() or platform.machine()}, {cpus} CPUs in Ray, "
          f"ray {ray.__version__}; {n_files} files, {mb:.1f} MB (python-stdlib copies); warm-up prepare "
          f"(cluster start-up) {warmup:.1f} s; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"(other work on the machine); best of {args.repeat}")
    print(f"{'tokenizer':<10}{'vocab':>6}{'tokens':>13}{'raygpt s':>10}{'MB/s':>7}{'alone MB/s':>11}{'script s':>10}"
          f"{'MB/s':>7}{'vs alone':>9}{'vs script':>10}  targets")
    for kind, b in rows:
        ours, alone, script = mb / b["raygpt"], mb / b["alone"], mb / b["script"]
        if kind == "bpe":
            met = [f"vs alone >= {TARGET_VS_TOKENIZER}: {verdict(ours / alone >= TARGET_VS_TOKENIZER)}"]
        else:
            met = [f">= {TARGET_MBS} MB/s: {verdict(ours >= TARGET_MBS)}"]
        met.append(f"vs script >= {TARGET_VS_SCRIPT}: {verdict(ours / script >= TARGET_VS_SCRIPT)}")
        print(f"{kind:<10}{b['vocab']:>6}{b['tokens']:>13,}{b['raygpt']:>10.1f}{ours:>7.1f}{alone:>11.1f}"
              f"{b['script']:>10.1f}{script:>7.1f}{ours / alone:>9.2f}{ours / script:>10.2f}  {'; '.join(met)}")
        if kind == "bpe":
            print(f"  bpe tokens: {b['tokens']:,} (trained on a {pipeline.BPE_SAMPLE_BYTES >> 20} MiB sample) against "
                  f"{b['alone_tokens']:,} (trained on all the distinct text): "
                  f"{b['tokens'] / b['alone_tokens'] - 1:+.2%}")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def bpe_sample_cost() -> None:
    """Tokens per byte on 8 MB of held-out Python (this environment's installed packages' sources) of BPE
    tokenizers (4096) trained on samples of 2 to 32 MB against one trained on 64 MB."""
    root = Path(sysconfig.get_paths()["purelib"])
    paths = sorted(root.rglob("*.py"))
    random.Random(1).shuffle(paths)
    texts = []
    for path in paths:
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if sum(map(len, texts)) > 80e6:
            break
    held, corpus, n = [], [], 0
    for t in texts:
        (held if n < 8e6 else corpus).append(t)
        n += len(t)
    held_bytes = sum(len(t.encode()) for t in held)
    results = {}
    for mb in (2, 4, 8, 16, 32, 64):
        sample, k = [], 0
        for t in corpus:
            if k >= mb * 1e6:
                break
            sample.append(t)
            k += len(t)
        t0 = time.perf_counter()
        tok = train_tokenizer("bpe", sample, 4096)
        seconds = time.perf_counter() - t0
        tokens = sum(len(e.ids) for e in tok._hf.encode_batch_fast(held, add_special_tokens=False))
        results[mb] = (seconds, tokens)
    print(json.dumps({"held_out_mb": round(held_bytes / 1e6, 1), "source": str(root)}))
    print(f"{'sample MB':>10}{'train s':>9}{'tokens/byte':>13}{'vs 64 MB':>10}")
    for mb, (seconds, tokens) in results.items():
        print(f"{mb:>10}{seconds:>9.1f}{tokens / held_bytes:>13.4f}{tokens / results[64][1] - 1:>+10.2%}")


if __name__ == "__main__":
    main(sys.argv[1:])
