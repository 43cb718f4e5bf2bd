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
