"""misalign.analysis.run_all: every figure and table written (real matplotlib), summary.json strict JSON with
the headline factor, and the analysis/ scripts run from anywhere (real subprocesses) or say what is missing. Was
part of tests/test_analysis.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from analysis_tables import A_TRUE, D_TRUE, study_table
from misalign.analysis.common import DPI, PANEL_H, PANEL_W, Params
from misalign.analysis.run_all import FIGURES, run_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("study")
    table = study_table(seeds=(0, 1), defense_methods=("lora", "dpo"), rounds=2)
    table.to_parquet(d / "results.parquet")
    return d


def test_run_all_writes_every_figure_and_table(study_dir: Path, tmp_path: Path):
    summary = run_all(study_dir, tmp_path, Params(n_boot=50))
    # every figure but the repairs' knob, which only a study sweeping a repair has (test_analysis_repairs.py)
    assert list(summary["figures"]) == [f for f in FIGURES if f != "repair_knobs"]
    for name, f in summary["figures"].items():
        png, svg = Path(f["png"]), Path(f["svg"])
        assert png.stat().st_size > 1000 and svg.stat().st_size > 1000, name
        image = matplotlib.image.imread(png)
        assert image.shape[:2] == (f["height_px"], f["width_px"]), name
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000]
    # one model: one panel of PANEL inches at DPI
    assert matplotlib.image.imread(summary["figures"]["attack_curves"]["png"]).shape[:2] == (
        round(PANEL_H * DPI), round(PANEL_W * DPI))
    for t in summary["tables"].values():
        assert Path(t["csv"]).exists() and Path(t["md"]).read_text().startswith("| ")
    saved = json.loads((tmp_path / "summary.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in summary.json is not strict JSON"))
    assert saved["headline"]["asymmetry"][0]["factor"] == pytest.approx(D_TRUE / A_TRUE, rel=0.01)
    assert saved["headline"]["asymmetry"][0]["bound"] == "exact"
    written = pd.read_csv(tmp_path / "tables" / "asymmetry.csv")
    assert {"attack_method", "defense_method", "factor", "bound", "ci_low", "ci_high"} <= set(written.columns)


@pytest.mark.parametrize("script", ["asymmetry", "curves", "matrix", "run_all"])
def test_scripts_run_from_anywhere(script: str, tmp_path: Path):
    study_table().to_parquet(tmp_path / "results.parquet")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / f"{script}.py"), str(tmp_path), "--out",
                           str(out), "--n-boot", "20"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list((out / "figures").glob("*.png")) and list((out / "tables").glob("*.csv"))


def test_script_says_what_is_missing(tmp_path: Path):
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "matrix.py"), str(tmp_path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no results.parquet" in done.stderr
