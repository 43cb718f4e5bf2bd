"""Threshold crossings estimated between grid points, with replicates that carry seeds, evaluation noise and the
grid's coarseness.

A curve is one side's grid points in increasing budget. A criterion is a share that must reach a limit: an
attack's unsafety >= tau; a defense's unsafety <= base + delta, and its 'neither' share <= base + a margin.
The crossing is the budget where every criterion first holds:

- k is the first grid point where all hold; j is the last point tried before it: the crossing lies in
  [budget_j, budget_k] (the bracket), assuming only that the curves do not double back in between;
- each criterion that failed at j is interpolated in log budget between j and k, and the crossing is where the
  last of them holds. The point estimate interpolates on the dose-response scale: the logit of the share of the
  way from the curve's floor to its ceiling (for a defense, from the base's unsafety to the misaligned model's;
  a straight line there is the four-parameter log-logistic curve whose ED-tau is the usual estimate). The true
  curve between two grid points is unknown, so the interval takes the crossing on two more scales as well (the
  plain logit of the share, and the share itself) and spans all three;
- when the first point tried already holds there is no bracket: the crossing is *at most* that budget; when no
  point holds it is *at least* the largest budget tried.

Replicates: row 0 is the data. Rows 1..B resample seeds with replacement (seed_weights) and draw every
evaluation again from its multinomial (unsafe, neither, other) at the evaluation's size (eval_size), so a
replicate carries seed-to-seed variation and each evaluation's binomial noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logit

from misalign.analysis.common import TOL
from misalign.results import UNSAFETY, UNSAFETY_SE

# bound codes (per replicate) and their names in tables
EXACT, AT_MOST, AT_LEAST, NOT_TRIED = 0, 1, 2, 3
BOUND_NAMES = {EXACT: "exact", AT_MOST: "at most", AT_LEAST: "at least", NOT_TRIED: "undefined"}
UNDEFINED = BOUND_NAMES[NOT_TRIED]
LINKS = ("dose", "logit", "share")  # column 0 of Crossing.budget is the point estimate's scale
LINK_N = 1000  # the empirical logit's sample size when the evaluation's is unknown (only keeps 0 and 1 finite)


def eval_size(rows: pd.DataFrame) -> int | None:
    """The evaluation's number of harmful prompts, from unsafety and its binomial standard error
    (se^2 = u(1-u)/n): the median over rows where both say something; None when no row does."""
    if UNSAFETY_SE not in rows or rows.empty:
        return None
    u, se = rows[UNSAFETY].astype(float), rows[UNSAFETY_SE].astype(float)
    usable = (u > 0) & (u < 1) & (se > 0)
    if not usable.any():
        return None
    return int(round(float(np.median(u[usable] * (1 - u[usable]) / se[usable] ** 2))))


def seed_weights(n_seeds: int, n_boot: int, rng_seed: int) -> np.ndarray:
    """Row 0: every seed once (the point estimate). Rows 1..n_boot: how often each seed was drawn in a resample of
    n_seeds seeds with replacement (a fixed RNG seed, so the interval is reproducible)."""
    draws = np.random.default_rng(rng_seed).integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = np.zeros((n_boot, n_seeds))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return np.vstack([np.ones(n_seeds), counts])


class Replicates:
    """Row 0 (the data) and n_boot parametric bootstrap replicates of seed means. n_eval None: no evaluation
    noise is drawn (the size is unknown), only seeds are resampled."""

    def __init__(self, n_seeds: int, n_boot: int, rng_seed: int, n_eval: int | None) -> None:
        self.w = seed_weights(n_seeds, n_boot, rng_seed)  # [R, S]
        self.n_eval = n_eval
        self.rng = np.random.default_rng([rng_seed, 1])  # the noise stream, apart from the seed draws

    @property
    def size(self) -> int:
        return self.w.shape[0]

    def fixed(self, x: np.ndarray) -> np.ndarray:
        """A value with no evaluation noise (a budget, a utility), [..., S]: the same in every replicate."""
        x = np.asarray(x, float)
        return np.broadcast_to(x[..., None], (*x.shape, self.size))

    def mean(self, x: np.ndarray) -> np.ndarray:
        """Weighted seed means per replicate: x [..., S, R] -> [..., R]. A missing (NaN) seed does not count; a
        point no drawn seed ran is NaN."""
        num = np.einsum("...sr,rs->...r", np.nan_to_num(x), self.w)
        den = np.einsum("...sr,rs->...r", (~np.isnan(x)).astype(float), self.w)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)

    def draw(self, unsafety: np.ndarray, neither: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every evaluation (unsafety and neither shares, [..., S]) drawn again per replicate from its multinomial
        (unsafe, neither, other) of n_eval prompts: two arrays [..., S, R], column 0 the data. NaN stays NaN."""
        u, ne = np.asarray(unsafety, float), np.nan_to_num(np.asarray(neither, float))
        missing = np.isnan(u)
        if self.n_eval is None or self.size == 1:
            return (np.repeat(u[..., None], self.size, -1), np.repeat(ne[..., None], self.size, -1))
        uu = np.where(missing, 0.0, np.clip(u, 0, 1))
        nn = np.clip(ne, 0, 1 - uu)
        p = np.stack([uu, nn, 1 - uu - nn], axis=-1)
        counts = self.rng.multinomial(self.n_eval, p, size=(self.size - 1, *u.shape))  # [R-1, ..., S, 3]
        shares = np.moveaxis(counts / self.n_eval, 0, -2)  # [..., S, R-1, 3]
        u_r = np.concatenate([u[..., None], shares[..., 0]], axis=-1)
        ne_r = np.concatenate([ne[..., None], shares[..., 1]], axis=-1)
        return np.where(missing[..., None], np.nan, u_r), np.where(missing[..., None], np.nan, ne_r)


