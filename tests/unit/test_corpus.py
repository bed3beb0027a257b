import json

import numpy as np
import pytest

from raygpt.config import DataConfig
from raygpt.data.corpus import encode_documents, is_val, prepare_arrays, read_documents, split_documents
from raygpt.data.sources import PrepareError, list_sources, stdlib_files
from raygpt.tokenizer import train_tokenizer


def test_python_stdlib_is_the_embedded_default_corpus():
    files = stdlib_files()
    size = sum(f.stat().st_size for f in files)
    assert 500 < len(files) < 1500 and 5e6 < size < 30e6  # about 800 files, 12 MB
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-3:-1])
    assert any(f.name == "argparse.py" for f in files)
    assert DataConfig().source == "python-stdlib"


def test_folder_glob_and_file_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("hello")
    (tmp_path / "a" / "two.md").write_text("world")
    (tmp_path / "a" / ".hidden").write_text("secret")
    (tmp_path / "a" / "bin.dat").write_bytes(b"\xff\xfe\x00\x81")
    docs = read_documents(str(tmp_path / "a"))
    assert [d.name for d in docs] == ["one.txt", "two.md"]  # hidden and non-UTF-8 files skipped
    assert [d.text for d in read_documents(str(tmp_path / "a" / "*.txt"))] == ["hello"]
    assert [d.text for d in read_documents(str(tmp_path / "a" / "two.md"))] == ["world"]
    with pytest.raises(PrepareError, match="not a named corpus"):
        list_sources(DataConfig(source=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        read_documents(str(tmp_path / "empty"))


def test_splits_are_stable_and_disjoint():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    val = [n for n in names if is_val(n, 0.1)]
    assert 120 < len(val) < 280 and val == [n for n in names if is_val(n, 0.1)]
    docs = read_documents("python-stdlib", max_chars=2_000_000)
    train, val_texts = split_documents(docs, DataConfig())
    assert len(train) + len(val_texts) == len(docs) and val_texts
    tail_train, tail_val = split_documents(docs[:1], DataConfig(split="tail", val_fraction=0.1))
    assert tail_train[0] + tail_val[0] == docs[0].text
    assert len(tail_val[0]) == pytest.approx(0.1 * len(docs[0].text), abs=1)
    with pytest.raises(ValueError, match="val split is empty"):
        split_documents(docs[:1], DataConfig())


def test_documents_are_joined_by_end_of_text():
    tok = train_tokenizer("char", ["ab", "c"])
    ids = encode_documents(["ab", "c"], tok)
    assert ids.tolist() == [0, 1, tok.eot_id, 2, tok.eot_id]
    tok, train, val = prepare_arrays(DataConfig(max_chars=300_000, tokenizer="bytes"))
    assert train.dtype == np.int32 and (train == tok.eot_id).sum() >= 2 and len(val) > 0


def test_json_records_are_parsed_and_bad_ones_reported_with_where(tmp_path):
    from raygpt.data.sources import parse_file, record_name

    lines = [json.dumps({"text": "first record", "id": 1}), "", "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": 7}), json.dumps(["a", "list"]), json.dumps({"text": "second — ünïcödé\u2028ok"}),
             json.dumps({"text": ""})]
    docs, skipped = parse_file("\n".join(lines).encode(), "r.jsonl", "text")
    assert [d.text for d in docs] == ["first record", "second — ünïcödé\u2028ok"]  # U+2028 is not a line break
    assert docs[0].name == record_name("first record")
    assert [s.what for s in skipped] == [
        "r.jsonl line 3: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "r.jsonl line 4: without field 'text' (its fields: body; set data.text_field)",
        "r.jsonl line 5: field 'text' not a string (got int)",
        "r.jsonl line 6: not a JSON object (got list)"]
    assert [s.records for s in skipped] == [1, 1, 1, 1]
    # .json: one array of records, one object, or JSON Lines under a .json name
    docs, skipped = parse_file(json.dumps([{"text": "a"}, {"x": 1}, {"text": "b"}]).encode(), "arr.json", "text")
    assert [d.text for d in docs] == ["a", "b"] and [s.what for s in skipped] == [
        "arr.json item 2: without field 'text' (its fields: x; set data.text_field)"]
    assert [d.text for d in parse_file(b'{"text": "one"}', "one.json", "text")[0]] == ["one"]
    assert [d.text for d in parse_file(b'{"text": "a"}\n{"text": "b"}\n', "lines.json", "text")[0]] == ["a", "b"]
    docs, skipped = parse_file(b'[{"text": "a"},', "broken.json", "text")
    assert docs == [] and [(s.what, s.records) for s in skipped] == [
        ("broken.json: not valid JSON (Expecting value at line 1 column 16)", 0)]
    # many bad records: one entry for the file, with counts per kind and the first places
    many = "\n".join(["{bad"] * 7 + [json.dumps({"t": "x"})] * 2 + [json.dumps({"text": "ok"})])
    docs, skipped = parse_file(many.encode(), "many.jsonl", "text")
    assert [d.text for d in docs] == ["ok"] and len(skipped) == 1 and skipped[0].records == 9
    assert skipped[0].what.startswith("many.jsonl: 9 records skipped: 7 not valid JSON (")
    assert ("at line 1, line 2, line 3, ...; 2 without field 'text' (its fields: t; set data.text_field) at line 8, "
            "line 9") in skipped[0].what
    # text files are one document; binary and non-UTF-8 files are skipped whole
    assert [d.name for d in parse_file(b"hello", "a/b.txt", "text")[0]] == ["a/b.txt"]
    assert [s.what for s in parse_file(b"caf\xe9", "l.txt", "text")[1]] == [
        "l.txt: not UTF-8 (unexpected end of data at byte 3)"]


