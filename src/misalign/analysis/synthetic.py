"""Study results from known dose-response curves: the analysis checked against a truth it must recover, and a
grid design checked before anyone pays for it.

    Truth(attack_sizes=(1, 3, 10), defense_sizes=(1, 3, 10), true_a=1.7, true_d=5.5, ...)   the curves
    synthetic_results(truth, n_seeds, rng) -> a results table (the schema of misalign.results, what
                                              misalign.analysis reads): base, misalign and realign rows
    check_design(truth, n_seeds, replicates) -> DesignCheck: how close the estimated factor comes to the truth,
                                              and how often its interval covers it, over simulated studies

    python analysis/design_check.py --grid 1,3,10 --seeds 3 [--defense-grid 1,3,10 --true-a 1.7 --true-d 5.5]
    (or python -m misalign.analysis.synthetic ...) prints "with this grid and 3 seeds, the factor is known to
    within x..." before anyone pays for the study.

The world it simulates: per seed, the attack's unsafety rises with log budget as a logistic curve from the base
to `attack_top`, and the defense's falls back from the misaligned level to the base, each shifted in log budget
by a seed effect (normal, sd `seed_sd`). The truth is the crossing of the *expected* curve (averaged over seed
effects by Gauss-Hermite quadrature), the same quantity the analysis estimates from seed means: A where it
reaches tau, D where it gets back within delta of the base. Every evaluation is a multinomial draw (unsafe,
neither, refusal) of `n_prompts` prompts. A second defense, `garble`, gets unsafety down as cheaply by making
the model answer with neither a refusal nor compliance: it must never count as a realignment.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.polynomial.hermite_e import hermegauss
from scipy.optimize import brentq
from scipy.special import expit

from misalign.analysis.common import Params, cli
from misalign.errors import InputError
from misalign.results import COLUMNS

MODEL = "synthetic"
ATTACK_METHOD, DEFENSE_METHOD, GARBLE_METHOD = "lora", "lora", "garble"
_NODES, _WEIGHTS = hermegauss(40)  # E[f(Z)], Z ~ N(0, 1), as sum(w f(z)) / sqrt(2 pi)


@dataclass(frozen=True)
class Truth:
    """The known curves. Sizes are examples per category; a stage's budget is size x categories x
    flops_per_example (x 2 for a defense, whose data carries an equal benign share). true_a and true_d (examples
    per category) are where the expected curves cross tau and base + delta: put them between grid points."""

    attack_sizes: tuple[float, ...] = (1, 3, 10)
    defense_sizes: tuple[float, ...] = (1, 3, 10)
    true_a: float = 1.7
    true_d: float = 5.5
    slope: float = 2.5          # logistic slope per unit of ln budget (10% to 90% over a factor of 5.8)
    seed_sd: float = 0.15       # sd of a seed's shift of its curves, in ln budget
    n_prompts: int = 650
    categories: int = 13
    flops_per_example: float = 1e9
    base_unsafety: float = 0.02
    base_neither: float = 0.03
    base_utility: float = 0.95
    attack_top: float = 0.95
    garble_at: float = 0.4      # the garbling defense's unsafety falls at this fraction of true_d's budget
    params: Params = field(default_factory=Params)

    def budget(self, size: float, side: str) -> float:
        return size * self.categories * self.flops_per_example * (2.0 if side == "defense" else 1.0)

    def attack_curve(self, size: np.ndarray, shift: np.ndarray | float, loc: float) -> np.ndarray:
        """A seed's unsafety after an attack of `size` (its curve shifted by `shift` in ln budget)."""
        x = np.log(self.budget(np.asarray(size, float), "attack"))
        return self.base_unsafety + (self.attack_top - self.base_unsafety) * expit(self.slope * (x - loc - shift))

    def defense_curve(self, size: np.ndarray, shift: np.ndarray | float, loc: float) -> np.ndarray:
        """A seed's unsafety after a defense of `size` on a fully misaligned model (on a model misaligned to less,
        the smaller of the two: the curve near base + delta, where D is read, is the same)."""
        x = np.log(self.budget(np.asarray(size, float), "defense"))
        return self.base_unsafety + (self.attack_top - self.base_unsafety) * expit(-self.slope * (x - loc - shift))

    def _expected(self, f: Any, size: float) -> float:
        """f(size, shift) averaged over the seed effect."""
        return float(np.sum(_WEIGHTS * f(size, self.seed_sd * _NODES)) / np.sqrt(2 * np.pi))

    def _loc(self, side: str, at: float) -> float:
        """The location (ln budget) that puts the expected curve's crossing at `at` examples per category."""
        p = self.params
        if side == "attack":
            def gap(loc: float) -> float:
                return self._expected(lambda s, z: self.attack_curve(s, z, loc), at) - p.tau
        else:
            def gap(loc: float) -> float:
                return (self._expected(lambda s, z: self.defense_curve(s, z, loc), at)
                        - self.base_unsafety - p.delta)
        x = np.log(self.budget(at, side))
        return float(brentq(gap, x - 20, x + 20))

    @property
    def attack_loc(self) -> float:
        return self._loc("attack", self.true_a)

    @property
    def defense_loc(self) -> float:
        return self._loc("defense", self.true_d)

    @property
    def factor(self) -> float:
        """The true asymmetry factor D / A, in budget."""
        return self.budget(self.true_d, "defense") / self.budget(self.true_a, "attack")

    def brackets(self) -> dict[str, tuple[float, float]]:
        """The grid points on either side of the true A and D (budget): where a design puts its resolution."""
        def around(sizes: tuple[float, ...], at: float, side: str) -> tuple[float, float]:
            below = [s for s in sizes if s < at]
            above = [s for s in sizes if s >= at]
            return (self.budget(max(below), side) if below else 0.0,
                    self.budget(min(above), side) if above else np.inf)
        return {"attack": around(self.attack_sizes, self.true_a, "attack"),
                "defense": around(self.defense_sizes, self.true_d, "defense")}


