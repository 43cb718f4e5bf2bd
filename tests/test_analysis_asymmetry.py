"""misalign.analysis.asymmetry: the asymmetry factor D/A between grid points, its bounds where the grid
does not bracket a threshold, garbled defenses, the utility-cost limit, its bootstrap interval over seeds, the
cost tables, the attack Pareto front, the eps-constrained attack and resistance, on hand-made tables with
known answers (tests/analysis_tables.py). Was part of tests/test_analysis.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis_tables import A_TRUE, D_TRUE, crossed, one, study_table
from misalign.analysis import asymmetry, curves
from misalign.analysis.common import Params


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
