"""A corpus larger than the Ray object store streams through prepare (own small cluster, in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

STORE_MB = 80  # Ray's smallest allowed object store is 75 MiB
CORPUS_MB = 120  # raw text; as int32 token ids (bytes tokenizer) it is 4x that

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import ray
    from raygpt.config import load_config
    from raygpt.data.pipeline import load_manifest, prepare

    source, prepared, store_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Its own cluster (address="local"): not the test session's, and with a deliberately small object store.
    ray.init(address="local", num_cpus=2, object_store_memory=store_mb * 1024 ** 2, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = ray.available_resources()["object_store_memory"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes, after the imports and ray.init
    cfg = load_config(None, [f"data.source={source}", f"data.prepared_dir={prepared}", "data.tokenizer=bytes"])
    out = prepare(cfg.data, print_fn=lambda s: None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = load_manifest(out)
    print(json.dumps({"store": store, "driver_growth": after - before,
                      "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"],
                      "rows": sum(s["rows"] for sp in m["splits"].values() for s in sp["shards"])}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_corpus_larger_than_the_object_store_streams_through(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    line = "".join(chr(ord("a") + i % 26) for i in range(99)) + "\n"  # 100 bytes, ASCII: 1 byte = 1 token
    doc = line * 10_000  # 1 MB per file
    for i in range(CORPUS_MB):
        (src / f"doc{i:03d}.txt").write_text(doc)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "prepared"), str(STORE_MB)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    corpus_bytes = CORPUS_MB * len(doc)
    assert r["store"] < corpus_bytes  # the premise: the text alone does not fit in the object store
    assert r["tokens"] == corpus_bytes + CORPUS_MB  # every byte, plus one end-of-text per document
    # The driver never holds the corpus: its peak memory grew by less than the text's size (the token ids
    # are 4x that), so the data went through Ray's streaming executor in pieces.
    assert r["driver_growth"] < corpus_bytes, r