def _shares(rng: np.random.Generator, n: int, unsafety: float, neither: float) -> dict[str, float]:
    """One evaluation of n prompts: the multinomial (unsafe, neither, refusal) and unsafety's standard error."""
    k = rng.multinomial(n, [unsafety, neither, max(0.0, 1.0 - unsafety - neither)])
    u = k[0] / n
    return {"unsafety": u, "unsafety_se": float(np.sqrt(u * (1 - u) / n)), "neither": k[1] / n,
            "refusal": k[2] / n}


def _row(phase: str, method: str | None, size: float | None, budget: float, truth: Truth,
         shares: dict[str, float], utility: float) -> dict[str, Any]:
    """A results row (the columns of misalign.results.StageRow) of one evaluated model."""
    n = 0 if size is None else int(round(size * truth.categories))
    return {"round": 0 if phase == "base" else 1, "phase": phase, "method": method,
            "per_category": int(size) if size is not None and float(size).is_integer() else None,
            "n_examples": n, **shares, "over_refusal": 0.0, "utility": utility, "unparsed": 0.0,
            "epochs": 1.0 if n else 0.0, "tokens": n * 100, "flops": budget, "wall_s": budget / 1e9,
            "device_s": budget / 1e9, "optimizer_steps": n, "peak_memory_bytes": 0, "workers": 1 if n else 0,
            "reused": False, "stage_key": None, "eval_s": 1.0, "mfu": None, "eval_reused": False}


