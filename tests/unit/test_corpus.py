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
