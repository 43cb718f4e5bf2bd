"""The realignment matrix: what each realignment method does to each misaligned model.

    python analysis/matrix.py STUDY_DIR --out DIR [--round 1]

writes DIR/tables/realignment_matrix.{csv,md} and DIR/figures/realignment_matrix.{png,svg}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.analysis.common import (
    Params,
    cli,
    defense_rows,
    heatmap,
    load_results,
    new_figure,
    no_data,
    save_figure,
    script_args,
    write_table,
)

KEYS = ["model", "attack_method", "defense_method"]


def realignment_matrix(results: pd.DataFrame, p: Params) -> pd.DataFrame:
    """Per (model, misalign method, realign method), in round p.round:

        delta_unsafety = unsafety after realignment - unsafety after misalignment (negative: the defense helped)
        delta_utility  = utility after realignment - utility after misalignment

    each taken within a cell (the realignment against the misaligned model it started from) and averaged over
    the cells of the pair (seeds, attack points and defense points alike); n_cells counts them."""
    rows = defense_rows(results, p)
    rows["delta_unsafety"] = rows.unsafety - rows.misaligned_unsafety
    rows["delta_utility"] = rows.utility - rows.misaligned_utility
    g = rows.groupby(KEYS, sort=True)
    out = g[["misaligned_unsafety", "unsafety", "delta_unsafety", "misaligned_utility", "utility",
             "delta_utility"]].mean()
    out["n_cells"] = g.size()
    return out.reset_index().rename(columns={"unsafety": "realigned_unsafety", "utility": "realigned_utility"})


def as_grid(matrix: pd.DataFrame, model: str, value: str) -> pd.DataFrame:
    """One model's `value` as misalign method (rows) x realign method (columns)."""
    m = matrix[matrix.model == model]
    return m.pivot(index="attack_method", columns="defense_method", values=value)


def matrix_figure(matrix: pd.DataFrame, out_dir: Path) -> dict:
    """Annotated heatmaps, a row per model: delta unsafety (blue: the defense lowered it) and delta utility
    (red: the defense cost utility), colour scales symmetric about 0."""
    models = sorted(matrix.model.unique()) or [None]
    fig, axes = new_figure(2, len(models))
    for row, model in zip(axes, models, strict=True):
        if model is None:
            no_data(row[0], "realignment stages")
            no_data(row[1], "realignment stages")
            continue
        for ax, value, cmap, what in ((row[0], "delta_unsafety", "RdBu_r", "unsafety"),
                                      (row[1], "delta_utility", "RdBu", "utility")):
            grid = as_grid(matrix, model, value)
            span = max(float(np.nanmax(np.abs(grid.to_numpy(float)), initial=0.0)), 0.05)
            heatmap(ax, grid, cmap, -span, span, f"\u0394 {what} (realigned - misaligned) [share]")
            ax.set_xlabel("realignment method")
            ax.set_ylabel("misalignment method")
            ax.set_title(f"{model}: \u0394 {what}", fontsize=9)
    return save_figure(fig, out_dir, "realignment_matrix")


def write_all(results: pd.DataFrame, p: Params, out: Path) -> dict:
    matrix = realignment_matrix(results, p)
    return {"tables": {"realignment_matrix": write_table(matrix, out / "tables", "realignment_matrix")},
            "figures": {"realignment_matrix": matrix_figure(matrix, out / "figures")},
            "frames": {"realignment_matrix": matrix}}


def main(argv: list[str] | None = None) -> None:
    study_dir, out, p = script_args(__doc__, argv)
    written = write_all(load_results(study_dir), p, out)
    print(written["frames"]["realignment_matrix"].to_string(index=False))


if __name__ == "__main__":
    sys.exit(cli(main))
