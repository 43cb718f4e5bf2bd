"""The default study end to end, and what orchestration costs on top of the work it orchestrates.

(a) `misalign study run configs/study-tiny.yaml` in a fresh study directory (a subprocess, as a user runs it):
    study wall time against the work it did, i.e. the wall seconds of the stages it trained plus the
    evaluations it computed (reused ones excluded), divided by the parallel slots (trials at once). A ratio of
    1.0 is perfect packing with free orchestration; the target for the default study is at most 1.3.
(b) The fixed cost of a multi-worker trial: a Ray Train TorchTrainer fit of a 2-worker loop that does nothing,
    timed from fit() to the loop's first line (start-up) and from its last line to fit()'s return (teardown).

    .venv/bin/python bench/bench_study.py [--config configs/study-tiny.yaml] [--fits 3]
Run it on an idle machine: it reports the CPU seconds the whole machine used (the study's Ray processes and
anything else), to compare with 2 cores x wall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from common import machine_busy_s, write_result


def study_run(config: str) -> dict[str, Any]:
    storage = Path(tempfile.mkdtemp(prefix="bench-study-"))
    busy0, t0 = machine_busy_s(), time.time()
    c0 = os.times()
    proc = subprocess.run([sys.executable, "-m", "misalign.cli", "study", "run", config, "--storage", str(storage)],
                          capture_output=True, text=True)
    wall = time.time() - t0
    c1 = os.times()
    if proc.returncode != 0:
        sys.exit(f"study failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ours_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    (study_dir,) = [p.parent for p in storage.glob("*/study.yaml")]
    results = pd.read_parquet(study_dir / "results.parquet")
    env = json.loads((study_dir / "environment.json").read_text())
    status = json.loads((study_dir / "status.json").read_text())
    stages = results[(results.phase != "base") & ~results.reused.astype(bool)]
    evals = results[~results.eval_reused.astype(bool)]
    stage_s, eval_s = float(stages.wall_s.sum()), float(evals.eval_s.sum())
    slots = _slots(study_dir, env)
    ratio = wall / ((stage_s + eval_s) / slots)
    return {"config": config, "cells": int(results.cell_id.nunique()), "rows": len(results),
            "stages_trained": len(stages), "stages_reused": int(results.reused.sum()),
            "evals_computed": len(evals), "wall_s": round(wall, 1), "cpu_s": round(ours_cpu, 1),
            "stage_s": round(stage_s, 1), "eval_s": round(eval_s, 1), "slots": slots,
            "overhead_ratio": round(ratio, 3), "machine_cpu_s": round(machine_busy_s() - busy0, 1),
            "tune_phase_ratio": round(_tune_phase(status) / ((stage_s + eval_s) / slots), 3),
            "status": {k: status[k] for k in ("done", "failed")}, "timing": status.get("timing", {})}


def _tune_phase(status: dict[str, Any]) -> float:
    """Seconds from the first trial's start to the end of Tune's run (the driver's fixed costs excluded)."""
    t = status.get("timing", {})
    return t.get("tune_end_s", 0.0) - t.get("first_trial_start_s", 0.0)


def _slots(study_dir: Path, env: dict[str, Any]) -> int:
    """Trials that could run at once: the cluster's CPUs over one trial's (what the study used)."""
    import yaml

    res = yaml.safe_load((study_dir / "study.yaml").read_text())["resources"]
    per_trial = res["workers"] * res["cpus_per_worker"]
    return max(1, int(env["cluster_resources"].get("CPU", 1) // per_trial))


def fit_overhead(fits: int) -> dict[str, Any]:
    """Start-up and teardown of a 2-worker TorchTrainer fit whose loop does nothing."""
    for k, v in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        os.environ.setdefault(k, v)  # what `misalign study run` sets before Ray starts
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t_init = time.time()
    ray.init(num_cpus=2)
    init_s = time.time() - t_init
    marks = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    starts, ends = [], []
    try:
        for i in range(fits):
            def loop(config: dict[str, Any]) -> None:
                import ray.train

                rank = ray.train.get_context().get_world_rank()
                Path(config["dir"], f"start-{rank}").write_text(repr(time.time()))
                Path(config["dir"], f"end-{rank}").write_text(repr(time.time()))

            run = marks / f"fit-{i}"
            run.mkdir()
            trainer = TorchTrainer(loop, train_loop_config={"dir": str(run)},
                                   scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                                   torch_config=TorchConfig(backend="gloo"),
                                   run_config=RunConfig(name=f"fit-{i}", storage_path=str(marks / "ray")))
            t0 = time.time()
            trainer.fit()
            t1 = time.time()
            first = min(float(p.read_text()) for p in run.glob("start-*"))
            last = max(float(p.read_text()) for p in run.glob("end-*"))
            starts.append(first - t0)
            ends.append(t1 - last)
    finally:
        ray.shutdown()
    return {"fits": fits, "ray_init_s": round(init_s, 2), "startup_s": [round(s, 2) for s in starts],
            "teardown_s": [round(s, 2) for s in ends], "startup_median_s": round(statistics.median(starts), 2),
            "teardown_median_s": round(statistics.median(ends), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/study-tiny.yaml")
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--out", default="bench/results/study.json")
    args = p.parse_args()
    study = study_run(args.config)
    fit = fit_overhead(args.fits)
    print(f"\n(a) study {study['config']}: {study['cells']} cells, {study['stages_trained']} stages trained, "
          f"{study['stages_reused']} reused, {study['evals_computed']} evaluations")
    print(f"{'wall s':>8} {'driver cpu s':>13} {'machine cpu s':>14} {'stages s':>9} {'evals s':>8} {'slots':>6} "
          f"{'ratio':>6} {'in Tune':>8}")
    print(f"{study['wall_s']:>8} {study['cpu_s']:>13} {study['machine_cpu_s']:>14} {study['stage_s']:>9} "
          f"{study['eval_s']:>8} {study['slots']:>6} {study['overhead_ratio']:>6} {study['tune_phase_ratio']:>8}")
    print("ratio = wall / ((stage s + eval s) / slots); target <= 1.3. 'in Tune': the same from the first trial's "
          "start to Tune's end. machine cpu s: every process (Ray's trial processes included); 2 cores x wall is "
          "the most there is")
    print("driver timeline (s from its start): " + ", ".join(f"{k} {v}" for k, v in study["timing"].items()))
    print(f"\n(b) 2-worker TorchTrainer fit with an empty loop, {fit['fits']} fits (ray.init {fit['ray_init_s']} s)")
    print(f"start-up s: {fit['startup_s']} (median {fit['startup_median_s']}), "
          f"teardown s: {fit['teardown_s']} (median {fit['teardown_median_s']})")
    write_result(Path(args.out), {"study": study, "multi_worker_fit": fit}, threads=0)


if __name__ == "__main__":
    main()
