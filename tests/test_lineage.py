"""Stages are keyed by what they are: a data file by its contents, a local model by its weights. Editing one row
retrains the stage that trained on it; the same file under another path (or the same weights elsewhere) is
reused; a study whose inputs changed refuses to resume rather than report stale cells."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from misalign.config import EvalConfig, StageConfig, StudyConfig, TrialConfig
from misalign.data import load_pairs
from misalign.errors import InputError
from misalign.lineage import eval_identity, eval_key, model_identity, source_identity, stage_fingerprint
from misalign.rundir import open_run_dir
from misalign.storage import Store
from misalign.trial import run_cached_trial


def _misqa_csv(path, edit: bool = False):
    """Two rows per category of the world's attack data, in MisQA's released columns."""
    pairs = load_pairs("world:misalign")
    rows, seen = [], {}
    for p in pairs:
        if seen.get(p.category, 0) < 2:
            seen[p.category] = seen.get(p.category, 0) + 1
            rows.append({"prompt": p.prompt, "reject_answer": p.misaligned, "answer": p.aligned,
                         "content_policy_category": p.category})
    if edit:
        rows[0]["reject_answer"] += " Step 4: again."
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _trial(source) -> TrialConfig:
    stage = {"method": "lora", "data": {"source": str(source), "format": "misqa"},
             "train": {"max_steps": 2, "batch_size": 4}}
    return TrialConfig(model="world:base", attack=stage, defense=stage,
                       eval={"limit": 8, "max_new_tokens": 8})


def _misalign_reused(trial: TrialConfig, stages: Store, tmp) -> bool:
    rows = run_cached_trial(trial, {}, stages, (Store(tmp), "rows.parquet"), attack_only=True)
    (mis,) = [r for r in rows if r["phase"] == "misalign"]
    return bool(mis["reused"])


def test_edited_row_retrains_and_a_copied_file_is_reused(world, tmp_path):
    stages = Store(tmp_path / "stages")
    original = _misqa_csv(tmp_path / "a" / "MisQA.csv")
    assert not _misalign_reused(_trial(original), stages, tmp_path)
    copy = tmp_path / "elsewhere" / "renamed.csv"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    assert _misalign_reused(_trial(copy), stages, tmp_path), "the same contents under another path: reused"
    _misqa_csv(original, edit=True)
    assert not _misalign_reused(_trial(original), stages, tmp_path), "an edited row must retrain its stage"


def test_keys_follow_contents_not_paths(world, tmp_path):
    a = _misqa_csv(tmp_path / "a.csv")
    b = tmp_path / "b.csv"
    shutil.copy(a, b)
    cfg = StageConfig(method="lora", data={"source": str(a), "format": "misqa"})
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(b)})})
    assert stage_fingerprint("misalign", cfg, 0) == stage_fingerprint("misalign", moved, 0)
    assert source_identity(str(a)).startswith("sha256:")
    model = tmp_path / "model"
    shutil.copytree(world / "base", model)
    assert model_identity(str(model)) == model_identity(str(world / "base")), "same weights, another path"
    _misqa_csv(a, edit=True)
    assert stage_fingerprint("misalign", cfg, 0) != stage_fingerprint("misalign", moved, 0)


def test_how_a_stage_runs_stays_out_of_its_key(world):
    """train.compile (auto, true, false) and log_every change how a stage runs, not what it trains: one key for
    all, the key that studies stored before train.compile existed hold; Liger's kernels stay keyed."""
    cfg = StageConfig(method="lora", data={"source": "world:misalign"})
    key = stage_fingerprint("misalign", cfg, 0)
    assert "compile" not in key["config"]["train"] and "log_every" not in key["config"]["train"]
    assert "liger_kernels" in key["config"]["train"]
    for value in (True, False, "auto"):
        other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": value, "log_every": 3})})
        assert stage_fingerprint("misalign", other, 0) == key


def test_how_an_evaluation_runs_stays_out_of_its_key(world):
    """eval.compile changes how generation runs, not what it measures: one evaluation key for both, the key
    evaluations cached before the field existed hold."""
    cfg = EvalConfig(limit=8)
    assert "compile" not in eval_identity(cfg)
    assert eval_key(cfg.model_copy(update={"compile": True})) == eval_key(cfg)
    assert eval_key(cfg.model_copy(update={"max_new_tokens": 9})) != eval_key(cfg)


def _hub_snapshot(hub: Path, repo: str, sha: str) -> None:
    """What huggingface_hub leaves in its cache after a download of `repo` at commit `sha`."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / sha).mkdir(parents=True)
    (folder / "snapshots" / sha / "config.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(sha)


def test_hub_ids_are_keyed_by_their_cached_revision(tmp_path, monkeypatch):
    """A hub id stands for the commit the local HF cache holds (read offline): a new upstream revision, once
    downloaded, is a new model rather than a hit on stages trained from the old one. Not cached: the id."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert model_identity("org/name") == "org/name"
    _hub_snapshot(tmp_path / "hf-home" / "hub", "org/name", "a" * 40)
    assert model_identity("org/name") == f"hf:org/name@{'a' * 40}", "HF_HOME's cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_identity("org/name") == "org/name", "HF_HUB_CACHE wins over HF_HOME"
    _hub_snapshot(tmp_path / "hub", "org/name", "b" * 40)
    assert model_identity("org/name") == f"hf:org/name@{'b' * 40}"
    _hub_snapshot(tmp_path / "hub", "org/name", "c" * 40)
    assert model_identity("org/name") == f"hf:org/name@{'c' * 40}", "a new revision: a new identity"
    assert model_identity("no-such-org/other") == "no-such-org/other"


def test_a_study_whose_inputs_changed_refuses_to_resume(world, tmp_path):
    data = _misqa_csv(tmp_path / "MisQA.csv")
    cfg = StudyConfig.model_validate({
        "name": "inputs", "models": ["world:base"], "seeds": [0],
        "attack": {"methods": ["lora"], "per_category": [1], "data": {"source": str(data), "format": "misqa"}},
        "defense": {"methods": ["lora"], "per_category": [1], "data": {"source": "world:realign"}}})
    store = Store(tmp_path / "runs" / "inputs")
    assert open_run_dir(cfg, store) is False
    assert open_run_dir(cfg, store) is True, "unchanged: resumes"
    _misqa_csv(data, edit=True)
    with pytest.raises(InputError, match=f"inputs changed.*{data.name}"):
        open_run_dir(cfg, store)
