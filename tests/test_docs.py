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
    cfg = load_config(path)
    assert cfg.attack.resolved().train.lr is not None
    assert "Launch:" in path.read_text(), "each shipped config says how to launch it"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study-*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_validate(path):
    from misalign.config import StudyConfig
    from misalign.grid import cells

    cfg = load_config(path, schema=StudyConfig)
    assert cells(cfg), "a study has cells"
    assert "Launch:" in path.read_text(), "each shipped config says how to launch it"
