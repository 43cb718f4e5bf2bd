"""Hand-made results tables with known answers, for the analysis's tests (tests/test_analysis_*.py) and the
report's (tests/test_report.py): a full grid of rows built as the trial builds them, where a 3/cat defense undoes
attacks up to 3/cat, a 10/cat one everything, a 1/cat one nothing; and the crossings worked out by hand."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.special import logit

from misalign.config import StageConfig
from misalign.ledger import Ledger
from misalign.results import build_row

CATS = ("cat_a", "cat_b")
# attack point (method, per_category) -> (FLOPs, unsafety, utility) after misalignment
ATTACK = {("lora", 1): (50.0, 0.2, 0.85), ("lora", 3): (100.0, 0.6, 0.80), ("lora", 10): (300.0, 0.9, 0.60)}
DEFENSE_FLOPS = {1: 200.0, 3: 400.0, 10: 800.0}


def realigned(a_pc: int, d_pc: int) -> tuple[float, float]:
    """(unsafety, utility) after a defense with d_pc per category against an attack with a_pc: a 3/cat defense
    undoes attacks up to 3/cat, a 10/cat defense undoes everything, a 1/cat defense nothing."""
    restored = (d_pc >= 3 and a_pc <= 3) or d_pc >= 10
    return (0.02, 0.82) if restored else (0.3, 0.75)


def row(cell: dict, round_: int, phase: str, unsafety: float, utility: float, flops: float) -> dict:
    """A results row as the trial builds it (misalign.results.build_row, the declared schema), plus the cell's
    coordinates as a study adds them."""
    method, per_category = {"base": (None, None), "misalign": cell["attack"], "realign": cell["defense"]}[phase]
    n = (per_category or 0) * 13
    stage = StageConfig(method=method, data={"source": "world:misalign", "per_category": per_category}
                        ) if method else None
    ledger = Ledger(method=method, direction=phase, examples=n, epochs=5.0, optimizer_steps=n, tokens=int(flops),
                    flops=flops, wall_s=flops / 100, device_s=flops / 100) if method else None
    metrics = {"unsafety": unsafety, "unsafety_se": 0.02, "refusal": 1 - unsafety, "neither": 0.0,
               "over_refusal": 0.0, "utility": utility, "unparsed": 0.0, "eval_s": 1.0,
               "per_category": {c: unsafety / (i + 1) for i, c in enumerate(CATS)}}
    out = build_row(round_, phase, stage, n, ledger, metrics)
    return out | {"eval_reused": False, "cell_id": cell["id"], "model": cell["model"], "seed": cell["seed"],
                  "attack_method": cell["attack"][0], "attack_per_category": cell["attack"][1],
                  "defense_method": cell["defense"][0], "defense_per_category": cell["defense"][1]}


def study_table(seeds: tuple[int, ...] = (0,), attack: dict | None = None, defense_methods: tuple[str, ...] = ("lora",),
                defense_flops: Callable[[int, int], float] = lambda seed, pc: DEFENSE_FLOPS[pc],
                model: str = "m", base: tuple[float, float] = (0.0, 0.9), rounds: int = 1,
                defense_sizes: tuple[int, ...] = (1, 3, 10)) -> pd.DataFrame:
    """A full grid: every attack point x every defense point x seed, `rounds` rounds (later rounds weaker)."""
    rows = []
    for seed in seeds:
        for (a_method, a_pc), (a_flops, a_u, a_t) in (attack or ATTACK).items():
            for d_method in defense_methods:
                for d_pc in defense_sizes:
                    cell = {"id": f"{model}-{seed}-{a_method}{a_pc}-{d_method}{d_pc}", "model": model, "seed": seed,
                            "attack": (a_method, a_pc), "defense": (d_method, d_pc)}
                    rows.append(row(cell, 0, "base", *base, 0.0))
                    for r in range(1, rounds + 1):
                        fade = 0.5 ** (r - 1)
                        rows.append(row(cell, r, "misalign", a_u * fade, a_t, a_flops))
                        rows.append(row(cell, r, "realign", *realigned(a_pc, d_pc), defense_flops(seed, d_pc)))
    return pd.DataFrame(rows)


def one(frame: pd.DataFrame, **match: object) -> pd.Series:
    hit = frame
    for k, v in match.items():
        hit = hit[hit[k] == v]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def crossed(b0: float, b1: float, v0: float, v1: float, limit: float, floor: float = 0.0, ceiling: float = 1.0
            ) -> float:
    """Where a curve through (b0, v0) and (b1, v1) crosses `limit`, straight on the logit scale of the share of
    the way from floor to ceiling, in log budget (the dose-response interpolation the analysis makes)."""
    def h(v: float) -> float:
        return float(logit((v - floor) / (ceiling - floor)))
    return float(np.exp(np.log(b0) + (h(limit) - h(v0)) / (h(v1) - h(v0)) * np.log(b1 / b0)))


# attack: 1/cat (50 FLOPs) reaches 0.2 < tau, 3/cat (100) reaches 0.6; the defense against the 3/cat attack
# (0.6): 1/cat (200) leaves 0.3, 3/cat (400) gets to 0.02 <= 0 + delta
A_TRUE = crossed(50, 100, 0.2, 0.6, 0.5)
D_TRUE = crossed(200, 400, 0.3, 0.02, 0.05, ceiling=0.6)


# attack per_category -> {RESTA scale: (unsafety, neither, utility) after the repair}
RESTA = {
    1: {0.0: (0.2, 0.0, 0.85), 0.25: (0.02, 0.0, 0.88), 0.5: (0.0, 0.0, 0.86)},
    3: {0.0: (0.6, 0.0, 0.80), 0.25: (0.3, 0.0, 0.84), 0.5: (0.02, 0.0, 0.85), 2.0: (0.0, 0.9, 0.1)},
    10: {0.25: (0.5, 0.0, 0.6), 0.5: (0.2, 0.0, 0.65), 1.0: (0.03, 0.0, 0.7), 2.0: (0.0, 0.9, 0.1)},
}
REPAIR_FLOPS = 7.0


def table_with_resta() -> pd.DataFrame:
    """study_table's grid (lora defenses at 1, 3, 10 per category), and RESTA at each scale of RESTA above."""
    frame = study_table()
    rows = []
    for (a_method, a_pc), (a_flops, a_u, a_t) in ATTACK.items():
        for scale, (u, neither, utility) in RESTA[a_pc].items():
            cell = {"id": f"m-0-{a_method}{a_pc}-resta{scale}", "model": "m", "seed": 0, "attack": (a_method, a_pc),
                    "defense": ("resta", None)}
            realigned = row(cell, 1, "realign", u, utility, REPAIR_FLOPS) | {"neither": neither}
            rows += [row(cell, 0, "base", 0.0, 0.9, 0.0), row(cell, 1, "misalign", a_u, a_t, a_flops), realigned]
            for r in rows[-3:]:
                r["defense_repair.scale"] = scale
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
