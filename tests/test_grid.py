"""misalign.grid: the cells of a study, their stages and the stages they share: study-tiny's 40 cells (its
comment says why), their stable ids, defense points outermost, 8 attack stages and 40 defense stages; a
method's own sizes (per_method per_category) make its cells, and bad size lists name the field."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from misalign.config import SearchConfig, StudyConfig, load_config
from misalign.errors import EXIT_INPUT_ERROR
from misalign.grid import Cell, cells, stage_uses, unique_stages

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "study-tiny.yaml").read_text())


def _study(**defense: object) -> StudyConfig:
    d = yaml.safe_load(yaml.safe_dump(TINY))
    d["defense"].update(defense)
    return StudyConfig.model_validate(d)


def test_a_method_sweeps_its_own_sizes(world):
    study = _study(per_method={"dpo": {"per_category": [3, 10]}, "lora": {"train.lr": 1e-3}})
    points = [(c.defense["method"], c.defense["per_category"]) for c in cells(study) if c.seed == 0
              and c.attack == {"method": "lora", "per_category": 0.25}]
    assert points == [("lora", 3), ("lora", 10), ("lora", 20), ("dpo", 3), ("dpo", 10)]
    # the size list is an axis, not a stage field: the stage gets one size; the method's other overrides apply
    lora = study.defense.stage({"method": "lora", "per_category": 20})
    assert (lora.data.per_category, lora.train.lr) == (20, 1e-3)
    assert study.defense.stage({"method": "dpo", "per_category": 10}).data.per_category == 10
    uses = stage_uses(study)
    realign = [u for u in unique_stages(uses).values() if u.phase == "realign"]
    assert len(cells(study)) == 2 * 4 * 5 and len(realign) == 2 * 4 * 5


@pytest.mark.parametrize(("sizes", "message"), [
    ([], "per_method['dpo'].per_category: a non-empty list of sizes"),
    (10, "per_method['dpo'].per_category: a non-empty list of sizes"),
    ([3, 0], "per_method['dpo'].per_category: sizes must be > 0"),
    ([3, "ten"], "per_method['dpo'].per_category: sizes must be > 0"),
    ([3, 3], "per_method['dpo'].per_category: 3 is listed twice"),
])
def test_bad_method_sizes_name_the_field(sizes: object, message: str):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _study(per_method={"dpo": {"per_category": sizes}})


def test_a_search_refuses_method_sizes():
    d = yaml.safe_load((REPO / "configs" / "search-attack-tiny.yaml").read_text())
    d["attack"]["per_method"] = {"lora": {"per_category": [1, 2]}}
    with pytest.raises(ValueError, match="a search samples sizes from attack.per_category"):
        SearchConfig.model_validate(d)


def test_the_cli_exits_2_on_bad_method_sizes(tmp_path, capsys):
    from misalign.cli import main

    d = yaml.safe_load(yaml.safe_dump(TINY))
    d["defense"]["per_method"] = {"dpo": {"per_category": [3, -1]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["study", "plan", str(path)]) == EXIT_INPUT_ERROR
    assert "defense.per_method" in capsys.readouterr().err


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


def test_method_settings_for_a_method_not_swept_are_unused_and_a_typo_fails():
    """`--set defense.methods=[lora]` on a config whose per_method names dpo: dpo's entry is unused; a per_method
    key that names no method at all is a typo and fails, naming the known methods."""
    only_lora = _study(methods=["lora"], per_method={"dpo": {"per_category": [3, 10]}})
    assert {c.defense["method"] for c in cells(only_lora)} == {"lora"}
    with pytest.raises(ValueError, match="per_method\\['dop'\\]: no such method; known: lora"):
        _study(per_method={"dop": {"train.lr": 1e-4}})


def test_a_method_sweeps_its_own_axis(world):
    study = _study(methods=["lora", "resta"], per_method={"resta": {"grid": {"repair.scale": [0.25, 1.0]}}})
    points = [c.defense for c in cells(study) if c.seed == 0 and c.attack == {"method": "lora", "per_category": 0.25}]
    assert points == [{"method": "lora", "per_category": 3}, {"method": "lora", "per_category": 10},
                      {"method": "lora", "per_category": 20},
                      *({"method": "resta", "per_category": pc, "repair.scale": s} for pc in (3, 10, 20)
                        for s in (0.25, 1.0))]
    assert study.defense.stage(points[-1]).repair.scale == 1.0
    # a lora cell's id is what it was before resta joined: its axes did not change
    alone = _study(methods=["lora"])
    assert {c.id for c in cells(alone)} <= {c.id for c in cells(study)}


@pytest.mark.parametrize(("grid", "message"), [
    ({"repair.scale": []}, "per_method['resta'].grid['repair.scale'] has no values"),
    ({"repair.scale": [1, 1]}, "per_method['resta'].grid['repair.scale']: 1 is listed twice"),
    ({"scale": [1]}, "per_method['resta'].grid['scale']: axes are dotted stage fields"),
    ([0.5], "per_method['resta'].grid: a mapping of dotted stage fields"),
])
def test_bad_method_axes_name_the_field(grid: object, message: str):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _study(methods=["lora", "resta"], per_method={"resta": {"grid": grid}})


def test_a_method_axis_cannot_repeat_the_side_s():
    with pytest.raises(ValueError, match=r"per_method\['resta'\].grid\['repair.scale'\]: already an axis"):
        _study(methods=["lora", "resta"], grid={"repair.scale": [1.0]},
               per_method={"resta": {"grid": {"repair.scale": [0.5]}}})


def test_a_search_refuses_method_axes():
    d = yaml.safe_load((REPO / "configs" / "search-attack-tiny.yaml").read_text())
    d["attack"]["per_method"] = {"lora": {"grid": {"train.lr": [1e-3]}}}
    with pytest.raises(ValueError, match="a search samples its knobs from `space`"):
        SearchConfig.model_validate(d)
