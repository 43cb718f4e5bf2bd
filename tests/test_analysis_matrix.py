"""misalign.analysis.matrix: the realignment matrix (attack method x defense method) on a hand-made table
(tests/analysis_tables.py). Was part of tests/test_analysis.py."""

from __future__ import annotations

import pytest

from analysis_tables import one, study_table
from misalign.analysis import matrix
from misalign.analysis.common import Params


def test_realignment_matrix_values():
    attack = {("lora", 3): (100.0, 0.6, 0.8), ("full", 10): (300.0, 0.9, 0.6)}
    m = matrix.realignment_matrix(study_table(attack=attack, defense_methods=("lora", "dpo"),
                                              defense_sizes=(3, 10)), Params())
    lora = one(m, attack_method="lora", defense_method="dpo")
    # against lora 3/cat both defense sizes restore (0.02, 0.82)
    assert (lora.delta_unsafety, lora.delta_utility, lora.n_cells) == (pytest.approx(-0.58), pytest.approx(0.02), 2)
    full = one(m, attack_method="full", defense_method="lora")
    # against full 10/cat: the 3/cat defense leaves 0.3 (utility 0.75), the 10/cat one restores
    assert full.delta_unsafety == pytest.approx(((0.3 - 0.9) + (0.02 - 0.9)) / 2)
    assert full.delta_utility == pytest.approx(((0.75 - 0.6) + (0.82 - 0.6)) / 2)
    assert matrix.as_grid(m, "m", "delta_unsafety").shape == (2, 2)
