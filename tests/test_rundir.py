"""misalign.rundir: a run directory's layout on its store, and open_run_dir's create-or-resume check (the same
config and the same inputs by contents, or an input error that says what changed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from misalign.errors import InputError
from misalign.rundir import INPUTS, RunDir, input_identities, open_run_dir
from misalign.storage import Store


class Toy(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as the project's configs (misalign.config_base.Strict)

    name: str
    source: str
    epochs: int = 1


def test_a_study_directory_layout(tmp_path: Path) -> None:
    run = RunDir(Store(tmp_path / "study"))
    assert run.root == str(tmp_path / "study")
    assert run.stages.url == str(tmp_path / "study" / "stages")
    assert run.cell_file("abc") == "cells/abc.parquet"
    assert run.results == f"{tmp_path / 'study'}/results.parquet"
    assert not run.cell_done("abc")
    run.store.write_text(run.cell_file("abc"), "x")
    assert run.cell_done("abc") and not run.cell_done("abd")


def test_a_search_directory_layout_and_shared_stages(tmp_path: Path) -> None:
    shared = Store(tmp_path / "study" / "stages")
    run = RunDir(Store(tmp_path / "search"), shared_stages=shared)
    assert run.stages is shared
    assert run.point_file("p1") == "points/p1.parquet"
    assert (run.answer, run.trials) == ("answer.json", "trials.parquet")
    assert run.optuna_db == (tmp_path / "search").resolve() / "optuna.db"


def test_input_identities_key_files_by_contents(tmp_path: Path) -> None:
    data = tmp_path / "a.csv"
    data.write_text("prompt\nx\n")
    found = input_identities({"attack": {"data": {"source": str(data), "per_category": 3}},
                              "eval": {"harmful": "org/hub-set"}, "note": str(data)})
    assert list(found) == [str(data)] and found[str(data)].startswith("sha256:")  # a hub id stands for itself
    copy = tmp_path / "b.csv"
    copy.write_text("prompt\nx\n")
    assert input_identities({"source": str(copy)})[str(copy)] == found[str(data)]


def test_a_new_directory_is_created_and_a_rerun_resumes(tmp_path: Path) -> None:
    data = tmp_path / "a.csv"
    data.write_text("prompt\nx\n")
    cfg = Toy(name="s", source=str(data))
    store = Store(tmp_path / "study")
    assert open_run_dir(cfg, store) is False
    assert yaml.safe_load(store.read_text("study.yaml")) == cfg.model_dump(mode="json")
    assert list(store.read_json(INPUTS)) == [str(data)]
    assert open_run_dir(cfg, store) is True


def test_a_rerun_with_another_config_names_what_changed(tmp_path: Path) -> None:
    data = tmp_path / "a.csv"
    data.write_text("prompt\nx\n")
    store = Store(tmp_path / "search")
    open_run_dir(Toy(name="s", source=str(data)), store, "search.yaml")
    with pytest.raises(InputError, match=r"holds a different search \(changed: epochs\)"):
        open_run_dir(Toy(name="s", source=str(data), epochs=2), store, "search.yaml")


def test_a_study_saved_before_a_field_was_added_resumes(tmp_path: Path) -> None:
    """A study begun by an older version, whose config lacks a field added since with a default, resumes; one
    whose saved config names a field this version no longer has is refused, naming it."""
    data = tmp_path / "a.csv"
    data.write_text("prompt\nx\n")
    cfg = Toy(name="s", source=str(data))
    store = Store(tmp_path / "study")
    open_run_dir(cfg, store)
    older = cfg.model_dump(mode="json")
    del older["epochs"]
    store.write_text("study.yaml", yaml.safe_dump(older))
    assert open_run_dir(cfg, store) is True
    store.write_text("study.yaml", yaml.safe_dump({**older, "epochs": 1, "warmup": 3}))
    with pytest.raises(InputError, match=r"holds a different study \(changed: warmup\)"):
        open_run_dir(cfg, store)


def test_a_rerun_whose_input_file_changed_refuses_to_resume(tmp_path: Path) -> None:
    data = tmp_path / "a.csv"
    data.write_text("prompt\nx\n")
    cfg = Toy(name="s", source=str(data))
    store = Store(tmp_path / "study")
    open_run_dir(cfg, store)
    data.write_text("prompt\ny\n")
    with pytest.raises(InputError, match=f"these inputs changed since the study started: {data}"):
        open_run_dir(cfg, store)


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a study directory"):
        open_run_dir(Toy(name="s", source="x"), Store(tmp_path / "busy"))
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]  # nothing written
