"""misalign.analysis.curves: trajectories over the stages, unsafety by category, curves averaged over seeds
with error bars, and one panel per model, on hand-made tables (tests/analysis_tables.py). Was part of
tests/test_analysis.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from analysis_tables import one, study_table
from misalign.analysis import curves
from misalign.analysis.common import DPI, PANEL_H, PANEL_W, Params


def test_trajectories_follow_the_stages():
    traj = curves.trajectories(study_table(rounds=2, defense_sizes=(3,)))
    g = traj[traj.attack_point == "3/cat"]
    assert g.step.tolist() == [0, 1, 2, 3, 4]
    assert g.unsafety.tolist() == pytest.approx([0.0, 0.6, 0.02, 0.3, 0.02])


def test_per_category_after_misalign_and_realign():
    table = curves.per_category(study_table(seeds=(0, 1), defense_sizes=(3,)), Params())
    mis = one(table, phase="misalign", group="lora 10/cat")
    assert (mis.cat_a, mis.cat_b) == (pytest.approx(0.9), pytest.approx(0.45))
    re = one(table, phase="realign", group="lora 10/cat \u2192 lora 3/cat")
    assert re.cat_a == pytest.approx(0.3)
    assert table.phase.tolist()[0] == "base" and (table.phase == "base").sum() == 1
    assert table[table.phase == "misalign"].group.tolist() == ["lora 1/cat", "lora 3/cat", "lora 10/cat"]


def test_curves_average_seeds_with_error_bars():
    table = study_table(seeds=(0, 1), attack={("lora", 3): (100.0, 0.6, 0.8)})
    table.loc[(table.seed == 1) & (table.phase == "misalign"), "unsafety"] = 0.8
    c = one(curves.attack_curves(table, Params()), attack_point="3/cat")
    assert c.unsafety == pytest.approx(0.7) and c.n_seeds == 2
    assert c.unsafety_err == pytest.approx(np.std([0.6, 0.8], ddof=1) / np.sqrt(2))  # across seeds
    single = one(curves.attack_curves(table[table.seed == 0], Params()), attack_point="3/cat")
    assert single.unsafety_err == pytest.approx(0.02)  # the evaluation's own standard error


def test_two_models_give_two_panels(tmp_path: Path):
    table = pd.concat([study_table(model="a"), study_table(model="b")], ignore_index=True)
    f = curves.attack_figure(curves.attack_curves(table, Params()), Params(), tmp_path)
    assert matplotlib.image.imread(f["png"]).shape[:2] == (round(PANEL_H * DPI), round(2 * PANEL_W * DPI))