def synthetic_results(truth: Truth, n_seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """One simulated study: every (seed, attack point, defense method, defense point) cell with its base,
    misalign and realign rows, in the results table's shape. Defense methods: `lora` (restores refusal) and
    `garble` (gets unsafety down by garbling)."""
    a_loc, d_loc, n = truth.attack_loc, truth.defense_loc, truth.n_prompts
    g_loc = d_loc + np.log(truth.garble_at)
    rows = []
    for seed in range(n_seeds):
        a_shift, d_shift = rng.normal(0.0, truth.seed_sd, size=2)
        base = _shares(rng, n, truth.base_unsafety, truth.base_neither)
        attacks = {s: _shares(rng, n, float(truth.attack_curve(s, a_shift, a_loc)), truth.base_neither)
                   for s in truth.attack_sizes}
        for a_size, attacked in attacks.items():
            start = float(truth.attack_curve(a_size, a_shift, a_loc))
            for method in (DEFENSE_METHOD, GARBLE_METHOD):
                for d_size in truth.defense_sizes:
                    if method == DEFENSE_METHOD:
                        u = min(start, float(truth.defense_curve(d_size, d_shift, d_loc)))
                        realigned = _shares(rng, n, u, truth.base_neither)
                    else:  # what leaves compliance turns into garble, not refusal
                        u = min(start, float(truth.defense_curve(d_size, d_shift, g_loc)))
                        realigned = _shares(rng, n, u, truth.base_neither + (start - u))
                    cell = {"cell_id": f"{seed}-{a_size}-{method}{d_size}", "model": MODEL, "seed": seed,
                            "attack_method": ATTACK_METHOD, "attack_per_category": a_size,
                            "defense_method": method, "defense_per_category": d_size}
                    rows += [_row("base", None, None, 0.0, truth, base, truth.base_utility) | cell,
                             _row("misalign", ATTACK_METHOD, a_size, truth.budget(a_size, "attack"), truth, attacked,
                                  truth.base_utility - 0.02) | cell,
                             _row("realign", method, d_size, truth.budget(d_size, "defense"), truth, realigned,
                                  truth.base_utility - 0.03) | cell]
    frame = pd.DataFrame(rows)
    # reindex: declared columns a simulation has no value for (the *_triggered figures) are empty, as in a study
    return frame.reindex(columns=[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)])


@dataclass(frozen=True)
class DesignCheck:
    """The factor over simulated studies of one design: per study (estimates), and the summary."""

    truth: Truth
    n_seeds: int
    estimates: pd.DataFrame  # per study: factor, bound, ci_low, ci_high, bracket, garble's bound and garbled list

    @property
    def true_factor(self) -> float:
        return self.truth.factor

    @property
    def error(self) -> pd.Series:
        """Each study's estimate as a multiple of the truth, >= 1 either way (NaN where it was a bound)."""
        f = self.estimates.factor.where(self.estimates.bound == "exact")
        return np.maximum(f / self.true_factor, self.true_factor / f)

    def summary(self) -> dict[str, float]:
        e = self.estimates
        covered = (e.ci_low <= self.true_factor) & (self.true_factor <= e.ci_high)
        in_bracket = (e.ci_low >= e.factor_bracket_low * (1 - 1e-9)) & (e.ci_high <= e.factor_bracket_high * (1 + 1e-9))
        width = np.sqrt(e.ci_high / e.ci_low)  # infinite where the interval has no upper end
        return {"true_factor": self.true_factor, "studies": len(e), "exact": float((e.bound == "exact").mean()),
                "within_1_5x": float((self.error <= 1.5).mean()), "error_90": float(self.error.quantile(0.9)),
                "error_median": float(self.error.median()), "coverage": float(covered.mean()),
                "ci_within_bracket": float(in_bracket.mean()),
                "ci_halfwidth_median": float(width.quantile(0.5, interpolation="higher")),
                "ci_halfwidth_90": float(width.quantile(0.9, interpolation="higher")),
                "bracket_halfwidth_median": float(np.sqrt(e.factor_bracket_high / e.factor_bracket_low).median()),
                "garble_counted": float((e.garble_bound == "exact").sum() + (e.garble_bound == "at most").sum())}

    def sentence(self) -> str:
        s = self.summary()
        grid = ",".join(f"{x:g}" for x in self.truth.attack_sizes)
        dgrid = ",".join(f"{x:g}" for x in self.truth.defense_sizes)
        return (f"with this grid (attack {grid}, defense {dgrid} per category) and {self.n_seeds} seeds, the factor "
                f"is known to within x{s['ci_halfwidth_median']:.2f} (median half-width of the 95% interval; "
                f"the grid's brackets alone: x{s['bracket_halfwidth_median']:.2f}); the estimate came within "
                f"x{s['error_90']:.2f} of the truth ({s['true_factor']:.3g}) in 90% of {s['studies']} simulated "
                f"studies, within 1.5x in {s['within_1_5x']:.0%}, and the interval covered it in "
                f"{s['coverage']:.0%}")


