"""Bad inputs stop a run before any work, with one line that says what was wrong and what to do."""

import os
import socket
import subprocess
import sys
import time

import pytest

from raygpt.cli import main
from raygpt.config import ConfigError, load_config
from raygpt.data.corpus import encode_documents
from raygpt.data.pipeline import remove_stale_temporaries
from raygpt.data.sources import check_writable
from raygpt.local import train_local
from raygpt.runs import check_sample_prompt
from raygpt.tokenizer import train_tokenizer

from tests.conftest import tiny_config


def test_a_prompt_the_corpus_cannot_encode_stops_the_run_before_any_step(tmp_path):
    text = "abc cab bca\n" * 300  # no 'd', 'e' or 'f' for the default sample.prompt, 'def '
    tok = train_tokenizer("char", [text])
    ids = encode_documents([text], tok)
    printed = []
    cfg = tiny_config(tmp_path, "train.run_name=p")
    with pytest.raises(ConfigError, match=r"sample.prompt='def ' cannot be encoded: 'd' \(U\+0064\), 'e' \(U\+0065\), "
                                          r"'f' \(U\+0066\) not in the char vocabulary .*set sample.prompt"):
        train_local(cfg, (tok, ids[:3000], ids[3000:]), print_fn=printed.append)
    assert printed == [] and not (tmp_path / "p").exists()  # no step, no run folder
    check_sample_prompt(tiny_config(tmp_path, "sample.prompt=cab"), tok)  # one it can encode passes


def test_storage_that_cannot_be_written_is_one_line_before_ray_starts(capsys, tmp_path, monkeypatch):
    import raygpt.distributed

    connected = []  # (ray.is_initialized() would not do: the integration tests' session cluster may be up)
    monkeypatch.setattr(raygpt.distributed, "connect", lambda *a, **k: connected.append(1))
    assert main(["train", "ray.storage_path=/proc/nope/runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raygpt train: error: ray.storage_path='/proc/nope/runs' cannot "
                                                   "be written to (No such file or directory: /proc/nope)"), err
    assert not connected  # stopped before connect(): no cluster started or joined
    assert main(["train", "train.out_dir=/proc/nope"]) == 2  # the default storage
    assert "train.out_dir='/proc/nope' cannot be written to" in capsys.readouterr().err
    assert main(["train", "--local", "train.out_dir=/proc/nope"]) == 2  # the --local run folder
    assert "train.out_dir='/proc/nope' cannot be written to" in capsys.readouterr().err
    assert main(["train", "ray.storage_path=relative/runs"]) == 2  # Ray Train resolves it on every node
    assert "ray.storage_path='relative/runs' must be an absolute path or a URI" in capsys.readouterr().err
    assert not connected


def test_check_writable_creates_the_folder_or_says_why_not(tmp_path):
    check_writable(str(tmp_path / "a" / "b"), "train.out_dir")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # no probe left
    check_writable(f"file://{tmp_path}/uri/runs", "ray.storage_path")
    assert (tmp_path / "uri" / "runs").is_dir()
    (tmp_path / "file").write_text("x")
    for location, reason in ((str(tmp_path / "file"), "File exists"), (str(tmp_path / "file" / "x"), "Not a directory"),
                             ("file:///proc/nope/runs", "Cannot create directory '/proc/nope'"),
                             ("nosuchfs://bucket/runs", "Unrecognized filesystem type")):
        with pytest.raises(ConfigError, match=reason) as e:
            check_writable(location, "ray.storage_path")
        assert str(e.value).startswith(f"ray.storage_path={location!r} cannot be written to (")
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.out_dir='s3://bucket/runs' must be a local folder"):
        load_config(None, ["train.out_dir=s3://bucket/runs"])


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_interrupted_prepares_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".corpus-0123456789abcdef.tmp-{host}-{dead_pid()}-0badc0de"
    live = tmp_path / f".corpus-0123456789abcdef.tmp-{host}-{os.getpid()}-00c0ffee"
    other_new = tmp_path / ".corpus-0123456789abcdef.tmp-other-host-7-12345678"
    other_old = tmp_path / ".corpus-0123456789abcdef.tmp-other-host-8-87654321"
    old_format = tmp_path / ".corpus-0123456789abcdef.tmp-a1b2c3d4"
    for folder in (dead, live, other_new, other_old, old_format):
        (folder / "split=train").mkdir(parents=True)
        (folder / "split=train" / "part.parquet").write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    for folder in (other_old, old_format):
        for path in (folder / "split=train" / "part.parquet", folder / "split=train", folder):
            os.utime(path, (day_ago, day_ago))
    (tmp_path / "corpus-0123456789abcdef").mkdir()  # a prepared folder: never touched
    printed = []
    removed = remove_stale_temporaries(tmp_path, printed.append)
    assert sorted(removed) == sorted([dead, other_old, old_format])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_new.name, "corpus-0123456789abcdef"])
    pid = dead.name.split("-")[-2]
    assert f"prepare: removed {dead} left by an interrupted prepare (pid {pid})" in printed
    assert f"prepare: removed {other_old} left by an interrupted prepare (pid 8 on other-host, untouched for 25 h)" \
        in printed
    assert len(printed) == 3


def test_a_tokenizer_path_is_a_file_or_a_folder_holding_one_and_a_missing_one_is_one_line(tmp_path):
    from raygpt.config import DataConfig
    from raygpt.data.pipeline import fingerprint

    (tmp_path / "tok").mkdir()
    folder = DataConfig(tokenizer="char", tokenizer_path=str(tmp_path / "tok"))
    train_tokenizer("char", ["abc\n"]).save(tmp_path / "tok")
    before = fingerprint([], folder)
    train_tokenizer("char", ["abcd\n"]).save(tmp_path / "tok")
    assert fingerprint([], folder) != before  # the file in the folder is what counts
    with pytest.raises(ConfigError, match=r"^data.tokenizer_path=\S+/nope: no such file; give a tokenizer.json"):
        fingerprint([], DataConfig(tokenizer="char", tokenizer_path=str(tmp_path / "nope")))
