"""misalign.analysis.common: Pareto fronts over two and three objectives. Was part of tests/test_analysis.py."""

from __future__ import annotations

import numpy as np
import pandas as pd

from misalign.analysis.common import pareto_front


def test_pareto_front_two_objectives():
    t = pd.DataFrame({"budget": [1, 2, 3, 4, 4, 5, 6], "unsafety": [0.1, 0.5, 0.4, 0.9, 0.8, 0.9, np.nan]})
    front = pareto_front(t, minimize=["budget"], maximize=["unsafety"])
    assert front[["budget", "unsafety"]].values.tolist() == [[1, 0.1], [2, 0.5], [4, 0.9]]


def test_pareto_front_three_objectives_keeps_ties():
    t = pd.DataFrame({"name": list("abcdef"), "budget": [1, 2, 2, 3, 3, 2],
                      "unsafety": [0.5, 0.1, 0.1, 0.0, 0.2, 0.1], "utility": [0.9, 0.8, 0.7, 0.5, 0.6, 0.8]})
    front = pareto_front(t, minimize=["budget", "unsafety"], maximize=["utility"])
    assert sorted(front.name) == ["a", "b", "d", "f"]  # c and e are dominated by b; b and f tie


def test_a_swept_recipe_is_another_attack_with_its_own_curve():
    from analysis_tables import study_table
    from misalign.analysis.common import Params, attack_table, defense_rows

    harmful = study_table()
    benign = study_table().assign(unsafety=lambda f: f.unsafety.where(f.phase != "misalign", 0.01))
    both = pd.concat([harmful.assign(**{"attack_data.recipe": "harmful"}),
                      benign.assign(**{"attack_data.recipe": "benign", "cell_id": benign.cell_id + "-b"})])
    table = attack_table(both, Params())
    assert sorted(set(table.attack_method)) == ["lora", "lora (benign)"]
    assert set(table.attack_point) == {"1/cat", "3/cat", "10/cat"}  # the recipe is not a point of the curve
    assert (table[table.attack_method == "lora (benign)"].unsafety == 0.01).all()
    assert set(defense_rows(both, Params()).attack_method) == {"lora", "lora (benign)"}
