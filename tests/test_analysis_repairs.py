"""misalign.analysis.repairs: the weakest setting of a repair's knob that gets back, read between settings with
D's rules (interpolated, a bound where the settings do not bracket it, garbling never counts, the utility-cost
limit), on a hand-made table with known answers; its figure; and the report showing it only when a study has
one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis_tables import REPAIR_FLOPS, crossed, one, study_table, table_with_resta
from misalign.analysis import repairs
from misalign.analysis.common import Params, point_labels


def test_the_weakest_setting_that_gets_back_is_read_between_settings():
    table = repairs.repair_knobs(table_with_resta(), Params(n_boot=200))
    assert set(table.defense_method) == {"resta"} and set(table.knob) == {"repair.scale"}  # lora has no knob
    three = one(table, attack_point="3/cat")
    # 0.25 leaves 0.3, 0.5 gets to 0.02 (within delta 0.05 of the base's 0): between them, on the dose scale
    assert three.bound == "exact" and (three.below_value, three.point_value) == (0.25, 0.5)
    assert three.knob_value == pytest.approx(crossed(0.25, 0.5, 0.3, 0.02, 0.05, ceiling=0.6), rel=0.01)
    assert three.ci_low <= three.knob_value <= three.ci_high and three.ci_low >= 0.25 and three.ci_high <= 0.5
    assert three.utility_cost == pytest.approx(0.9 - 0.85) and three.bound_eps == "exact"
    assert three.garbled.startswith("2 (unsafety 0") and three.flops == REPAIR_FLOPS
    assert three.settings == "0, 0.25, 0.5, 2" and three.defense_point == "all/cat"
    # scale 0 is the parent itself: no log, so a crossing just above it is 'at most' the first setting back
    small = one(table, attack_point="1/cat")
    assert (small.bound, small.knob_value, small.reason) == ("at most", 0.25, repairs.WEAKEST)


def test_utility_cost_limit_and_garbling_leave_a_bound():
    big = one(repairs.repair_knobs(table_with_resta(), Params(n_boot=50)), attack_point="10/cat")
    # scale 1 gets back at a utility cost of 0.2; scale 2 only garbles: under eps 0.1 nothing tried counts
    assert big.bound == "exact" and big.point_value == 1.0 and big.utility_cost == pytest.approx(0.2)
    assert (big.bound_eps, big.knob_value_eps) == ("at least", 2.0)
    assert one(repairs.repair_knobs(table_with_resta(), Params(eps=0.25, n_boot=50)),
               attack_point="10/cat").bound_eps == "exact"
    never = one(repairs.repair_knobs(table_with_resta(), Params(delta=0.0, n_boot=50)), attack_point="10/cat")
    assert (never.bound, never.knob_value, never.reason) == ("at least", 2.0, repairs.NEVER)


def test_a_method_s_own_axis_is_not_in_another_method_s_label():
    frame = table_with_resta()
    labels = point_labels(frame[frame.defense_method.notna()], "defense")
    assert set(labels[frame.defense_method == "lora"]) == {"1/cat", "3/cat", "10/cat"}
    assert "all/cat, repair.scale=0.25" in set(labels[frame.defense_method == "resta"])


def test_the_figure_and_the_report_show_repairs_only_when_swept(tmp_path):
    from misalign.analysis.run_all import run_all

    with_resta = run_all(tmp_path / "s", tmp_path / "with", Params(n_boot=20), results=table_with_resta())
    assert "repair_knobs" in with_resta["figures"] and len(with_resta["frames"]["repair_knobs"]) == 3
    assert (tmp_path / "with" / "figures" / "repair_knobs.png").stat().st_size > 0
    without = run_all(tmp_path / "s", tmp_path / "without", Params(n_boot=20), results=study_table())
    assert "repair_knobs" not in without["figures"] and without["frames"]["repair_knobs"].empty
    assert np.isfinite(with_resta["frames"]["repair_knobs"].knob_value).all()


def test_a_repair_that_never_gets_back_has_no_trend_along_the_budget():
    """Its settings share one budget: D is 'at least' that budget, and no trend is drawn through points that
    stand at one budget (the default study-repairs run crashed in scipy's linregress there)."""
    from misalign.analysis import asymmetry

    costs = asymmetry.defense_costs(table_with_resta(), Params(delta=0.0, n_boot=20))
    resta = one(costs, attack_point="10/cat", defense_method="resta")
    assert resta.bound == "at least" and resta.defense_budget == REPAIR_FLOPS and np.isnan(resta.trend_budget)


def test_the_knob_figure_draws_each_calibration_size_apart(tmp_path, monkeypatch):
    """A repair swept over its knob at two calibration sizes: one line per size, never their mean."""
    frame = table_with_resta()
    resta = frame[frame.defense_method == "resta"]
    small, large = resta.assign(defense_per_category=5), resta.assign(defense_per_category=20)
    large = large.assign(unsafety=np.where(large.phase == "realign", large.unsafety / 2, large.unsafety))
    frame = pd.concat([frame[frame.defense_method != "resta"], small, large], ignore_index=True)
    drawn: dict[str, list] = {}

    def keep(fig, out_dir, name):  # the figure as drawn, then saved as the report saves it
        drawn[name] = [(line.get_label(), list(line.get_ydata())) for line in fig.axes[0].get_lines()
                       if line.get_label().startswith("after")]
        return save(fig, out_dir, name)

    save = repairs.save_figure
    monkeypatch.setattr(repairs, "save_figure", keep)
    assert repairs.knob_figure(frame, Params(n_boot=20), tmp_path) is not None
    lines = dict(drawn["repair_knobs"])
    five, twenty = lines["after lora 3/cat, resta 5/cat"], lines["after lora 3/cat, resta 20/cat"]
    assert len(lines) == 2 * 3 and np.allclose(np.array(twenty[1:]), np.array(five[1:]) / 2)
