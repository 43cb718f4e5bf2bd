"""Docs that are generated must match the code, and shipped configs must validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from misalign.config import load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text().strip() == reference_markdown().strip(), (
        "regenerate with: python -m misalign.config > docs/config.md")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("trial-*.yaml")), ids=lambda p: p.name)
def test_shipped_trial_configs_validate(path):
    """A shipped trial config loads (load_config raises InputError on any invalid field), its stages validate
    as they train (with their method's defaults filled in), and it says how to launch it: with this file."""
    cfg = load_config(path)
    cfg.attack.resolved()  # raises where a method's default conflicts with a setting
    cfg.defense.resolved()
    assert f"# Launch:  misalign trial configs/{path.name}" in path.read_text(), (
        "each shipped config says how to launch it: with this file")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study-*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_validate(path):
    """A shipped study config loads, every cell of its grid builds a trial whose stages validate as they train,
    no two cells are the same trial, and it says how to launch it: with this file."""
    from misalign.config import StudyConfig
    from misalign.grid import cells

    cfg = load_config(path, schema=StudyConfig)
    grid = cells(cfg)
    for cell in grid:  # every cell's trial validates, its stages as they train
        trial = cell.trial_config(cfg)
        trial.attack.resolved()
        trial.defense.resolved()
    assert len({cell.id for cell in grid}) == len(grid), "no two cells of a shipped study are the same trial"
    text = path.read_text()
    assert "# Launch:" in text and f"misalign study run configs/{path.name}" in text, (
        "each shipped config says how to launch it: with this file")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("search-*.yaml")), ids=lambda p: p.name)
def test_shipped_search_configs_validate(path, world):
    """Every shipped search (the README advertises both) loads, names its kind, and each point of its space
    builds a trial whose data, eval sets, judge and model load."""
    from misalign.config import SearchConfig
    from misalign.preflight import check_search
    from misalign.search import optuna_space, point_trial

    cfg = load_config(path, schema=SearchConfig)
    assert cfg.kind in path.stem and f"misalign search {cfg.kind} configs/{path.name}" in path.read_text()
    assert optuna_space(cfg), "a search has something to search"
    side = cfg.searched
    for method in side.methods:
        for size in side.per_category:
            trial = point_trial(cfg, {"method": method, "per_category": size})
            stage = trial.attack if cfg.kind == "attack" else trial.defense
            assert (stage.method, stage.data.per_category) == (method, size)
    check_search(cfg, local=False)
