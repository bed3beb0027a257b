"""Prepare throughput: MB/s of raw text through the Ray Data pipeline for each tokenizer.

    python bench/prepare_speed.py [key=value ...]     # default source: the embedded python-stdlib corpus

Each tokenizer prepares into a fresh folder (nothing reused), on one local Ray cluster started once, so
the figures are side by side in one run. A small warm-up prepare runs first, so no row pays Ray Data's
start-up (its time is printed on its own).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from raygpt.config import load_config  # noqa: E402
from raygpt.data.pipeline import list_sources, load_manifest, prepare  # noqa: E402
from raygpt.cluster import connect_private  # noqa: E402


def main(argv: list[str]) -> None:
    connect_private()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warmup.txt").write_text("warm up " * 10_000)
        t0 = time.perf_counter()
        prepare(load_config(None, [f"data.source={tmp}/warmup.txt", f"data.prepared_dir={tmp}/warmup",
                                   "data.split=tail"]).data, print_fn=lambda s: None)
        warmup = time.perf_counter() - t0
        for kind in ("bytes", "char", "bpe"):
            cfg = load_config(None, [f"data.tokenizer={kind}", f"data.prepared_dir={tmp}/{kind}", *argv])
            _, files = list_sources(cfg.data)
            mb = sum(f.size for f in files) / 1e6
            t0 = time.perf_counter()
            out = prepare(cfg.data, print_fn=lambda s: None)
            seconds = time.perf_counter() - t0
            m = load_manifest(out)
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
            rows.append((kind, len(files), mb, m["vocab_size"], tokens, seconds))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"\nprepare throughput: {platform.processor() or platform.machine()}, {cpus} CPUs in Ray, "
          f"ray {ray.__version__}, source {cfg.data.source}; warm-up prepare (Ray Data start-up) {warmup:.1f} s")
    print(f"{'tokenizer':<10}{'files':>7}{'MB':>8}{'vocab':>8}{'tokens':>13}{'seconds':>9}{'MB/s':>8}")
    for kind, n, mb, vocab, tokens, s in rows:
        print(f"{kind:<10}{n:>7}{mb:>8.1f}{vocab:>8}{tokens:>13,}{s:>9.1f}{mb / s:>8.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
