"""Storage of a study and bytes moved per cell (adapter-only stages, in the parent's dtype). Nothing trains: the
numbers are `misalign study plan`'s estimate, built from the models' configs on the meta device (exact parameter
counts with each method's adapter).

    PYTHONPATH=bench .venv/bin/python bench/bench_storage.py [--config configs/study-paper.yaml]

What the study keeps until it ends, by kind of file, with and without sharing stages; then what its cells read
from and write to the study's storage (with sharing), over the study and per cell. The accounting rules are in
src/misalign/plan_storage.py's docstring. (The float32 merged copies of the layout before adapter-only stages
are gone from the code; docs/benchmarks.md keeps that comparison as it was measured.)
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
from misalign.world_targets import ensure_world


def per_model(plan: Plan) -> dict[str, float]:
    """Bytes kept per model with sharing (its unique stages; base evaluations left out)."""
    out: dict[str, float] = {}
    for s in plan.stages:
        out[s.model] = out.get(s.model, 0.0) + s.stored.total
    return out


def summarize(plan: Plan) -> dict[str, Any]:
    """The JSON record: kept (with and without sharing), moved, the models and what the estimate assumed."""
    return {
        "study": plan.study, "cells": plan.cells, "unique_stages": plan.unique_stages,
        "stage_uses": plan.stage_uses, "storage": {k: asdict(b) for k, b in plan.storage.items()},
        "moved": asdict(plan.moved),
        "models": [{"model": m.model, "total_params": m.total_params, "config_dtype": m.config_dtype,
                    "stored_dtypes": sorted({s.dtype for s in plan.stages if s.model == m.model})}
                   for m in plan.models if m.role == "model"],
        "per_model": per_model(plan),
        "assumptions": plan.assumptions,
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['study']}: {r['cells']:,} cells, {r['unique_stages']:,} unique stages of {r['stage_uses']:,} uses")
    print(f"{'kept':<14}{'adapters':>10}{'full wts':>10}{'evals':>10}{'records':>10}{'total':>10}")
    for key, b in r["storage"].items():
        print(f"{key:<14}{size_text(b['adapters']):>10}{size_text(b['weights']):>10}{size_text(b['evals']):>10}"
              f"{size_text(b['records']):>10}{size_text(b['total']):>10}")
    m = r["moved"]
    print(f"moved (with sharing): read {size_text(m['read'])}, written {size_text(m['written'])}; per cell "
          f"{size_text(m['per_cell'])}, max cell {size_text(m['max_per_cell'])}")
    print(f"{'model':<36}{'kept':>10}")
    for model, kept in r["per_model"].items():
        print(f"{model:<36}{size_text(kept):>10}")
    if r["assumptions"]:
        print("assumed:\n" + "\n".join(f"  - {a}" for a in r["assumptions"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/study-paper.yaml")
    p.add_argument("--out", default="bench/results/storage.json")
    args = p.parse_args(argv)
    ensure_world()  # world: names resolve only once the world is built (checked)
    result = summarize(estimate(load_config(args.config, schema=StudyConfig)))
    result["config"] = args.config
    print_table(result)
    write_result(Path(args.out), result, threads=0)
    return result


if __name__ == "__main__":
    main()
