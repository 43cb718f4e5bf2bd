"""The analysis on hand-made results tables with known answers: the asymmetry factor and its bootstrap, Pareto
fronts, the epsilon-constrained attack, resistance, the realignment matrix, trajectories, categories, and the
figures and scripts (real matplotlib, real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy.special import logit

from misalign.analysis import asymmetry, crossing, curves, matrix
from misalign.analysis.common import DPI, PANEL_H, PANEL_W, Params, pareto_front
from misalign.analysis.run_all import FIGURES, run_all
from misalign.config import StageConfig
from misalign.ledger import Ledger
from misalign.results import build_row

ROOT = Path(__file__).resolve().parents[1]

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


# ---- the asymmetry factor ------------------------------------------------------------------------------------------

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


def test_asymmetry_factor_is_defense_over_attack_between_grid_points():
    f = one(asymmetry.asymmetry_factors(study_table(), Params(n_boot=200)))
    assert (f.attack_below_point, f.attack_point, f.defense_below_point, f.defense_point) == (
        "1/cat", "3/cat", "1/cat", "3/cat")
    # the evaluation's size (from unsafety_se) only softens the logit at 0 and 1: within 1% of the exact line
    assert f.attack_budget == pytest.approx(A_TRUE, rel=0.01) and 50 < f.attack_budget < 100
    assert f.defense_budget == pytest.approx(D_TRUE, rel=0.01) and 200 < f.defense_budget < 400
    assert f.factor == pytest.approx(f.defense_budget / f.attack_budget)
    assert (f.bound, f.attack_bound, f.defense_bound) == ("exact", "exact", "exact")
    assert (f.factor_bracket_low, f.factor_bracket_high) == (200 / 100, 400 / 50)  # what the grid alone says
    assert f.utility_cost == pytest.approx(0.9 - 0.82)
    # one seed: still an interval (evaluation noise and the grid), inside the bracket, and it says what it covers
    assert f.factor_bracket_low <= f.ci_low < f.factor < f.ci_high <= f.factor_bracket_high
    assert f.interval_covers.startswith("1 seed") and "not seed-to-seed" in f.interval_covers
    assert f.n_eval == 400 and f.reason == ""  # 0.2 * 0.8 / 0.02^2: the hand table's unsafety_se


def test_factor_follows_tau_delta_and_budget_kind():
    table = study_table()
    # tau 0.8: crossed between 3/cat (0.6) and 10/cat (0.9); only a 10/cat defense (800) undoes the 10/cat attack
    f = one(asymmetry.asymmetry_factors(table, Params(tau=0.8, n_boot=10)))
    a, d = crossed(100, 300, 0.6, 0.9, 0.8), crossed(400, 800, 0.3, 0.02, 0.05, ceiling=0.9)
    assert (f.attack_point, f.defense_point) == ("10/cat", "10/cat")
    assert f.factor == pytest.approx(d / a, rel=0.02)
    # in examples x epochs both sides cost 13 x size x 5: the same brackets (65 to 195), the factor is the ratio
    # of where in them each crossing lies
    f = one(asymmetry.asymmetry_factors(table, Params(budget="examples_x_epochs", n_boot=10)))
    assert f.factor == pytest.approx(crossed(65, 195, 0.3, 0.02, 0.05, ceiling=0.6) / crossed(65, 195, 0.2, 0.6, 0.5),
                                     rel=0.02)


def test_unbracketed_thresholds_give_bounds_with_their_reason():
    table = study_table()
    never = one(asymmetry.asymmetry_factors(table, Params(tau=0.95, n_boot=10)))
    assert np.isnan(never.factor) and never.bound == "undefined" and never.attack_bound == "at least"
    assert never.attack_budget == 300.0 and asymmetry.NEVER_ATTACK in never.reason
    # delta 0: nothing gets back to exactly the base (0.0; the best defense leaves 0.02): D >= 400 (the largest
    # defense budget tried on the 3/cat attack, 10/cat's 800) ... the factor is at least 800 / A
    stuck = one(asymmetry.asymmetry_factors(table, Params(delta=0.0, n_boot=100)))
    assert (stuck.defense_bound, stuck.bound) == ("at least", "at least")
    assert stuck.defense_budget == 800.0 and stuck.factor == pytest.approx(800.0 / A_TRUE, rel=0.01)
    assert asymmetry.NEVER_DEFENSE in stuck.reason and np.isinf(stuck.ci_high) and stuck.ci_low <= stuck.factor
    # where the grid ended, the trend of its last two points says how much further the defense would have to go:
    # nowhere for a plateau (3/cat and 10/cat both leave 0.02), past the grid for a falling curve (0.3 -> 0.02)
    assert np.isnan(stuck.defense_trend_budget)
    falling = one(asymmetry.asymmetry_factors(study_table(defense_sizes=(1, 3)), Params(delta=0.0, n_boot=10)))
    assert falling.defense_bound == "at least" and falling.defense_trend_budget > falling.defense_budget == 400.0
    # the smallest attack already past tau: A <= 50, the factor at least D / 50
    hot = study_table(attack={("lora", 1): (50.0, 0.7, 0.85), ("lora", 3): (100.0, 0.9, 0.8)})
    f = one(asymmetry.asymmetry_factors(hot, Params(n_boot=100)))
    assert (f.attack_bound, f.attack_budget, f.bound) == ("at most", 50.0, "at least")
    assert f.factor == pytest.approx(f.defense_budget / 50.0) and asymmetry.SMALLEST_ATTACK in f.reason
    # the smallest defense already back: D <= 400, the factor at most 400 / A
    easy = one(asymmetry.asymmetry_factors(study_table(defense_sizes=(3, 10)), Params(n_boot=100)))
    assert (easy.defense_bound, easy.defense_budget, easy.bound) == ("at most", 400.0, "at most")
    assert easy.factor == pytest.approx(400.0 / A_TRUE, rel=0.01) and asymmetry.SMALLEST_DEFENSE in easy.reason
    assert np.isnan(easy.defense_trend_budget) and np.isnan(f.defense_trend_budget)  # only where D is 'at least'


def test_garbled_defense_points_never_count():
    table = study_table()
    # the 3/cat LoRA defense gets unsafety to 0.02 by garbling: 'neither' 0.8 against the base's 0
    garble = (table.phase == "realign") & (table.defense_per_category == 3)
    table.loc[garble, "neither"] = 0.8
    f = one(asymmetry.asymmetry_factors(table, Params(n_boot=100)))
    assert f.garbled == "3/cat (unsafety 0.02, neither 0.8)"
    # D now lies between the garbled 3/cat point (a failure) and 10/cat, which is back with refusal
    assert (f.defense_below_point, f.defense_point, f.defense_bound) == ("3/cat", "10/cat", "exact")
    assert 400 < f.defense_budget <= 800 and f.ci_low >= 400 / 100
    status = curves.defense_curves(table, Params())
    at = status[status.defense_point == "3/cat"].set_index("attack_point").status
    assert (at["1/cat"], at["3/cat"], at["10/cat"]) == ("garbled", "garbled", "not back")  # 10/cat: 0.3 left
    # a margin that allows 0.8 of garble counts it again (the rule is a stated parameter)
    loose = one(asymmetry.asymmetry_factors(table, Params(n_boot=10, neither_margin=0.9)))
    assert loose.defense_point == "3/cat" and loose.garbled == ""


def test_defense_under_a_utility_cost_limit_is_reported_beside_it():
    # every defense point costs 0.9 - 0.82 = 0.08 utility: within eps 0.1, not within 0.05
    f = one(asymmetry.asymmetry_factors(study_table(), Params(eps=0.05, n_boot=50)))
    assert f.defense_bound == "exact" and f.defense_budget == pytest.approx(D_TRUE, rel=0.01)
    assert (f.defense_bound_eps, f.defense_budget_eps, f.bound_eps) == ("at least", 800.0, "at least")
    assert f.factor_eps == pytest.approx(800.0 / f.attack_budget)
    same = one(asymmetry.asymmetry_factors(study_table(), Params(eps=0.1, n_boot=50)))
    assert same.defense_budget_eps == pytest.approx(same.defense_budget) and same.bound_eps == "exact"


def test_interval_covers_the_seeds_and_is_reproducible():
    # seeds whose defenses cost 300, 400, 500 x size / 3: the seed-mean defense budgets are those of seed 1
    # (133 at 1/cat, 400 at 3/cat)
    flops = {0: 300.0, 1: 400.0, 2: 500.0}
    table = study_table(seeds=(0, 1, 2), defense_flops=lambda seed, pc: flops[seed] * pc / 3)
    p = Params(n_boot=400, rng_seed=7)
    f = one(asymmetry.asymmetry_factors(table, p))
    assert f.n_seeds == 3 and f.interval_covers.startswith("3 seeds resampled")
    assert f.factor == pytest.approx(crossed(400 / 3, 400, 0.3, 0.02, 0.05, ceiling=0.6) / A_TRUE, rel=0.01)
    # wider than the evaluation noise alone (one seed), within what the grid brackets allow
    alone = one(asymmetry.asymmetry_factors(table[table.seed == 1], p))
    assert f.ci_low < alone.ci_low and alone.ci_high < f.ci_high
    # the resampled seeds' budgets move the brackets: 300/3 .. 500/3 at 1/cat, 300 .. 500 at 3/cat
    assert (100 / 3) / 100 <= f.ci_low < f.factor < f.ci_high <= 500 / 50
    again = one(asymmetry.asymmetry_factors(table, p))
    assert (again.ci_low, again.ci_high) == (f.ci_low, f.ci_high)  # fixed RNG seeds


def test_identical_seeds_never_give_a_zero_width_interval():
    # resampling identical seeds changes nothing; evaluation noise and the grid's coarseness still do
    f = one(asymmetry.asymmetry_factors(study_table(seeds=(0, 1, 2)), Params(n_boot=200)))
    assert f.ci_low < f.factor < f.ci_high and f.reason == "" and f.boot_undefined == 0.0
    # with no evaluation size (no unsafety_se) and one seed, the interpolation scales alone still give a width;
    # if nothing varied at all there would be no interval rather than a zero-width one
    table = study_table().assign(unsafety_se=np.nan)
    g = one(asymmetry.asymmetry_factors(table, Params(n_boot=50)))
    assert pd.isna(g.n_eval) and "no evaluation noise" in g.interval_covers and g.ci_low < g.ci_high


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


def test_costs_tables_agree_with_the_factor():
    table = study_table(defense_methods=("lora", "dpo"))
    p = Params(n_boot=10)
    att = one(asymmetry.attack_costs(table, p), attack_method="lora")
    assert (att.below_point, att.attack_point, att.bound, att.unsafety) == ("1/cat", "3/cat", "exact", 0.6)
    assert att.attack_budget == pytest.approx(A_TRUE, rel=0.01) and att.ci_low < att.attack_budget < att.ci_high
    d = asymmetry.defense_costs(table, p)
    assert d.attack_point.drop_duplicates().tolist() == ["1/cat", "3/cat", "10/cat"]  # natural order
    assert one(d, attack_point="3/cat", defense_method="dpo").defense_budget == pytest.approx(D_TRUE, rel=0.01)
    ten = one(d, attack_point="10/cat", defense_method="dpo")
    assert (ten.below_point, ten.defense_point) == ("3/cat", "10/cat") and 400 < ten.defense_budget < 800
    assert set(asymmetry.asymmetry_factors(table, p).defense_method) == {"lora", "dpo"}


# ---- Pareto, epsilon, resistance -----------------------------------------------------------------------------------

def test_pareto_front_two_objectives():
    t = pd.DataFrame({"budget": [1, 2, 3, 4, 4, 5, 6], "unsafety": [0.1, 0.5, 0.4, 0.9, 0.8, 0.9, np.nan]})
    front = pareto_front(t, minimize=["budget"], maximize=["unsafety"])
    assert front[["budget", "unsafety"]].values.tolist() == [[1, 0.1], [2, 0.5], [4, 0.9]]


def test_pareto_front_three_objectives_keeps_ties():
    t = pd.DataFrame({"name": list("abcdef"), "budget": [1, 2, 2, 3, 3, 2],
                      "unsafety": [0.5, 0.1, 0.1, 0.0, 0.2, 0.1], "utility": [0.9, 0.8, 0.7, 0.5, 0.6, 0.8]})
    front = pareto_front(t, minimize=["budget", "unsafety"], maximize=["utility"])
    assert sorted(front.name) == ["a", "b", "d", "f"]  # c and e are dominated by b; b and f tie


def test_attack_pareto_on_a_study():
    attack = {("lora", 3): (100.0, 0.6, 0.8), ("full", 3): (150.0, 0.5, 0.8), ("full", 10): (400.0, 0.95, 0.5)}
    front = asymmetry.attack_pareto(study_table(attack=attack), Params())
    assert front[["attack_method", "attack_point"]].values.tolist() == [["lora", "3/cat"], ["full", "10/cat"]]


def test_eps_constrained_strongest_attack():
    # base utility 0.9: lora 3/cat drops 0.05, full 3/cat 0.08, lora 10/cat 0.3
    attack = {("lora", 3): (100.0, 0.6, 0.85), ("lora", 10): (300.0, 0.9, 0.6), ("full", 3): (90.0, 0.7, 0.82)}
    table = study_table(attack=attack)
    best = one(asymmetry.eps_attack(table, Params(eps=0.1)))
    assert (best.attack_method, best.attack_point, best.unsafety) == ("full", "3/cat", 0.7)
    assert best.utility_drop == pytest.approx(0.08)
    assert one(asymmetry.eps_attack(table, Params(eps=0.06))).attack_method == "lora"
    assert one(asymmetry.eps_attack(table, Params(eps=0.5))).attack_point == "10/cat"
    none = one(asymmetry.eps_attack(table, Params(eps=0.01)))
    assert pd.isna(none.attack_point) and "eps" in none.reason
    by_method = asymmetry.eps_attack(table, Params(eps=0.1), by=("model", "attack_method"))
    assert one(by_method, attack_method="lora").unsafety == 0.6


def test_resistance_per_model_and_method():
    # model "tough" (base 0.1) moves to at most 0.14 under lora but to 0.8 under orpo
    tough = study_table(model="tough", base=(0.1, 0.9),
                        attack={("lora", 3): (100.0, 0.12, 0.9), ("lora", 10): (300.0, 0.14, 0.9),
                                ("orpo", 3): (100.0, 0.8, 0.9)})
    table = pd.concat([tough, study_table(model="soft")], ignore_index=True)
    res = asymmetry.resistance(table, Params(delta=0.05))
    assert one(res, model="tough", attack_method="lora").resistant
    assert one(res, model="tough", attack_method="lora").max_unsafety == pytest.approx(0.14)
    assert not one(res, model="tough", attack_method="orpo").resistant
    assert not one(res, model="soft", attack_method="lora").resistant
    assert not one(asymmetry.resistance(table, Params(delta=0.03)), model="tough", attack_method="lora").resistant


# ---- matrix, trajectories, categories, curves ----------------------------------------------------------------------

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


def test_trajectories_follow_the_stages():
    traj = curves.trajectories(study_table(rounds=2, defense_sizes=(3,)))
    g = traj[traj.attack_point == "3/cat"]
    assert g.step.tolist() == [0, 1, 2, 3, 4]
    assert g.unsafety.tolist() == pytest.approx([0.0, 0.6, 0.02, 0.3, 0.02])


def test_per_category_after_misalign_and_realign():
    table = curves.per_category(study_table(seeds=(0, 1), defense_sizes=(3,)), Params())
    mis = one(table, phase="misalign", group="lora 10/cat")
    assert (mis.cat_a, mis.cat_b) == (pytest.approx(0.9), pytest.approx(0.45))
    re = one(table, phase="realign", group="lora 10/cat \u2192 lora 3/cat")
    assert re.cat_a == pytest.approx(0.3)
    assert table.phase.tolist()[0] == "base" and (table.phase == "base").sum() == 1
    assert table[table.phase == "misalign"].group.tolist() == ["lora 1/cat", "lora 3/cat", "lora 10/cat"]


def test_curves_average_seeds_with_error_bars():
    table = study_table(seeds=(0, 1), attack={("lora", 3): (100.0, 0.6, 0.8)})
    table.loc[(table.seed == 1) & (table.phase == "misalign"), "unsafety"] = 0.8
    c = one(curves.attack_curves(table, Params()), attack_point="3/cat")
    assert c.unsafety == pytest.approx(0.7) and c.n_seeds == 2
    assert c.unsafety_err == pytest.approx(np.std([0.6, 0.8], ddof=1) / np.sqrt(2))  # across seeds
    single = one(curves.attack_curves(table[table.seed == 0], Params()), attack_point="3/cat")
    assert single.unsafety_err == pytest.approx(0.02)  # the evaluation's own standard error


# ---- figures and scripts -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("study")
    table = study_table(seeds=(0, 1), defense_methods=("lora", "dpo"), rounds=2)
    table.to_parquet(d / "results.parquet")
    return d


def test_run_all_writes_every_figure_and_table(study_dir: Path, tmp_path: Path):
    summary = run_all(study_dir, tmp_path, Params(n_boot=50))
    assert list(summary["figures"]) == list(FIGURES)
    for name, f in summary["figures"].items():
        png, svg = Path(f["png"]), Path(f["svg"])
        assert png.stat().st_size > 1000 and svg.stat().st_size > 1000, name
        image = matplotlib.image.imread(png)
        assert image.shape[:2] == (f["height_px"], f["width_px"]), name
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000]
    # one model: one panel of PANEL inches at DPI
    assert matplotlib.image.imread(summary["figures"]["attack_curves"]["png"]).shape[:2] == (
        round(PANEL_H * DPI), round(PANEL_W * DPI))
    for t in summary["tables"].values():
        assert Path(t["csv"]).exists() and Path(t["md"]).read_text().startswith("| ")
    saved = json.loads((tmp_path / "summary.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in summary.json is not strict JSON"))
    assert saved["headline"]["asymmetry"][0]["factor"] == pytest.approx(D_TRUE / A_TRUE, rel=0.01)
    assert saved["headline"]["asymmetry"][0]["bound"] == "exact"
    written = pd.read_csv(tmp_path / "tables" / "asymmetry.csv")
    assert {"attack_method", "defense_method", "factor", "bound", "ci_low", "ci_high"} <= set(written.columns)


def test_two_models_give_two_panels(tmp_path: Path):
    table = pd.concat([study_table(model="a"), study_table(model="b")], ignore_index=True)
    f = curves.attack_figure(curves.attack_curves(table, Params()), Params(), tmp_path)
    assert matplotlib.image.imread(f["png"]).shape[:2] == (round(PANEL_H * DPI), round(2 * PANEL_W * DPI))


@pytest.mark.parametrize("script", ["asymmetry", "curves", "matrix", "run_all"])
def test_scripts_run_from_anywhere(script: str, tmp_path: Path):
    study_table().to_parquet(tmp_path / "results.parquet")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / f"{script}.py"), str(tmp_path), "--out",
                           str(out), "--n-boot", "20"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list((out / "figures").glob("*.png")) and list((out / "tables").glob("*.csv"))


def test_script_says_what_is_missing(tmp_path: Path):
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "matrix.py"), str(tmp_path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no results.parquet" in done.stderr