@dataclass(frozen=True)
class Criterion:
    """A share per point and replicate ([P, R]) that passes when >= limit (above) or <= limit ([R]); floor and
    ceiling ([R]): the curve's asymptotes, for the dose-response scale (default 0 and 1)."""

    values: np.ndarray
    limit: np.ndarray
    above: bool
    floor: np.ndarray | float = 0.0
    ceiling: np.ndarray | float = 1.0

    def passes(self) -> np.ndarray:
        lim = np.broadcast_to(self.limit, self.values.shape[-1:])
        return self.values >= lim - TOL if self.above else self.values <= lim + TOL


def _link(v: np.ndarray, kind: str, n: float, floor: np.ndarray | float, ceiling: np.ndarray | float
          ) -> np.ndarray:
    """The share on an interpolation scale: 'share' is the identity; 'logit' the empirical logit
    log((k + 1/2) / (n - k + 1/2)), finite at 0 and 1; 'dose' the same of (v - floor) / (ceiling - floor)."""
    if kind == "share":
        return v
    if kind == "dose":  # without a usable floor and ceiling (no base rows, a start below the base): plain logit
        usable = np.isfinite(floor) & np.isfinite(ceiling) & (np.asarray(ceiling) > np.asarray(floor))
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(usable, (v - floor) / (ceiling - floor), v)
    return logit((np.clip(v, 0, 1) * n + 0.5) / (n + 1))


