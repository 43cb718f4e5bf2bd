"""misalign.budget: the budget kinds a stage's cost is measured in, read from results columns, and device
seconds priced as money. (tests/test_results.py checks the kinds against rows build_row makes.)"""

from __future__ import annotations

import typing

import pandas as pd
import pytest

from misalign.budget import BUDGETS, BudgetKind, money, stage_budget

ROWS = pd.DataFrame({"phase": ["base", "misalign", "realign"], "n_examples": [0, 39, 13], "epochs": [0.0, 5.0, 2.5],
                     "tokens": [0, 4000, 1000], "flops": [0.0, 2e12, 5e11], "device_s": [0.0, 20.0, 7.5]})


def test_the_kinds_are_the_literal_type_in_order() -> None:
    assert tuple(BUDGETS) == typing.get_args(BudgetKind) == ("examples_x_epochs", "tokens", "flops", "device_s")


@pytest.mark.parametrize(("kind", "expected"), [
    ("examples_x_epochs", [0.0, 195.0, 32.5]),  # 39 x 5, 13 x 2.5
    ("tokens", [0.0, 4000.0, 1000.0]),
    ("flops", [0.0, 2e12, 5e11]),
    ("device_s", [0.0, 20.0, 7.5]),
])
def test_each_kind_is_read_from_its_columns_as_floats(kind: str, expected: list[float]) -> None:
    got = stage_budget(ROWS, kind)
    assert got.dtype == float and got.tolist() == expected


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown budget 'dollars'; known: examples_x_epochs, tokens, flops"):
        stage_budget(ROWS, "dollars")


def test_money_is_device_hours_times_the_price() -> None:
    assert money(7200.0, 3.0) == 6.0  # 2 device-hours at 3 an hour
    assert money(900.0, 2.0) == 0.5
    assert money(7200.0, None) is None  # no price: no money line
    assert money(0.0, 3.0) == 0.0
