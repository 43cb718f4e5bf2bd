"""misalign.cache: the node cache's entries with their sizes and last use, and pruning the model mirrors and
object-store copies no run used for a while (never the world, digests or compiled ops)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from misalign.cache import PRUNED, describe, entries, note_store_use, note_use, prune, record
from misalign.storage import Store

DAY = 86400


def make(root: Path, rel: str, size: int, age_days: float = 0.0) -> Path:
    """A file of `size` bytes under root/rel, it and the directories above it inside the entry last modified
    `age_days` ago."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    inside = [root / d for d in path.relative_to(root).parents][:-2]  # directories below root/<kind>
    for p in [path, *inside]:
        age(p, age_days)
    return path


def age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A node cache: two model mirrors (one unused for 10 days), a store copy, the world, digests."""
    root = tmp_path / "cache"
    make(root, "models/old/w.safetensors", 100, age_days=10)
    note_use(root / "models" / "old", "s3://b/old", files=1)
    age(record(root / "models" / "old"), 10)
    make(root, "models/new/w.safetensors", 50, age_days=10)
    note_use(root / "models" / "new", "s3://b/new")  # used now, whatever its files' times
    make(root, "stores/abc/stages/s.json", 7, age_days=30)
    make(root, "world/key/base/config.json", 3, age_days=100)
    make(root, "digests/d1", 4, age_days=100)
    make(root, "digests/d2", 4, age_days=100)
    make(root, "models/.old.tmp/partial", 9)  # a download in progress: not an entry
    return root


def test_note_use_writes_a_record_once_then_touches_it(tmp_path: Path) -> None:
    entry = tmp_path / "models" / "m"
    entry.mkdir(parents=True)
    note_use(entry, "s3://b/m", files=3)
    assert record(entry) == tmp_path / "models" / "m.json"
    assert json.loads(record(entry).read_text()) == {"url": "s3://b/m", "files": 3}
    age(record(entry), 5)
    note_use(entry, "s3://b/other")
    assert json.loads(record(entry).read_text())["url"] == "s3://b/m"
    assert time.time() - record(entry).stat().st_mtime < 60


def test_a_directory_store_needs_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISALIGN_CACHE", str(tmp_path / "cache"))
    note_store_use(Store(tmp_path / "run"))
    assert not (tmp_path / "cache").exists()


def test_entries_list_each_kind_with_size_and_last_use(cache: Path) -> None:
    found = {(e.kind, e.path.name): e for e in entries(cache)}
    assert set(found) == {("model mirror", "new"), ("model mirror", "old"), ("object-store copy", "abc"),
                          ("world", "key"), ("digests", "digests")}
    assert found["model mirror", "old"].bytes == 100 and found["model mirror", "old"].source == "s3://b/old"
    assert found["digests", "digests"].bytes == 8  # one entry for many small files
    assert time.time() - found["model mirror", "new"].last_used < 60  # its record says when it was used
    assert time.time() - found["model mirror", "old"].last_used > 9 * DAY
    assert time.time() - found["object-store copy", "abc"].last_used > 29 * DAY  # no record: its files' times
    assert describe(found["model mirror", "old"], cache)["path"] == "models/old"


def test_prune_removes_only_unused_mirrors_and_copies(cache: Path) -> None:
    assert {"model mirror", "object-store copy"} == PRUNED
    planned = prune(7, dry_run=True, root=cache)
    assert sorted(e.path.name for e in planned) == ["abc", "old"]
    assert (cache / "models" / "old").exists()  # a dry run removes nothing
    removed = prune(7, root=cache)
    assert sorted(e.path.name for e in removed) == ["abc", "old"]
    assert not (cache / "models" / "old").exists() and not record(cache / "models" / "old").exists()
    assert not (cache / "stores" / "abc").exists()
    assert (cache / "models" / "new").exists() and (cache / "world" / "key").exists()
    assert (cache / "digests" / "d1").exists()  # old, but never pruned
    assert prune(7, root=cache) == []


def test_an_empty_cache_has_no_entries(tmp_path: Path) -> None:
    assert entries(tmp_path / "nothing") == [] and prune(0, root=tmp_path / "nothing") == []
