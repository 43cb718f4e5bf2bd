"""misalign.analysis.crossing: where a dose-response curve crosses a threshold on every scale, its bounds,
the seed weights of the bootstrap, and the evaluation's size from unsafety and its standard error. Was part of
tests/test_analysis.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from misalign.analysis import crossing


def test_seed_weights_row_zero_is_the_point_estimate():
    w = crossing.seed_weights(3, 100, 0)
    assert w.shape == (101, 3) and (w[0] == 1).all() and (w.sum(axis=1) == 3).all()


def test_crossing_on_every_scale_and_the_bounds():
    # (1, 0.2) and (100, 0.8): symmetric about 0.5 on every scale, so each crosses at 10
    budget = np.array([[1.0], [100.0]])
    c = crossing.crossing(budget, [crossing.Criterion(np.array([[0.2], [0.8]]), np.array([0.5]), above=True)], 650)
    assert c.bound[0] == crossing.EXACT and c.budget[0] == pytest.approx([10.0] * len(crossing.LINKS))
    assert (c.lower[0], c.upper[0]) == (1.0, 100.0)
    hot = crossing.crossing(budget, [crossing.Criterion(np.array([[0.6], [0.8]]), np.array([0.5]), True)], 650)
    assert hot.bound[0] == crossing.AT_MOST and hot.range() == (0.0, 1.0)
    cold = crossing.crossing(budget, [crossing.Criterion(np.array([[0.1], [0.2]]), np.array([0.5]), True)], 650)
    assert cold.bound[0] == crossing.AT_LEAST and cold.range() == (100.0, np.inf)


def test_eval_size_from_unsafety_and_its_standard_error():
    rows = pd.DataFrame({"unsafety": [0.2, 0.0, 0.5], "unsafety_se": [np.sqrt(0.16 / 650), 0.0, np.sqrt(0.25 / 650)]})
    assert crossing.eval_size(rows) == 650
    assert crossing.eval_size(rows.assign(unsafety_se=np.nan)) is None