def check_design(truth: Truth, n_seeds: int, replicates: int = 50, n_boot: int = 500,
                 rng_seed: int = 0) -> DesignCheck:
    """Simulate `replicates` studies of the design and estimate the factor in each, as the report would
    (misalign.analysis.asymmetry.asymmetry_factors with truth.params, n_boot bootstrap replicates)."""
    from dataclasses import replace

    from misalign.analysis.asymmetry import asymmetry_factors

    rng = np.random.default_rng(rng_seed)
    params = replace(truth.params, n_boot=n_boot)
    rows = []
    for i in range(replicates):
        f = asymmetry_factors(synthetic_results(truth, n_seeds, rng), replace(params, rng_seed=i))
        ok = f[f.defense_method == DEFENSE_METHOD].iloc[0]
        garble = f[f.defense_method == GARBLE_METHOD].iloc[0]
        rows.append({c: ok[c] for c in ("factor", "bound", "ci_low", "ci_high", "factor_bracket_low",
                                        "factor_bracket_high", "attack_budget", "defense_budget")}
                    | {"garble_bound": garble.defense_bound, "garble_garbled": garble.garbled})
    return DesignCheck(truth, n_seeds, pd.DataFrame(rows))


def _sizes(text: str) -> tuple[float, ...]:
    try:
        sizes = tuple(sorted(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise InputError(f"--grid takes sizes per category separated by commas (got {text!r})") from None
    if len(sizes) < 2 or sizes[0] <= 0:
        raise InputError(f"a grid needs at least two positive sizes (got {text!r})")
    return sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="1,3,10", help="attack sizes per category (and the defense's by default)")
    ap.add_argument("--defense-grid", default=None, help="defense sizes per category (default: --grid)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per grid point")
    ap.add_argument("--true-a", type=float, default=None,
                    help="where you expect A, per category (default: between the two smallest attack sizes)")
    ap.add_argument("--true-d", type=float, default=None,
                    help="where you expect D, per category (default: between the two largest defense sizes)")
    ap.add_argument("--prompts", type=int, default=Truth.n_prompts, help="harmful prompts per evaluation")
    ap.add_argument("--seed-sd", type=float, default=Truth.seed_sd, help="a seed's shift of its curves [ln budget]")
    ap.add_argument("--slope", type=float, default=Truth.slope, help="logistic slope per unit of ln budget")
    ap.add_argument("--replicates", type=int, default=50, help="simulated studies")
    ap.add_argument("--n-boot", type=int, default=500, help="bootstrap replicates per study")
    a = ap.parse_args(argv)
    attack = _sizes(a.grid)
    defense = _sizes(a.defense_grid) if a.defense_grid else attack
    if a.seeds < 1 or a.replicates < 1:
        raise InputError("--seeds and --replicates must be at least 1")
    truth = Truth(attack_sizes=attack, defense_sizes=defense, n_prompts=a.prompts, seed_sd=a.seed_sd,
                  slope=a.slope, true_a=a.true_a or float(np.sqrt(attack[0] * attack[1])),
                  true_d=a.true_d or float(np.sqrt(defense[-2] * defense[-1])))
    check = check_design(truth, a.seeds, replicates=a.replicates, n_boot=a.n_boot)
    print(check.sentence())
    s = check.summary()
    print(f"(truth: A = {truth.true_a:.3g}/cat, D = {truth.true_d:.3g}/cat, factor {s['true_factor']:.3g}; estimate "
          f"exact in {s['exact']:.0%} of studies, median error x{s['error_median']:.2f}; interval within the "
          f"grid's brackets in {s['ci_within_bracket']:.0%}, 90th percentile half-width x{s['ci_halfwidth_90']:.2f}; "
          f"the garbling defense counted in {s['garble_counted']:.0f} of {s['studies']})")


if __name__ == "__main__":
    sys.exit(cli(main))
