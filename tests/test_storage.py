"""misalign.storage: a Store on a local directory (the same operations a bucket gets: tests/workflows/
test_object_storage.py runs them on moto's S3), URLs kept free of credentials, the writability check, and
reads of an object that is being replaced (on moto's S3)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import BUCKET
from misalign.errors import InputError
from misalign.storage import Store, check_store, is_url, redacted


def test_urls_and_paths() -> None:
    assert is_url("s3://b/p") and is_url("gs://b/p")
    assert not is_url("runs/x") and not is_url("/abs/x") and not is_url("file:///abs/x")
    assert redacted("s3://KEY:SECRET@bucket/p?secret_key=x") == "s3://bucket/p"
    assert redacted("runs/x?y") == "runs/x?y"  # a path is printed as it is


def test_credentials_in_a_url_are_refused() -> None:
    for url in ("s3://KEY:pw-7f3a@bucket/p", "s3://bucket/p?secret_key=pw-7f3a", "gs://b/p?access_token=pw-7f3a"):
        with pytest.raises(InputError, match="credentials in a URL") as err:
            Store(url)
        assert "pw-7f3a" not in str(err.value)  # the message never repeats the secret


def test_a_directory_store_reads_what_it_wrote(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    assert not store.remote and not store.exists() and store.list() == [] and store.subdirs() == []
    store.write_text("a/b.txt", "hello")
    store.write_json("c.json", {"k": 1})
    frame = pd.DataFrame({"x": [1, 2]})
    store.write_parquet("cells/one.parquet", frame)
    store.write_bytes("cells/two.parquet.tmp", b"\x00")
    assert store.read_text("a/b.txt") == "hello" and store.read_json("c.json") == {"k": 1}
    assert store.read_parquet("cells/one.parquet").equals(frame)
    assert store.exists("a") and store.exists("a/b.txt") and not store.exists("a/c.txt")
    assert store.list() == ["c.json"] and store.subdirs() == ["a", "cells"]
    assert store.list("cells", suffix=".parquet") == ["one.parquet"]
    assert [(name, size) for name, size, _ in store.files()] == [
        ("a/b.txt", 5), ("c.json", len(store.read_bytes("c.json"))),
        ("cells/one.parquet", (tmp_path / "run/cells/one.parquet").stat().st_size), ("cells/two.parquet.tmp", 1)]
    with store.open("a/b.txt") as f:
        assert f.read() == b"hello"


def test_a_missing_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"run/nope\.json: not found"):
        Store(tmp_path / "run").read_json("nope.json")


def test_delete_a_file_and_a_tree_if_there(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("d/e/f.txt", "x")
    store.write_text("g.txt", "x")
    store.delete("g.txt")
    store.delete("g.txt")  # gone already: no error
    assert not (tmp_path / "g.txt").exists()
    store.delete_tree("d")
    store.delete_tree("d")
    assert not (tmp_path / "d").exists()


def test_paths_of_a_directory_store(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}/run/")
    assert store.url == str(tmp_path / "run") and store.name == "run"
    assert store.local == store.mirror == Path(store.location) == (tmp_path / "run").resolve()
    child = store.child("stages")
    assert isinstance(child, Store) and child.url == str(tmp_path / "run" / "stages") and child.name == "stages"
    assert repr(store) == f"Store({str(tmp_path / 'run')!r})"


def test_upload_is_a_no_op_and_download_copies_what_is_asked(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for rel in ("stage/adapter/w.safetensors", "stage/stage.json", "stage/.ckpt-1/x", "stage/cache/y"):
        store.write_text(rel, rel)
    assert store.upload(tmp_path / "store" / "stage", "elsewhere") == 0  # a directory store is its own mirror
    assert not store.exists("elsewhere")

    out = tmp_path / "out"
    store.download("stage", out, skip=(".ckpt",))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "adapter/w.safetensors", "cache/y", "stage.json"]
    only = tmp_path / "only"
    store.download("stage", only, only={"stage.json"})
    assert [p.name for p in only.iterdir()] == ["stage.json"]
    with pytest.raises(InputError, match="not found"):
        store.download("absent", tmp_path / "none")


def test_check_store_writes_a_probe_and_leaves_nothing(tmp_path: Path) -> None:
    check_store(Store(tmp_path))
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot write there"):
        check_store(Store(blocker / "run"))


def test_an_unknown_url_scheme_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no filesystem understands this URL"):
        Store("nosuchscheme://bucket/x")


def test_an_object_read_while_it_is_replaced_is_one_whole_version(s3) -> None:
    """An attempt log is rewritten while others read it (the autoscaling workflow's poll tore one): each read
    gives one whole version, never a prefix of a longer one. Before the fix, about one read in five tore here."""
    store = Store(f"s3://{BUCKET}/torn-read")
    versions = [["x" * (7 * i)] * (1 + i % 5) for i in range(12)]  # each a different length
    store.write_json("log.json", versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.write_json("log.json", versions[i % len(versions)])

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads, deadline = [], time.time() + 6
    try:
        while time.time() < deadline:
            reads.append(store.read_bytes("log.json"))
    finally:
        stop.set()
        writer.join()
    assert len(reads) > 50, "too few reads to have raced the writer"
    assert all(json.loads(r) in versions for r in reads)