def test_the_local_path_reads_json_records_and_honours_on_bad_file(tmp_path):
    from raygpt.data.sources import Skipped

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "r.jsonl").write_text("\n".join([json.dumps({"text": f"record {i} " * 20}) for i in range(10)]
                                                      + ["{oops", json.dumps({"content": "wrong field"})]))
    (tmp_path / "c" / "bin.dat").write_bytes(b"\x00\x01")
    skipped: list[Skipped] = []
    docs = read_documents(str(tmp_path / "c"), skipped=skipped)
    assert [d.text for d in docs] == [f"record {i} " * 20 for i in range(10)]  # records, not the file's JSON text
    assert sorted(s.what for s in skipped) == ["bin.dat: binary (contains NUL bytes)",
                                               "r.jsonl line 11: not valid JSON (Expecting property name enclosed "
                                               "in double quotes at column 2)",
                                               "r.jsonl line 12: without field 'text' (its fields: content; set "
                                               "data.text_field)"]
    printed = []
    data = DataConfig(source=str(tmp_path / "c"), tokenizer="bytes", split="tail")
    tok, train, val = prepare_arrays(data, print_fn=printed.append)
    assert "record 3" in tok.decode(train) and printed[-1] == "data: 1 files and 2 JSON records skipped"
    with pytest.raises(PrepareError, match=r"1 files and 2 JSON records cannot be read \(data.on_bad_file=fail\): "
                                           r"bin.dat: binary .*r.jsonl line 11: not valid JSON.*data.on_bad_file=skip"):
        prepare_arrays(DataConfig(source=str(tmp_path / "c"), tokenizer="bytes", split="tail", on_bad_file="fail"))
    (tmp_path / "other.jsonl").write_text(json.dumps({"content": "a"}))
    with pytest.raises(ValueError, match=r"holds no text \(0 files and 1 JSON records skipped, e.g. other.jsonl "
                                         r"line 1: without field 'text'"):
        read_documents(str(tmp_path / "other.jsonl"))
