"""misalign.grid: the cells of a study, their stages and the stages they share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from misalign.config import SearchConfig, StudyConfig
from misalign.errors import EXIT_INPUT_ERROR
from misalign.grid import cells, stage_uses, unique_stages

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
