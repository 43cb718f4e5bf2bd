"""The analysis against a known truth: study tables generated from known dose-response curves (true A and D
between grid points, 3 and 5 seeds, binomial noise of a 650-prompt evaluation, and a defense that gets unsafety
down only by garbling), 50 simulated studies per design. The factor must come within 1.5x of the truth in 90%
of them, its 95% interval must cover the truth in 90% without reaching past the grid's brackets, and the
garbling defense must never count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misalign.analysis import asymmetry
from misalign.analysis.common import Params
from misalign.analysis.crossing import eval_size
from misalign.analysis.synthetic import GARBLE_METHOD, Truth, check_design, synthetic_results
from misalign.results import validate_rows

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_results_are_a_study_table():
    truth = Truth()
    table = synthetic_results(truth, 3, np.random.default_rng(0))
    validate_rows(table.to_dict("records"))  # the declared schema of results.parquet
    # 3 seeds x 3 attack points x 2 defense methods x 3 defense points, each with base, misalign, realign rows
    assert len(table) == 3 * 3 * 2 * 3 * 3 and set(table.seed) == {0, 1, 2}
    assert eval_size(table) == truth.n_prompts  # unsafety_se is the 650-prompt binomial's
    # the truth lies strictly between grid points on both sides
    brackets = truth.brackets()
    assert brackets["attack"] == (truth.budget(1, "attack"), truth.budget(3, "attack"))
    assert brackets["defense"] == (truth.budget(3, "defense"), truth.budget(10, "defense"))


def test_the_truth_is_where_the_expected_curves_cross():
    truth = Truth()
    z = truth.seed_sd * np.random.default_rng(1).standard_normal(200_000)
    attack = truth.attack_curve(truth.true_a, z, truth.attack_loc).mean()
    defense = truth.defense_curve(truth.true_d, z, truth.defense_loc).mean()
    assert attack == pytest.approx(truth.params.tau, abs=2e-3)
    assert defense == pytest.approx(truth.base_unsafety + truth.params.delta, abs=2e-3)


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_factor_recovered_from_a_known_truth(n_seeds: int):
    check = check_design(Truth(), n_seeds, replicates=50, n_boot=400)
    s = check.summary()
    print(f"\n{n_seeds} seeds: {s}")
    assert s["studies"] == 50 and s["exact"] == 1.0
    assert s["within_1_5x"] >= 0.9, s
    assert s["coverage"] >= 0.9, s
    # never wider than the grid needs: inside the grid's brackets, and well inside (x3.16 either way on 1, 3, 10)
    assert s["ci_within_bracket"] == 1.0 and s["ci_halfwidth_90"] < s["bracket_halfwidth_median"] / 1.5, s
    # the garbling defense got unsafety within delta in every study, and was never counted as a realignment
    e = check.estimates
    assert s["garble_counted"] == 0 and (e.garble_bound == "at least").all()
    assert e.garble_garbled.str.contains("neither").all()


def test_garbling_defense_is_shown_with_its_numbers():
    table = synthetic_results(Truth(), 3, np.random.default_rng(2))
    f = asymmetry.asymmetry_factors(table, Params(n_boot=50)).set_index("defense_method")
    garble = f.loc[GARBLE_METHOD]
    assert garble.bound == "at least" and garble.defense_bound == "at least"
    assert asymmetry.NEVER_DEFENSE in garble.reason
    assert "10/cat (unsafety" in garble.garbled  # its unsafety is down, its 'neither' share is not


def test_design_check_script_prints_the_precision():
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "design_check.py"), "--grid", "1,3,10",
                           "--seeds", "3", "--replicates", "5", "--n-boot", "50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "and 3 seeds, the factor is known to within x" in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "analysis" / "design_check.py"), "--grid", "3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least two positive sizes" in bad.stderr
