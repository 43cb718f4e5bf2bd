"""The one definition of what a stage cost, used by the search, the analysis and the report.

A budget is a column of the results table (or computed from columns), chosen by name:
    examples_x_epochs   training examples x epochs (the paper's "data size" axis, hardware-free)
    tokens              training tokens (padding excluded; the ledger counts them at the model's forward)
    flops               analytic training FLOPs (misalign.ledger)
    device_s            wall seconds x workers (what a cluster bills)
With a price per device-hour, `money` turns device-seconds into currency.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd

from misalign.results import DEVICE_S, EPOCHS, FLOPS, N_EXAMPLES, TOKENS

BudgetKind = Literal["examples_x_epochs", "tokens", "flops", "device_s"]
BUDGETS: dict[str, str] = {
    "examples_x_epochs": "training examples x epochs",
    TOKENS: "training tokens",
    FLOPS: "training FLOPs",
    DEVICE_S: "device-seconds",
}


def stage_budget(rows: pd.DataFrame, kind: str) -> pd.Series:
    """The budget of each stage row (base rows cost 0). Reused stages keep their cost: it is what the stage
    costs, whoever paid for it."""
    if kind not in BUDGETS:
        raise ValueError(f"unknown budget {kind!r}; known: {', '.join(BUDGETS)}")
    if kind == "examples_x_epochs":
        return rows[N_EXAMPLES].astype(float) * rows[EPOCHS].astype(float)
    return rows[kind].astype(float)


def money(device_s: float, price_per_device_hour: float | None) -> float | None:
    return None if price_per_device_hour is None else device_s / 3600 * price_per_device_hour
