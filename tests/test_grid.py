"""misalign.grid: the study grid's cells (configs/study-tiny.yaml: 40 cells, its comment says why), their
stable ids, and the stages the cells share (8 attack stages, 40 defense stages)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from misalign.config import StudyConfig, load_config
from misalign.grid import Cell, cells, stage_uses, unique_stages


@pytest.fixture(scope="module")
def study() -> StudyConfig:
    return load_config("configs/study-tiny.yaml", schema=StudyConfig)


def test_every_cell_of_the_grid_once(study: StudyConfig) -> None:
    grid = cells(study)
    # defense points (lora x 3 sizes + dpo x 2) x 1 model x 2 seeds x attack points (2 methods x 2 sizes)
    assert len(grid) == 5 * 1 * 2 * 4 == 40
    assert len({c.id for c in grid}) == 40
    assert {(c.attack["method"], c.attack["per_category"]) for c in grid} == {
        ("lora", 0.25), ("lora", 1), ("orpo", 0.25), ("orpo", 1)}
    assert Counter(c.defense["method"] for c in grid) == {"lora": 24, "dpo": 16}


def test_defense_points_are_outermost(study: StudyConfig) -> None:
    """Trials that start together have different attacks: the first 8 cells share one defense point."""
    grid = cells(study)
    assert len({json.dumps(c.defense, sort_keys=True) for c in grid[:8]}) == 1
    assert len({(c.seed, json.dumps(c.attack, sort_keys=True)) for c in grid[:8]}) == 8
    assert grid[8].defense != grid[0].defense


def test_a_cell_id_is_a_digest_of_its_axes() -> None:
    cell = Cell(model="world:base", seed=1, attack={"method": "lora", "per_category": 1},
                defense={"method": "dpo", "per_category": 3, "train.lr": 1e-4})
    assert cell.axes == {"model": "world:base", "seed": 1, "attack_method": "lora", "attack_per_category": 1,
                         "defense_method": "dpo", "defense_per_category": 3, "defense_train.lr": 1e-4}
    assert cell.id == hashlib.sha256(json.dumps(cell.axes, sort_keys=True).encode()).hexdigest()[:12]
    assert Cell.from_axes(cell.axes) == cell and Cell.from_axes(cell.axes).id == cell.id
    assert Cell.from_axes({**cell.axes, "seed": "1"}).id == cell.id  # a seed read back from a table as text
    assert Cell(model="world:base", seed=2, attack=cell.attack, defense=cell.defense).id != cell.id


def test_a_cells_trial_takes_its_points_and_the_studys_settings(study: StudyConfig) -> None:
    cell = next(c for c in cells(study) if c.defense["method"] == "dpo" and c.attack["method"] == "orpo")
    trial = cell.trial_config(study)
    assert (trial.model, trial.seed, trial.rounds) == ("world:base", cell.seed, 1)
    assert trial.attack.method == "orpo" and trial.attack.data.per_category == cell.attack["per_category"]
    assert trial.defense.method == "dpo" and trial.defense.data.benign_source == "world:benign"
    assert trial.eval == study.eval


def test_shared_stages_train_once(study: StudyConfig) -> None:
    uses = stage_uses(study)
    assert len(uses) == 40 * 2  # one attack and one defense per cell, 1 round
    unique = unique_stages(uses)
    phases = Counter(u.phase for u in unique.values())
    assert phases == {"misalign": 8, "realign": 40}  # 4 attack points x 2 seeds; every defense its own
    per_attack = Counter(u.key for u in uses if u.phase == "misalign")
    assert set(per_attack.values()) == {5}  # each attack is shared by the 5 defense cells that start from it
    first = {}
    for u in uses:
        first.setdefault(u.key, u)
    assert all(unique[k] is first[k] for k in first)  # the first use of each stage is the one that trains it
