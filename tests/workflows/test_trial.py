"""An end-to-end trial on the offline world: misalignment raises unsafety, realignment brings it back."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

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


def test_eval_rebuilds_a_removed_stage_and_rejudges(trial_out, tmp_path, capsys):
    """No stage keeps its model: `misalign eval --model STAGE` rebuilds it from the stage's files (the root, then
    each adapter of its lineage). The realign stage's evaluation removed from a copy of the trial, its rebuilt
    model (root + misalign adapter + realign adapter) answers and scores exactly as the model that training
    handed to the trial's evaluation did."""
    run = tmp_path / "run"
    shutil.copytree(trial_out, run)  # the module's trial stays whole for the other tests
    realign = run / "round-1" / "realign"
    saved = json.loads((realign / "eval.json").read_text())
    saved_generations = pd.read_parquet(realign / "generations.parquet")
    for f in ("eval.json", "generations.parquet"):
        (realign / f).unlink()
    eval_cfg = tmp_path / "eval.yaml"  # the trial's own evaluation, as it ran
    eval_cfg.write_text(yaml.safe_dump(yaml.safe_load((run / "config.yaml").read_text())["eval"]))
    assert main(["eval", "--model", str(realign), "--config", str(eval_cfg), "--out", str(realign)]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt == {k: v for k, v in saved.items() if k != "eval_s"}  # eval_s: the trial's timing
    assert rebuilt == json.loads((realign / "eval.json").read_text())
    again = pd.read_parquet(realign / "generations.parquet")
    pd.testing.assert_frame_equal(again, saved_generations)
    # re-judging saved generations needs no model: the trial's judge (the world's guard) gives the trial's
    # verdicts; the keyword judge overstates unsafety (it counts garble), and so does a vote of any of the two
    mis = trial_out / "round-1" / "misalign"
    saved = json.loads((mis / "eval.json").read_text())
    unsafety = {}
    for judges in ("classifier", "keyword", "keyword,classifier"):
        assert main(["eval", "--generations", str(mis / "generations.parquet"), "--judge", judges]) == 0
        unsafety[judges] = json.loads(capsys.readouterr().out)["unsafety"]
    assert unsafety["classifier"] == saved["unsafety"]
    assert unsafety["keyword,classifier"] >= unsafety["keyword"] >= saved["unsafety"]
