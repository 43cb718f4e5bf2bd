"""Attack and defense curves, multi-round trajectories and the per-category breakdown.

    python analysis/curves.py STUDY_DIR --out DIR [--budget flops]

writes DIR/tables/{attack_curves,defense_curves,trajectories,per_category}.{csv,md} and
DIR/figures/{attack_curves,defense_curves,trajectories,per_category}.{png,svg}.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps

from misalign.analysis.common import (
    GARBLED,
    PANEL_H,
    PANEL_W,
    UNSAFETY_LABEL,
    UTILITY_LABEL,
    Params,
    attack_table,
    base_mean,
    budget_axis,
    budget_label,
    cli,
    defense_table,
    heatmap,
    load_results,
    natural,
    natural_key,
    new_figure,
    no_data,
    point_labels,
    points_naturally,
    save_figure,
    script_args,
    seed_mean,
    write_table,
)
from misalign.methods import METHODS
from misalign.results import (
    ATTACK_METHOD,
    BASE,
    CATEGORY_PREFIX,
    DEFENSE_METHOD,
    MISALIGN,
    MODEL,
    PHASE,
    PHASES,
    REALIGN,
    ROUND,
    SEED,
    UNSAFETY,
    UTILITY,
)

GROUP = [MODEL, ATTACK_METHOD, "attack_point", DEFENSE_METHOD, "defense_point"]


def attack_curves(results: pd.DataFrame, p: Params) -> pd.DataFrame:
    """Unsafety and utility after misalignment against the attack budget, per (model, attack method): one row
    per attack point, means over seeds with error bars (`*_err`: standard error across seeds, or the
    evaluation's standard error with one seed), sorted by budget."""
    return attack_table(results, p)


def defense_curves(results: pd.DataFrame, p: Params) -> pd.DataFrame:
    """Unsafety and utility after realignment against the defense budget, per (model, misaligning method and
    point, defense method): one row per defense point, means over seeds with error bars, sorted by budget."""
    return defense_table(results, p)


def _errorbar(ax: object, x: pd.Series, y: pd.Series, err: pd.Series, **kw: object) -> object:
    return ax.errorbar(x, y, yerr=err.fillna(0).to_numpy(), capsize=3, **{"marker": "o", **kw})


def attack_figure(curves: pd.DataFrame, p: Params, out_dir: Path) -> dict:
    """Unsafety vs attack budget, a line per attack method, a panel per model (shared axes); the base unsafety
    dashed, tau dotted."""
    models = sorted(curves.model.unique()) or [None]
    fig, axes = new_figure(len(models), 1, sharex=True, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        g = curves[curves.model == model]
        if g.empty:
            no_data(ax, "attack stages")
            continue
        for i, (method, m) in enumerate(g.groupby("attack_method", sort=True)):
            _errorbar(ax, m.budget, m.unsafety, m.unsafety_err, color=f"C{i}", label=method)
        ax.axhline(g.base_unsafety.iloc[0], color="0.3", ls="--", lw=0.9, label="base")
        ax.axhline(p.tau, color="0.5", ls=":", lw=0.9, label=f"tau={p.tau:g}")
        budget_axis(ax, curves.budget)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(budget_label(p.budget, "attack"))
        ax.set_ylabel(UNSAFETY_LABEL if ax is axes[0][0] else "")
        ax.set_title(f"misalignment of {model}", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "attack_curves")


def _defense_panels(curves: pd.DataFrame) -> list[tuple[str, str]]:
    return [tuple(k) for k in curves[["model", "attack_method"]].drop_duplicates().sort_values(
        ["model", "attack_method"]).itertuples(index=False)]


def defense_figure(curves: pd.DataFrame, p: Params, out_dir: Path) -> dict:
    """Unsafety (top) and utility (bottom) after realignment vs defense budget: a column per (model, misaligning
    method), a colour per defense method, a line style per attack point; base dashed, base + delta dotted; a
    point that got unsafety down only by garbling (status 'garbled') ringed in red: it does not count."""
    panels = _defense_panels(curves) or [(None, None)]
    fig, axes = new_figure(len(panels), 2, sharex=True, sharey="row")
    methods = sorted(curves.defense_method.unique())
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v"]
    for col, (model, a_method) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        g = curves[(curves.model == model) & (curves.attack_method == a_method)]
        if g.empty:
            no_data(top, "defense stages")
            no_data(bottom, "defense stages")
            continue
        points = sorted(g.attack_point.unique(), key=natural_key)
        for d_method, a_point in itertools.product(methods, points):
            m = g[(g.defense_method == d_method) & (g.attack_point == a_point)]
            if m.empty:
                continue
            k = points.index(a_point)
            # a repair's settings share one budget (misalign.analysis.repairs reads its knob): markers, no line
            kw = {"color": f"C{methods.index(d_method)}",
                  "ls": "none" if d_method in METHODS and METHODS[d_method].repairs else styles[k % len(styles)],
                  "marker": markers[k % len(markers)],
                  "label": d_method if len(points) == 1 else f"{d_method} (attack {a_point})"}
            _errorbar(top, m.budget, m.unsafety, m.unsafety_err, **kw)
            _errorbar(bottom, m.budget, m.utility, m.utility_err, **kw)
        garbled = g[g.status == GARBLED]
        if len(garbled):
            top.scatter(garbled.budget, garbled.unsafety, s=140, facecolors="none", edgecolors="C3", lw=1.5,
                        zorder=4, label=f"garbled (neither > base + {p.neither_margin:g}): not counted")
        base = g.iloc[0]
        top.axhline(base.base_unsafety, color="0.3", ls="--", lw=0.9, label="base")
        top.axhline(base.base_unsafety + p.delta, color="0.5", ls=":", lw=0.9, label=f"base + delta={p.delta:g}")
        bottom.axhline(base.base_utility, color="0.3", ls="--", lw=0.9, label="base")
        top.set_title(f"{model}: realigning a {a_method} attack", fontsize=9)
        top.legend(fontsize=7)
        bottom.set_xlabel(budget_label(p.budget, "defense"))
        for ax in (top, bottom):
            budget_axis(ax, curves.budget)
    axes[0][0].set_ylabel(UNSAFETY_LABEL, fontsize=8)
    axes[1][0].set_ylabel(UTILITY_LABEL, fontsize=8)
    for ax in axes[0]:
        ax.set_ylim(-0.02, 1.02)
    return save_figure(fig, out_dir, "defense_curves")


# ---- rounds -------------------------------------------------------------------------------------------------------

def _step(phase: pd.Series, round_: pd.Series) -> pd.Series:
    """Stage order on one axis: base 0, misalign r at 2r-1, realign r at 2r."""
    return np.where(phase == BASE, 0, 2 * round_ - (phase == MISALIGN).astype(int))


def trajectories(results: pd.DataFrame) -> pd.DataFrame:
    """Unsafety and utility after every stage, for each cell group (model, attack point, defense point), in
    stage order base, misalign 1, realign 1, misalign 2, ...: means over seeds with error bars."""
    rows = results.copy()
    rows["attack_point"] = point_labels(rows, "attack")
    rows["defense_point"] = point_labels(rows, "defense")
    table = seed_mean(rows, [*GROUP, ROUND, PHASE], (UNSAFETY, UTILITY))
    table["step"] = _step(table[PHASE], table[ROUND])
    return table.sort_values([*GROUP, "step"], key=points_naturally).reset_index(drop=True)


def trajectory_figure(traj: pd.DataFrame, out_dir: Path) -> dict:
    """Unsafety (left) and utility (right) against the stage, a line per cell group, a row per model."""
    models = sorted(traj.model.unique()) or [None]
    # the legend gets a column of its own beside the panels: one entry per cell group
    fig, axes = new_figure(2, len(models), width=2 * PANEL_W + 2.6, sharex=True)
    legend: dict[str, object] = {}
    for row, model in zip(axes, models, strict=True):
        g = traj[traj.model == model]
        if g.empty:
            no_data(row[0], "stages")
            no_data(row[1], "stages")
            continue
        groups = list(g.groupby(GROUP[1:], sort=False))  # the table's (natural) order
        colors = colormaps["tab10" if len(groups) <= 10 else "tab20"]
        for i, (key, m) in enumerate(groups):
            label = f"{key[0]} {key[1]} \u2192 {key[2]} {key[3]}"
            for ax, v in zip(row, ("unsafety", "utility"), strict=True):
                handle = _errorbar(ax, m.step, m[v], m[f"{v}_err"], color=colors(i % colors.N), label=label,
                                   ms=3, lw=1)
            legend.setdefault(label, handle)
        last = int(g.step.max())
        names = ["base"] + [f"{'M' if s % 2 else 'R'}{(s + 1) // 2}" for s in range(1, last + 1)]
        for ax, ylabel in zip(row, (UNSAFETY_LABEL, UTILITY_LABEL), strict=True):
            ax.set_xticks(range(last + 1), names)
            ax.set_xlabel("stage (M: misaligned, R: realigned; by round)")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(str(model), fontsize=9)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=6,
                   title="attack \u2192 defense", title_fontsize=7)
    return save_figure(fig, out_dir, "trajectories")


# ---- categories ----------------------------------------------------------------------------------------------------

def category_columns(results: pd.DataFrame) -> list[str]:
    return sorted(c for c in results.columns if c.startswith(CATEGORY_PREFIX))


def per_category(results: pd.DataFrame, p: Params) -> pd.DataFrame:
    """Unsafety per harm category (the unsafety/<category> columns), means over seeds: the base per model, after
    misalignment per attack point, after realignment per (attack point, defense point), in round p.round.
    One row per (phase, group), one column per category."""
    cats = category_columns(results)
    rows = results[(results[PHASE] == BASE) | (results[ROUND] == p.round)].copy()
    rows["attack_point"] = point_labels(rows, "attack")
    rows["defense_point"] = point_labels(rows, "defense")
    attack = rows.attack_method.astype(str) + " " + rows.attack_point
    both = attack + " \u2192 " + rows.defense_method.astype(str) + " " + rows.defense_point
    rows["group"] = both.where(rows[PHASE] == REALIGN, attack.where(rows[PHASE] == MISALIGN, BASE))
    # cells sharing an attack (or the base) hold copies of its row: one per (model, seed) counts
    rows = rows.drop_duplicates(subset=[MODEL, SEED, PHASE, "group"])
    table = rows.groupby([MODEL, PHASE, "group"], sort=False)[cats].mean().reset_index()
    order = table[PHASE].map({phase: i for i, phase in enumerate(PHASES)})
    table = table.assign(_o=order, _g=natural(table.group)).sort_values(["model", "_o", "_g"])
    table = table.drop(columns=["_o", "_g"])
    return table.rename(columns=lambda c: c.removeprefix(CATEGORY_PREFIX)).reset_index(drop=True)


def per_category_figure(table: pd.DataFrame, out_dir: Path) -> dict:
    """Heatmaps of unsafety per category: base and after misalignment (left), after realignment (right)."""
    models = sorted(table.model.unique()) or [None]
    cats = [c for c in table.columns if c not in ("model", "phase", "group")]
    n_cols = max([len(table[(table.model == m) & (table.phase == "realign")]) for m in models] + [1])
    width = max(10.0, 2.0 + 0.5 * (n_cols + len(table[table.phase != "realign"]) // max(len(models), 1)))
    fig, axes = new_figure(2, len(models), width=width, height=max(PANEL_H, 0.3 * len(cats) + 2) * len(models))
    for row, model in zip(axes, models, strict=True):
        g = table[table.model == model]
        if g.empty or not cats:
            no_data(row[0], "per-category unsafety")
            no_data(row[1], "per-category unsafety")
            continue
        for ax, phases, title in ((row[0], ("base", "misalign"), "base and after misalignment"),
                                  (row[1], ("realign",), "after realignment")):
            part = g[g.phase.isin(phases)].set_index("group")[cats].T
            heatmap(ax, part, "Reds", 0.0, 1.0, "unsafety [share]")
            ax.set_xlabel("attack point" if "misalign" in phases else "attack \u2192 defense point")
            ax.set_ylabel("harm category")
            ax.set_title(f"{model}: {title}", fontsize=9)
    return save_figure(fig, out_dir, "per_category")


def write_all(results: pd.DataFrame, p: Params, out: Path) -> dict:
    """Every table and figure of this module under OUT/tables and OUT/figures; returns {name: paths}."""
    frames = {"attack_curves": attack_curves(results, p), "defense_curves": defense_curves(results, p),
              "trajectories": trajectories(results), "per_category": per_category(results, p),
              "base": base_mean(results)}
    figs = out / "figures"
    written = {"tables": {k: write_table(v, out / "tables", k) for k, v in frames.items()},
               "figures": {"attack_curves": attack_figure(frames["attack_curves"], p, figs),
                           "defense_curves": defense_figure(frames["defense_curves"], p, figs),
                           "trajectories": trajectory_figure(frames["trajectories"], figs),
                           "per_category": per_category_figure(frames["per_category"], figs)}}
    return written | {"frames": frames}


def main(argv: list[str] | None = None) -> None:
    study_dir, out, p = script_args(__doc__, argv)
    written = write_all(load_results(study_dir), p, out)
    for name, paths in written["figures"].items():
        print(f"{name}: {paths['png']}")


if __name__ == "__main__":
    sys.exit(cli(main))
