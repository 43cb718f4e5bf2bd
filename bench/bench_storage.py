"""Storage of a study and bytes moved per cell: adapter-only stages (new layout) against float32 merged copies
kept until the study ends (old layout). Nothing trains: the numbers are `misalign study plan`'s estimate, built
from the models' configs on the meta device (exact parameter counts with each method's adapter).

    PYTHONPATH=bench .venv/bin/python bench/bench_storage.py [--config configs/study-paper.yaml]

Per layout: what the study keeps until it ends, by kind of file, with and without sharing stages; then what its
cells read from and write to the study's storage (with sharing), over the study and per cell. The accounting
rules are in src/misalign/plan.py's docstring.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import write_result
from misalign.config import StudyConfig, load_config
from misalign.plan import Plan, estimate
from misalign.plan_render import size_text

LAYOUTS = {"old": "old: fp32 merged copies", "new": "new: adapters only"}


def per_model(plan: Plan) -> dict[str, dict[str, float]]:
    """Bytes kept per model with sharing (its unique stages; base evaluations left out), per layout."""
    out: dict[str, dict[str, float]] = {}
    for s in plan.stages:
        row = out.setdefault(s.model, {"new": 0.0, "old": 0.0})
        row["new"] += s.stored.total
        row["old"] += s.stored_old.total
    return out


def summarize(plan: Plan) -> dict[str, Any]:
    """The JSON record: kept and moved per layout, the ratios, the models and what the estimate assumed."""
    kept = {k: asdict(plan.storage[k]) for k in plan.storage}
    moved = {k: asdict(plan.moved[k]) for k in plan.moved}
    return {
        "study": plan.study, "cells": plan.cells, "unique_stages": plan.unique_stages,
        "stage_uses": plan.stage_uses, "storage": kept, "moved": moved,
        "ratio_new_to_old": {
            "kept": plan.storage["new"].total / plan.storage["old"].total,
            "kept_unshared": plan.storage["new_unshared"].total / plan.storage["old_unshared"].total,
            "moved_per_cell": plan.moved["new"].per_cell / plan.moved["old"].per_cell},
        "models": [{"model": m.model, "total_params": m.total_params, "config_dtype": m.config_dtype,
                    "stored_dtypes": sorted({s.dtype for s in plan.stages if s.model == m.model})}
                   for m in plan.models if m.role == "model"],
        "per_model": per_model(plan),
        "assumptions": plan.assumptions,
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['study']}: {r['cells']:,} cells, {r['unique_stages']:,} unique stages of {r['stage_uses']:,} uses")
    print(f"{'layout':<26}{'adapters':>10}{'full wts':>10}{'merged':>10}{'evals+rec':>11}{'kept':>10}"
          f"{'no sharing':>12}{'read/cell':>11}{'write/cell':>11}{'moved/cell':>11}{'max cell':>10}")
    for key, label in LAYOUTS.items():
        b, m = r["storage"][key], r["moved"][key]
        print(f"{label:<26}{size_text(b['adapters']):>10}{size_text(b['weights']):>10}{size_text(b['merged']):>10}"
              f"{size_text(b['evals'] + b['records']):>11}{size_text(b['total']):>10}"
              f"{size_text(r['storage'][key + '_unshared']['total']):>12}{size_text(m['read'] / m['cells']):>11}"
              f"{size_text(m['written'] / m['cells']):>11}{size_text(m['per_cell']):>11}{size_text(m['max_per_cell']):>10}")
    ratio = r["ratio_new_to_old"]
    print(f"new / old: kept {100 * ratio['kept']:.2g}% ({100 * ratio['kept_unshared']:.2g}% without sharing), "
          f"moved per cell {100 * ratio['moved_per_cell']:.2g}%")
    print(f"{'model':<36}{'old kept':>10}{'new kept':>10}")
    for model, row in r["per_model"].items():
        print(f"{model:<36}{size_text(row['old']):>10}{size_text(row['new']):>10}")
    if r["assumptions"]:
        print("assumed:\n" + "\n".join(f"  - {a}" for a in r["assumptions"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/study-paper.yaml")
    p.add_argument("--out", default="bench/results/storage.json")
    args = p.parse_args(argv)
    result = summarize(estimate(load_config(args.config, schema=StudyConfig)))
    result["config"] = args.config
    print_table(result)
    write_result(Path(args.out), result, threads=0)
    return result


if __name__ == "__main__":
    main()
