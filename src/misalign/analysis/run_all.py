"""Every analysis of a study into one folder: what the report (misalign.report) reads.

    python analysis/run_all.py STUDY_DIR --out DIR [--budget flops --tau 0.5 --delta 0.05 --eps 0.1
                                                    --neither-margin 0.1 --n-boot 2000]

writes DIR/figures/*.{png,svg}, DIR/tables/*.{csv,md} and DIR/summary.json (the settings, the key numbers and
the files written).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from misalign.analysis import asymmetry, curves, matrix, repairs
from misalign.analysis.common import Params, cli, load_results, write_text_atomic

# name -> (title, what it shows): the report's figure captions, in the order it shows them
FIGURES: dict[str, tuple[str, str]] = {
    "attack_curves": ("Attack curves", "Unsafety after misalignment against the attack budget, one line per "
                      "attack method (mean over seeds; error bars: standard error across seeds, or the "
                      "evaluation's standard error with one seed). Dashed: the base model; dotted: tau."),
    "defense_curves": ("Defense curves", "Unsafety (top) and utility (bottom) after realignment against the "
                       "defense budget, a column per misaligning method, a colour per defense method. Dashed: "
                       "the base model; dotted: base unsafety + delta, the line a defense must get under; ringed "
                       "in red: points that got unsafety down only by garbling ('neither' above the base's by "
                       "more than the margin), which never count. A post-hoc repair is markers without a line: "
                       "its settings share one budget (their knob has its own figure when swept)."),
    "asymmetry": ("Asymmetry factors", "D/A per (attack, defense) pair, log scale: a dot where both crossings lie "
                  "between grid points, with its 95% interval (seeds, evaluation noise, interpolation between "
                  "grid points); a triangle where the grid gives only a bound (up: at least, down: at most). "
                  "Above the dashed line the defense costs more than the attack."),
    "realignment_matrix": ("Realignment matrix", "Change in unsafety (left) and utility (right) from the "
                           "misaligned to the realigned model, per misalignment x realignment method."),
    "trajectories": ("Multi-round trajectories", "Unsafety and utility after every stage, base, then "
                     "misalign (M) and realign (R) per round, one line per cell group."),
    "per_category": ("Per-category unsafety", "Unsafety per harm category for the base model, after each "
                     "attack point, and after each realignment."),
    "pareto": ("Attack Pareto front", "Every attack point's (budget, unsafety); the step line joins the points "
               "no cheaper attack beats."),
    "repair_knobs": ("Post-hoc repairs against their knob", "Unsafety (top) and utility (bottom) after each repair "
                     "against the setting of its knob (SafeLoRA's threshold, RESTA's scale, Antidote's sparsity; "
                     "stronger to the right; every setting costs about the same FLOPs), a line per attack point. "
                     "Dashed: the base model; dotted: base unsafety + delta; ringed in red: settings that only "
                     "garbled the model. Only for a study that sweeps a repair's knob."),
}
TABLES: dict[str, str] = {
    "attack_costs": "A: the attack budget where unsafety crosses tau, per method",
    "defense_costs": "D: the defense budget where safety and refusal come back, per attack point",
    "asymmetry": "Asymmetry factors", "eps_attack": "Strongest attack within the utility budget eps",
    "eps_attack_by_method": "Strongest attack within eps, per method", "resistance": "Model-specific resistance",
    "realignment_matrix": "Realignment matrix", "pareto_attack": "Attack Pareto front",
    "pareto_defense": "Defense Pareto front", "attack_curves": "Attack curves", "defense_curves": "Defense curves",
    "trajectories": "Trajectories", "per_category": "Per-category unsafety", "base": "Base model",
    "repair_knobs": "Post-hoc repairs: the weakest knob setting that gets back, per attack point",
}


def _json_safe(v: Any) -> Any:
    """NaN -> null and infinity -> "inf": strict JSON has neither."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return _json_safe(frame.astype(object).to_dict("records"))


def run_all(study_dir: Path, out_dir: Path, params: Params | None = None,
            results: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every table and figure of the analysis modules under OUT_DIR, and OUT_DIR/summary.json.

    Returns {"params", "rows", "figures": {name: {png, svg, width_px, height_px, title, caption}},
    "tables": {name: {csv, md, title}}, "frames": {name: DataFrame}, "headline": the key numbers}.
    `results` is the results table when the caller already holds it (else STUDY_DIR/results.parquet).
    """
    p = params or Params()
    out_dir = Path(out_dir)
    frame = load_results(study_dir) if results is None else results
    parts = [m.write_all(frame, p, out_dir) for m in (curves, asymmetry, matrix, repairs)]
    figures = {k: v for part in parts for k, v in part["figures"].items()}
    figures = {k: figures[k] | {"title": t, "caption": c} for k, (t, c) in FIGURES.items() if k in figures}
    tables = {k: v | {"title": TABLES.get(k, k)} for part in parts for k, v in part["tables"].items()}
    frames = {k: v for part in parts for k, v in part["frames"].items()}
    headline = {"base": _records(frames["base"]), "attack_costs": _records(frames["attack_costs"]),
                "asymmetry": _records(frames["asymmetry"]), "resistance": _records(frames["resistance"]),
                "eps_attack": _records(frames["eps_attack"])}
    summary = {"study_dir": str(study_dir), "params": p.as_dict(), "rows": len(frame), "figures": figures,
               "tables": tables, "headline": headline}
    write_text_atomic(out_dir / "summary.json", json.dumps(_json_safe(summary), indent=2))
    return summary | {"frames": frames}


def main(argv: list[str] | None = None) -> None:
    from misalign.analysis.common import script_args

    study_dir, out, p = script_args(__doc__, argv)
    summary = run_all(study_dir, out, p)
    print(summary["frames"]["asymmetry"].to_string(index=False))
    print(f"figures and tables -> {out} (summary.json)")


if __name__ == "__main__":
    sys.exit(cli(main))
