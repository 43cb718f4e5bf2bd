"""The attack search against the exhaustive grid it searches, side by side.

1. `misalign search attack CONFIG` (a subprocess, as a user runs it) in a fresh directory: its answer, and the
   budget it spent (the sum of the budgets of the distinct points it evaluated).
2. The exhaustive grid over the same space (every method x examples per category; numeric `space` knobs are
   dropped, so the config's grid is its categorical part), evaluated point by point with the same trial code and
   the search's lineage cache (points the search already evaluated cost nothing to look up; the grid's budget
   counts every point). Its cheapest feasible cell is the reference answer.
Targets (issue 5): the search's answer within one grid step of the grid's cheapest feasible cell (same method,
examples per category at most one step away in the config's list), at most 40% of the grid's budget.

    .venv/bin/python bench/bench_search.py [--config configs/search-attack-tiny.yaml] [--trials 7] [--seed 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from common import machine_busy_s, write_result
from misalign.config import SearchConfig, load_config
from misalign.runtime import match_threads
from misalign.search import outcome, point_id, point_trial
from misalign.storage import Store
from misalign.trial import run_cached_trial
from misalign.world_targets import ensure_world


def run_search(config: Path, storage: Path) -> tuple[dict, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "misalign.cli", "search", "attack", str(config),
                           "--storage", str(storage)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"search failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (root,) = [p.parent for p in storage.glob("*/answer.json")]
    return json.loads((root / "answer.json").read_text()), time.time() - t0


def run_grid(cfg: SearchConfig, stages: Path, points_dir: Path) -> pd.DataFrame:
    side = cfg.searched
    rows = []
    for method, size in itertools.product(side.methods, side.per_category):
        params = {"method": method, "per_category": size}
        pid = point_id(params)
        file = points_dir / f"{pid}.parquet"
        frame = pd.read_parquet(file) if file.exists() else pd.DataFrame(
            run_cached_trial(point_trial(cfg, params), {"point_id": pid, **params}, Store(stages),
                             (Store(points_dir), file.name), attack_only=True))
        rows.append({**params, **outcome(cfg, frame)})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/search-attack-tiny.yaml")
    p.add_argument("--trials", type=int, default=7, help="search trials (the grid has methods x sizes points)")
    p.add_argument("--seed", type=int, help="override the config's seed (sampler and training)")
    p.add_argument("--out", default="bench/results/search.json")
    args = p.parse_args()
    ensure_world()  # world: names resolve only once the world is built (checked)
    raw = yaml.safe_load(Path(args.config).read_text())
    # the grid is the categorical part: search the same space; feasibility on unsafety alone (as measured)
    raw.update(space={}, trials=args.trials, eps=None)
    if args.seed is not None:
        raw["seed"] = args.seed
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    config = work / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config, schema=SearchConfig)
    busy0, c0 = machine_busy_s(), os.times()
    answer, search_wall = run_search(config, work / "runs")
    root = work / "runs" / cfg.name
    trials = pd.read_parquet(root / "trials.parquet")
    done = trials[trials.state == "COMPLETE"].drop_duplicates("point_id")
    search_budget = float(done.budget.sum())

    threads = match_threads()
    t0 = time.time()
    grid = run_grid(cfg, root / "stages", root / "points")
    grid_wall = time.time() - t0
    grid_budget = float(grid.budget.sum())
    feasible = grid[grid.feasible].sort_values("budget")
    reference = feasible.iloc[0].to_dict() if not feasible.empty else None
    sizes = cfg.searched.per_category
    best = answer["best"]
    found = dict(best["params"]) if best else None
    if found is not None:
        found.setdefault("method", cfg.searched.methods[0])
        found.setdefault("per_category", sizes[0])
    within = bool(found and reference and found["method"] == reference["method"]
                  and abs(sizes.index(found["per_category"]) - sizes.index(reference["per_category"])) <= 1)
    ratio = search_budget / grid_budget
    c1 = os.times()
    result = {
        "config": args.config, "budget_kind": cfg.budget, "tau": cfg.tau, "grid_points": len(grid),
        "search_trials": int(len(trials)), "search_distinct_points": int(len(done)),
        "search_answer": found, "search_answer_budget": best["budget"] if best else None,
        "grid_answer": {k: reference[k] for k in ("method", "per_category", "budget", "unsafety")} if reference
        else None,
        "within_one_step": within, "search_budget": search_budget, "grid_budget": grid_budget,
        "budget_ratio": round(ratio, 3), "search_wall_s": round(search_wall, 1), "grid_wall_s": round(grid_wall, 1),
        "cpu_s": round((c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user)
                       + (c1.children_system - c0.children_system), 1),
        "machine_busy_s": round(machine_busy_s() - busy0, 1),
        "grid": grid[["method", "per_category", "budget", "unsafety", "utility", "feasible"]].to_dict("records"),
    }
    print(grid[["method", "per_category", "budget", "unsafety", "utility", "feasible"]].to_string(index=False))
    print(f"\ngrid: {len(grid)} points, budget {grid_budget:.3g} {cfg.budget}; cheapest feasible: "
          f"{result['grid_answer']}")
    print(f"search: {len(trials)} trials, {len(done)} distinct points, budget {search_budget:.3g} "
          f"({ratio:.1%} of the grid's; target <= 40%); answer {found} at {result['search_answer_budget']}")
    print(f"within one grid step: {within} | search wall {search_wall:.0f} s, grid wall {grid_wall:.0f} s")
    write_result(Path(args.out), result, threads)


if __name__ == "__main__":
    main()
