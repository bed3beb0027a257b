"""Ray Data prepare: sources of every kind -> tokenized Parquet shards + manifest."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygpt.config import load_config
from raygpt.data.corpus import is_val
from raygpt.data.pipeline import PrepareError, load_manifest, prepare, prepared_tokenizer, shard_paths


def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "sub" / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * (5 + i) + "\n")
    (root / "notes.md").write_text("# notes\nünïcödé text — fine\n")
    (root / "records.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 10, "id": i}) for i in range(5)))
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 8 for i in range(4)]}), root / "table.parquet")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x00\xff\xfe" * 10)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def cfg_for(tmp_path, source, *over):
    return load_config(None, [f"data.source={source}", f"data.prepared_dir={tmp_path / 'prepared'}",
                              "data.val_fraction=0.2", *over])


def read_ids(folder, split):
    return [t for f in shard_paths(folder, split) for row in pq.read_table(f).column("tokens").to_pylist() for t in row]


def test_prepare_reads_every_kind_and_writes_a_manifest(ray_cluster, tmp_path):
    root = corpus(tmp_path)
    cfg = cfg_for(tmp_path, root)
    out = prepare(cfg.data, print_fn=lambda s: None)
    m = load_manifest(out)
    tok = prepared_tokenizer(out)
    assert m["tokenizer"] == "char" and m["vocab_size"] == tok.vocab_size
    assert sorted(m["skipped_files"]) == ["image.bin: binary (contains NUL bytes)",
                                          "latin1.txt: not UTF-8 (unexpected end of data at byte 3)"]
    train, val = read_ids(out, "train"), read_ids(out, "val")
    assert m["splits"]["train"]["tokens"] == len(train) and m["splits"]["val"]["tokens"] == len(val) and val
    text = tok.decode(train + val)
    assert "record 3" in text and "parquet row 2" in text and "ünïcödé" in text and "quick brown fox" in text
    assert text.count("<|endoftext|>") == 30 + 1 + 5 + 4  # one per document
    for shard in m["splits"]["train"]["shards"]:
        assert pq.read_metadata(out / shard["path"]).num_rows == shard["rows"]
    assert pq.read_schema(shard_paths(out, "train")[0]).field("tokens").type == pa.list_(pa.int32())
    # Whole documents go to the split their relative path hashes to: the local loop's rule.
    val_text, train_text = tok.decode(val), tok.decode(train)
    in_val = [i for i in range(30) if is_val(f"sub/doc{i}.txt", 0.2)]
    assert in_val
    for i in range(30):
        assert (f"document {i}: " in val_text) == (i in in_val)
        assert (f"document {i}: " in train_text) == (i not in in_val)


def test_prepare_is_idempotent_and_notices_changes(ray_cluster, tmp_path):
    root = corpus(tmp_path)
    cfg = cfg_for(tmp_path, root, "data.tokenizer=bytes")
    first = prepare(cfg.data, print_fn=lambda s: None)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg.data, print_fn=lambda s: None) == first  # reused, not redone
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    (root / "sub" / "doc0.txt").write_text("changed text " * 20)
    second = prepare(cfg.data, print_fn=lambda s: None)
    assert second != first and first.exists()  # nothing prepared earlier is overwritten
    other = prepare(cfg_for(tmp_path, root, "data.tokenizer=bytes", "data.val_fraction=0.3").data, print_fn=lambda s: None)
    assert other not in (first, second)
    uri = prepare(cfg_for(tmp_path, f"file://{root}", "data.tokenizer=bytes").data, print_fn=lambda s: None)
    assert load_manifest(uri)["splits"]["train"]["tokens"] > 0


def test_bpe_and_globs(ray_cluster, tmp_path, monkeypatch):
    from raygpt.data import pipeline

    root = corpus(tmp_path)
    out = prepare(cfg_for(tmp_path, f"{root}/sub/*.txt", "data.tokenizer=bpe", "data.bpe_vocab_size=300").data,
                  print_fn=lambda s: None)
    m = load_manifest(out)
    assert m["tokenizer"] == "bpe" and 257 < m["vocab_size"] <= 300 and m["files"] == 30
    tok = prepared_tokenizer(out)
    assert "quick brown fox" in tok.decode(read_ids(out, "train"))
    # BPE trains on a seeded sample of the files (here a third of them): the same one every time.
    monkeypatch.setattr(pipeline, "BPE_SAMPLE_BYTES", sum(f.stat().st_size for f in (root / "sub").iterdir()) // 3)
    again = [prepare(cfg_for(tmp_path, f"{root}/sub/*.txt", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
                             f"data.prepared_dir={tmp_path / name}").data, print_fn=lambda s: None) for name in "ab"]
    assert again[0].name != out.name  # another sample size is another fingerprint
    assert (again[0] / "tokenizer.json").read_text() == (again[1] / "tokenizer.json").read_text()
    assert load_manifest(again[0])["splits"] == load_manifest(again[1])["splits"]  # shards to the sha256


def test_bad_input_fails_before_work_and_leaves_nothing(ray_cluster, tmp_path):
    root = corpus(tmp_path)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(cfg_for(tmp_path, tmp_path / "missing").data, print_fn=lambda s: None)
    with pytest.raises(PrepareError, match="image.bin.*data.on_bad_file=skip"):
        prepare(cfg_for(tmp_path, root, "data.on_bad_file=fail").data, print_fn=lambda s: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="empty folder"):
        prepare(cfg_for(tmp_path, tmp_path / "empty").data, print_fn=lambda s: None)
    one = tmp_path / "one.txt"
    one.write_text("a single document " * 50)
    with pytest.raises(ValueError, match="val split is empty.*data.split=tail"):
        prepare(cfg_for(tmp_path, one, "data.val_fraction=0.01").data, print_fn=lambda s: None)
    (tmp_path / "records").mkdir()
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "records" / "r.parquet")
    with pytest.raises(PrepareError, match=r"^r.parquet: no field 'text' in the records \(fields: body\); set "
                                           r"data.text_field$"):
        prepare(cfg_for(tmp_path, tmp_path / "records").data, print_fn=lambda s: None)
    # A char tokenizer given by path that lacks a character of the corpus: found in a Ray task, said in one line.
    from raygpt.tokenizer import train_tokenizer

    train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz 0123456789\n"]).save(tmp_path / "tok")  # no ':'
    with pytest.raises(ValueError, match=r"^character ':' \(U\+003A\) at position \d+ is not in the char vocabulary"):
        prepare(cfg_for(tmp_path, root / "sub", f"data.tokenizer_path={tmp_path / 'tok' / 'tokenizer.json'}").data,
                print_fn=lambda s: None)
    leftovers = [p.name for p in (tmp_path / "prepared").iterdir()] if (tmp_path / "prepared").exists() else []
    assert leftovers == []  # no half-written folder, temporary or otherwise


def json_corpus(tmp_path):
    """Good records, and records that are not JSON or lack the text field, in .jsonl and .json files."""
    root = tmp_path / "json"
    root.mkdir()
    good = [json.dumps({"text": f"good record {i} " * 10}) for i in range(20)]
    (root / "a.jsonl").write_text("\n".join(good[:10] + ["{not json", json.dumps({"body": "no text"})]))
    (root / "b.json").write_text(json.dumps([json.loads(g) for g in good[10:]] + [{"txt": "typo"}]))
    (root / "many.jsonl").write_text("\n".join(["garbage"] * 8 + [json.dumps({"text": "the last good one " * 5})]))
    return root


def test_bad_json_records_are_skipped_and_listed_with_where(ray_cluster, tmp_path):
    printed = []
    out = prepare(cfg_for(tmp_path, json_corpus(tmp_path), "data.split=tail").data, print_fn=printed.append)
    m = load_manifest(out)
    assert m["skipped_files"] == [
        "a.jsonl line 11: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "a.jsonl line 12: without field 'text' (its fields: body; set data.text_field)",
        "b.json item 11: without field 'text' (its fields: txt; set data.text_field)",
        "many.jsonl: 8 records skipped: 8 not valid JSON (Expecting value at column 1) at line 1, line 2, line 3, ..."]
    assert m["skipped_records"] == 11
    assert "0 files and 11 JSON records skipped" in printed[1]
    assert [line for line in printed if line.startswith("prepare: skipped ")] == [
        f"prepare: skipped {what}" for what in m["skipped_files"]]
    text = prepared_tokenizer(out).decode(read_ids(out, "train") + read_ids(out, "val"))
    # 21 documents, each cut in two by data.split=tail (its train part and its val part each end in end-of-text)
    assert text.count("<|endoftext|>") == 2 * 21 and "good record 19" in text and "the last good one" in text
    assert "typo" not in text and "not json" not in text


def test_bad_json_records_stop_the_prepare_with_on_bad_file_fail(ray_cluster, tmp_path):
    with pytest.raises(PrepareError, match=r"^0 files and 11 JSON records cannot be read \(data.on_bad_file=fail\): "
                                           r"a.jsonl line 11: not valid JSON .*many.jsonl: 8 records skipped.*"
                                           r"set data.on_bad_file=skip"):
        prepare(cfg_for(tmp_path, json_corpus(tmp_path), "data.split=tail", "data.on_bad_file=fail").data,
                print_fn=lambda s: None)
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == []  # no temporary folder left


def test_prepare_removes_what_interrupted_prepares_left(ray_cluster, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now a process that is gone
    prepared = tmp_path / "prepared"
    dead = prepared / f".corpus-0123456789abcdef.tmp-{socket.gethostname()}-{child.pid}-0badc0de"
    live = prepared / f".corpus-0123456789abcdef.tmp-{socket.gethostname()}-{os.getpid()}-00c0ffee"
    for folder in (dead, live):
        (folder / "split=train").mkdir(parents=True)
    printed = []
    out = prepare(cfg_for(tmp_path, corpus(tmp_path), "data.tokenizer=bytes").data, print_fn=printed.append)
    assert printed[0] == f"prepare: removed {dead} left by an interrupted prepare (pid {child.pid})"
    assert not dead.exists() and live.exists() and (out / "manifest.json").is_file()


def test_the_val_batches_are_the_same_for_ray_and_local(ray_cluster, tmp_path, monkeypatch):
    """Ray's prepare writes the val split in the sources' order, so the fixed val batches a Ray worker
    draws (from its in-order stream of val units) are the ones the local loop draws from its val array."""
    from raygpt.data.corpus import prepare_arrays
    from raygpt.data.pipeline import read_units, split_units
    from raygpt.data.windows import fixed_batches

    from raygpt.data import pipeline

    root = tmp_path / "many"
    root.mkdir()
    for i in range(80):  # many files in many groups (tasks), which may finish in any order
        (root / f"f{i:03d}.py").write_text(f"def f{i}(x):\n" + f"    return x * {i} + {i % 7}  # line\n" * (3 + i % 11))
    monkeypatch.setattr(pipeline, "GROUP_BYTES", 1500)
    cfg = cfg_for(tmp_path, root, "data.val_fraction=0.3")
    prepared = prepare(cfg.data, print_fn=lambda s: None)
    ray_tok, val_units = prepared_tokenizer(prepared), split_units(prepared, "val")
    ray_val = read_units(val_units, range(len(val_units)))
    local_tok, _, local_val = prepare_arrays(cfg.data)
    assert sum(len(a) for a in ray_val) == len(local_val) == load_manifest(prepared)["splits"]["val"]["tokens"]
    ray_text = ray_tok.decode(list(np.concatenate(ray_val)))
    assert ray_text == local_tok.decode(list(local_val))  # the same documents, in the same order
    picks = dict(block_size=32, batch_size=4, steps=3, seed=1)
    ray_batches = fixed_batches(ray_val, len(local_val), **picks)
    local_batches = fixed_batches([local_val], len(local_val), **picks)
    for (rx, _), (lx, _) in zip(ray_batches, local_batches):
        assert [ray_tok.decode(r.tolist()) for r in rx] == [local_tok.decode(r.tolist()) for r in lx]