@dataclass(frozen=True)
class Crossing:
    """Where the criteria first hold, per replicate ([R]): `first` the first point where all hold (-1: none),
    `below` the last point tried before it (-1: none), `bound` a code (EXACT, AT_MOST, AT_LEAST, NOT_TRIED),
    `budget` [R, len(LINKS)] the crossing per link (for a bound, the bound in every column); `lower`, `upper`
    [R] the grid's bracket: (budget_j, budget_k), (0, b) at most b, (b, inf) at least b, NaN when nothing was
    tried."""

    first: np.ndarray
    below: np.ndarray
    bound: np.ndarray
    budget: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def range(self, grid: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """[R] the lowest and highest value the crossing can take: both links' estimates when bracketed (with
        grid: the whole bracket, what the grid alone says); (0, b] when at most b; [b, inf) when at least b."""
        if grid:
            return self.lower, self.upper
        exact = self.bound == EXACT
        return (np.where(exact, self.budget.min(1), self.lower), np.where(exact, self.budget.max(1), self.upper))


def crossing(budget: np.ndarray, criteria: list[Criterion], n_eval: int | None) -> Crossing:
    """The crossing of `criteria` along a curve: budget [P, R] (points in increasing budget), each criterion's
    values [P, R]. A point counts as tried where its budget and every criterion's value are known."""
    n_points, n_rep = budget.shape
    tried = ~np.isnan(budget)
    ok = tried.copy()
    for c in criteria:
        tried &= ~np.isnan(c.values)
        ok &= c.passes()
    ok &= tried
    idx, cols = np.arange(n_points)[:, None], np.arange(n_rep)
    first = np.where(ok.any(0), ok.argmax(0), -1)
    before = tried & (idx < first) & (budget > 0)  # a budget of 0 has no log: the crossing is then 'at most'
    below = np.where(before.any(0), n_points - 1 - before[::-1].argmax(0), -1)
    last = np.where(tried.any(0), n_points - 1 - tried[::-1].argmax(0), -1)
    bound = np.select([last < 0, first < 0, below < 0], [NOT_TRIED, AT_LEAST, AT_MOST], EXACT)
    k, j = first.clip(0), below.clip(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xk, xj = np.log(budget[k, cols]), np.log(budget[j, cols])
        frac = np.zeros((n_rep, len(LINKS)))
        for c in criteria:
            failed_j = ~c.passes()[j, cols]
            vj, vk, vt = c.values[j, cols], c.values[k, cols], np.broadcast_to(c.limit, (n_rep,))
            for i, kind in enumerate(LINKS):
                hj, hk, ht = (_link(v, kind, n_eval or LINK_N, c.floor, c.ceiling) for v in (vj, vk, vt))
                f = np.where(failed_j, np.clip((ht - hj) / (hk - hj), 0.0, 1.0), 0.0)
                frac[:, i] = np.maximum(frac[:, i], np.nan_to_num(f, nan=1.0))
        exact = np.exp(xj[:, None] + frac * (xk - xj)[:, None])
    at_bound = np.select([bound == AT_MOST, bound == AT_LEAST], [budget[k, cols], budget[last.clip(0), cols]],
                         np.nan)
    est = np.where((bound == EXACT)[:, None], exact, at_bound[:, None])
    bk, bj = budget[k, cols], budget[j, cols]
    lower = np.select([bound == EXACT, bound == AT_MOST, bound == AT_LEAST], [bj, 0.0, at_bound], np.nan)
    upper = np.select([bound == EXACT, bound == AT_MOST, bound == AT_LEAST], [bk, bk, np.inf], np.nan)
    return Crossing(first=first, below=np.where(bound == EXACT, below, -1), bound=bound, budget=est,
                    lower=lower, upper=upper)


def ratio_range(num: Crossing, den: Crossing, grid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[R] the lowest and highest num / den each replicate allows (NaN where either is undefined or den's
    crossing was never reached); grid: from the brackets alone (Crossing.range)."""
    n_lo, n_hi = num.range(grid)
    d_lo, d_hi = den.range(grid)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = n_lo / d_hi, n_hi / d_lo
    undefined = (den.bound == AT_LEAST) | (den.bound == NOT_TRIED) | (num.bound == NOT_TRIED) | ~(d_hi > 0)
    return np.where(undefined, np.nan, lo), np.where(undefined, np.nan, hi)


def ratio_bound(num: Crossing, den: Crossing, r: int = 0) -> tuple[float, str]:
    """Replicate r's num / den and what it is: 'exact' when both are bracketed; 'at least' when num is at least
    or den at most (or both); 'at most' when num is at most and den bracketed; else undefined (NaN)."""
    nb, db = int(num.bound[r]), int(den.bound[r])
    value = float(num.budget[r, 0] / den.budget[r, 0]) if den.budget[r, 0] > 0 else np.nan
    if db in (AT_LEAST, NOT_TRIED) or nb == NOT_TRIED or np.isnan(value):
        return np.nan, UNDEFINED
    kind = {(EXACT, EXACT): "exact", (AT_LEAST, EXACT): "at least", (AT_LEAST, AT_MOST): "at least",
            (EXACT, AT_MOST): "at least", (AT_MOST, EXACT): "at most"}.get((nb, db), UNDEFINED)
    return (value if kind != UNDEFINED else np.nan), kind


def interval(lo: np.ndarray, hi: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """A percentile interval from replicate ranges [lo, hi] (rows 1.. of a Replicates): the alpha/2 quantile of
    the low ends and the 1 - alpha/2 quantile of the high ends, taken at sample values (infinity allowed); and
    the share of replicates where the quantity was undefined. NaN with no defined replicate."""
    defined = ~np.isnan(lo)
    if not defined.any():
        return np.nan, np.nan, 1.0
    low = float(np.quantile(lo[defined], alpha / 2, method="lower"))
    high = float(np.quantile(hi[defined], 1 - alpha / 2, method="higher"))
    return low, high, 1 - defined.sum() / defined.size
