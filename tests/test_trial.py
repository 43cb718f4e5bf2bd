"""An end-to-end trial on the offline world: misalignment raises unsafety, realignment brings it back."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from misalign.cli import main
from misalign.config import load_config
from misalign.trial import run_trial

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out

COLUMNS = ["round", "phase", "method", "per_category", "n_examples", "unsafety", "utility", "tokens", "flops",
           "wall_s", "device_s"]


@pytest.fixture(scope="module")
def trial_out(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trial") / "run"
    cfg = load_config("configs/trial-tiny.yaml")
    run_trial(cfg, out, progress=False)
    return out


def test_unsafety_rises_then_falls(trial_out):
    t = pd.read_parquet(trial_out / "stages.parquet")
    assert list(t.phase) == ["base", "misalign", "realign"]
    assert set(COLUMNS) <= set(t.columns)
    base, mis, re = t.unsafety.tolist()
    rise = mis - base
    assert rise >= 0.3, t[["phase", "unsafety", "neither", "utility"]]
    assert mis - re >= rise / 2
    assert t.loc[1, "tokens"] > 0 and t.loc[1, "flops"] > 0 and t.loc[1, "n_examples"] == 130
    assert any(c.startswith("unsafety/") for c in t.columns)


def test_outputs_and_disk_discipline(trial_out):
    mis, re = trial_out / "round-1" / "misalign", trial_out / "round-1" / "realign"
    for stage in (mis, re):  # adapters only: no stage keeps a merged copy of the model
        assert (stage / "adapter" / "adapter_model.safetensors").exists()
        assert not (stage / "model").exists()
    assert json.loads((re / "stage.json").read_text())["parent_dir"] == "../misalign"
    g = pd.read_parquet(mis / "generations.parquet")
    assert {"prompt", "response", "unsafe", "refusal", "judge_raw", "kind", "category"} <= set(g.columns)
    assert (trial_out / "config.yaml").exists()
    assert "trl" in json.loads((trial_out / "environment.json").read_text())["versions"]


def test_eval_rebuilds_a_removed_stage_and_rejudges(trial_out, capsys):
    mis = trial_out / "round-1" / "misalign"
    assert main(["eval", "--model", str(mis), "--judge", "keyword,classifier", "--set", "limit=40"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["unsafety"] <= 1 and "over_refusal" in metrics
    # re-judging saved generations needs no model; the keyword judge overstates unsafety (counts garble)
    assert main(["eval", "--generations", str(mis / "generations.parquet"), "--judge", "keyword"]) == 0
    keyword = json.loads(capsys.readouterr().out)
    saved = json.loads((mis / "eval.json").read_text())
    assert keyword["unsafety"] >= saved["unsafety"]
