"""misalign.plan_render: `misalign study plan`'s text says the plan's own numbers (the paper's study, planned
on the meta device in seconds: tests/test_plan.py checks the numbers themselves)."""

from __future__ import annotations

import math

import pytest

from misalign.config import StudyConfig, load_config
from misalign.plan import Plan, estimate
from misalign.plan_render import render, size_text


@pytest.fixture(scope="module")
def priced() -> Plan:
    study = load_config("configs/study-paper.yaml", schema=StudyConfig,
                        overrides=["plan.price_per_device_hour=2.5", "plan.devices_per_node=8"])
    return estimate(study)


def test_sizes_in_decimal_units() -> None:
    assert [size_text(n) for n in (0, 999, 1500, 2.5e9, 3e12, 1.234e6)] == [
        "0 B", "999 B", "1.5 KB", "2.5 GB", "3 TB", "1.23 MB"]


def test_the_head_says_the_grid_and_the_device(priced: Plan) -> None:
    lines = render(priced).splitlines()
    a = priced.axes
    assert lines[0] == (f"Study {priced.study}: {a['models']} model(s) x {a['seeds']} seed(s) x "
                        f"{a['attack_points']} attack points x {a['defense_points']} defense points = "
                        f"{priced.cells:,} cells, {a['rounds']} round(s) each")
    assert lines[1].startswith(f"Stages: {priced.stage_uses:,} uses in the cells, {priced.unique_stages:,} unique")
    assert lines[2].endswith("; 2.5 per device-hour")


def test_the_cost_tables_carry_the_totals_and_money(priced: Plan) -> None:
    out = render(priced)
    total = priced.shared["total"]
    row = next(line for line in out.splitlines() if line.startswith("  total"))  # the first: with sharing
    assert f"{total.runs:,}" in row and f"{total.money:,.2f}" in row
    saved = priced.unshared["total"].runs - priced.shared["total"].runs
    assert f"Sharing saves {saved:,} runs" in out


def test_the_width_table_names_the_nodes_of_the_shortest_wall_time(priced: Plan) -> None:
    best = priced.best_width
    nodes = math.ceil(int(best["slots"]) * priced.workers_per_trial / 8)
    assert f"at {int(best['slots']):,} trials at once ({nodes:,} node(s) of 8 device(s))" in render(priced)


def test_every_model_assumption_and_note_is_listed(priced: Plan) -> None:
    out = render(priced)
    assert priced.assumptions and priced.notes
    for model in priced.models:
        assert f"{model.model}: {model.total_params:,} params" in out
    for line in priced.assumptions + priced.notes:
        assert f"  - {line}" in out
    assert "Assumed (not measured" in out and "\nNotes:\n" in out


def test_no_price_no_money(priced: Plan) -> None:
    import dataclasses

    unpriced = dataclasses.replace(priced, price_per_device_hour=None)
    out = render(unpriced)
    assert "money" not in out and "per device-hour" not in out.splitlines()[2]
    assert "money" in render(priced)
