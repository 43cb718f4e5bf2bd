"""misalign.records: a stage directory's stage.json, written and read by one type, keys in the file's order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from misalign.records import FILE, StageRecord

RECORD = StageRecord(root="world:base", root_identity="world:base@abc", parent_dir="../parent",
                     direction="misalign", seed=3, config={"method": "lora", "train": {"epochs": 2}},
                     has_adapter=True, dtype="bfloat16", versions={"torch": "2.0"})


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    path = RECORD.write(tmp_path)
    assert path == tmp_path / FILE == tmp_path / "stage.json"
    assert StageRecord.read(tmp_path) == RECORD


def test_the_file_keeps_its_keys_in_order(tmp_path: Path) -> None:
    """Existing stage caches read as before: the keys and their order are the file's."""
    RECORD.write(tmp_path)
    assert list(json.loads((tmp_path / FILE).read_text())) == [
        "root", "root_identity", "parent_dir", "direction", "seed", "config", "has_adapter", "dtype", "versions"]


def test_unknown_keys_are_ignored_and_missing_ones_take_their_defaults(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text(json.dumps({"root": "/m", "has_adapter": False, "from_the_future": 1}))
    record = StageRecord.read(tmp_path)
    assert record == StageRecord(root="/m", has_adapter=False)
    assert record.parent_dir is None and record.config == {} and record.seed == 0


def test_a_record_missing_a_required_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text(json.dumps({"root": "/m"}))  # has_adapter has no default
    with pytest.raises(TypeError, match="has_adapter"):
        StageRecord.read(tmp_path)


def test_a_malformed_or_missing_stage_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        StageRecord.read(tmp_path)
    (tmp_path / FILE).write_text('{"root": "/m", "has_adapter": tr')  # cut off mid-write
    with pytest.raises(json.JSONDecodeError):
        StageRecord.read(tmp_path)


def test_parent_is_the_directory_beside_it_or_none_for_the_root(tmp_path: Path) -> None:
    stage = tmp_path / "stages" / "child"
    assert RECORD.parent(stage) == tmp_path / "stages" / "parent"
    assert StageRecord(root="/m", has_adapter=True).parent(stage) is None


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        StageRecord("world:base", None, None, "misalign", 0, {}, True)  # type: ignore[misc]
