"""Does `misalign study plan` know what stages cost? Its calibrated estimate against the measured wall time of a
sample of the study's own stages.

1. Calibrate (unless --calibration names a table): for each stage shape in the sample, one short stage of that
   shape (its config, data and model, --calibrate-steps optimizer steps) measured as bench_gpu.py measures one:
   steady step time after --warm-steps, the stage time steady steps do not explain. The rows go to a table
   (misalign.calibration), written beside the results.
2. Estimate: the study's plan with plan.calibration set to that table: each sampled stage's wall time.
3. Measure: every sampled stage trained whole (misalign.stage.run_stage with its grid config, seed and data,
   from its cell's root model: a defense's cost does not depend on the weights it starts from); its wall time is
   the ledger's, loading and saving included, as a study's worker spends it.
The sample: per phase and method, the unique stages of the first seed with the fewest and the most FLOPs. The
calibration stages are short runs; the sampled stages are the study's real ones, up to 100x longer, so the
check is whether overhead + FLOPs / (peak x MFU) carries from one to the other.

    python3 bench/bench_plan.py                                   # CPU: configs/study-tiny.yaml on the world
    bash bench/gpu_check.sh plan                                  # a GPU: study-paper's settings on an 8B Llama

--rows MIN-MAX trains every stage on bench_gpu.py's rows (random words, MIN-MAX tokens, 13 categories) instead
of the study's data: the paper's files are not on a lent machine, and the world's rows are ~35 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench_gpu import StepTimes, steady_step_s
from common import write_result
from misalign.calibration import row_from_bench, table_path, write_table
from misalign.config import StudyConfig, load_config
from misalign.errors import InputError
from misalign.grid import stage_uses
from misalign.methods import METHODS
from misalign.objectives import OBJECTIVES
from misalign.plan import StagePlan, estimate
from misalign.runtime import match_threads
from misalign.stage import StageRun, run_stage

TARGET = 0.25  # issue 24: the plan's device-hours within 25% of the measured stages


def sample(stages: list[StagePlan], seed: int) -> list[StagePlan]:
    """Per (phase, method): the stage of `seed` with the fewest FLOPs and the one with the most."""
    groups: dict[tuple[str, str], list[StagePlan]] = {}
    for s in stages:
        if s.seed == seed and s.optimizer_steps > 0:  # a repair trains nothing: no MFU to calibrate
            groups.setdefault((s.phase, s.method), []).append(s)
    picked = [g for group in groups.values() for g in (min(group, key=lambda s: s.flops),
                                                        max(group, key=lambda s: s.flops))]
    return list({s.key: s for s in picked}.values())


def run(use: Any, out: Path, steps: int | None = None, callbacks: list[Any] | None = None) -> Any:
    """Train one of the grid's stages from its cell's root model (`steps`: cut to that many optimizer steps)."""
    cfg = use.config
    if steps is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        return run_stage(StageRun(parent=use.cell.model, config=cfg, direction=use.phase, out_dir=out,
                                  seed=use.cell.seed, progress=False, callbacks=callbacks or []))


def calibrate(picked: list[StagePlan], uses: dict[str, Any], a: argparse.Namespace, peak: float,
              work: Path) -> list[Any]:
    """One short stage per shape in the sample (its row length aside: a row speaks for rows within
    misalign.calibration.ROW_RATIO of its own), on the largest stage's rows, measured into a calibration row."""
    rows, shapes = [], {}
    for s in sorted(picked, key=lambda s: -s.examples):
        shapes.setdefault((s.model, re.sub(r", [\d.]+ tok/row", "", s.shape)), s)
    for s in shapes.values():
        use = uses[s.key]
        run(use, work / "calibrate", 2)  # the process's first stage of a method pays its imports: not a shape's cost
        clock = StepTimes()
        t0 = time.perf_counter()
        ledger = run(use, work / "calibrate", a.calibrate_steps, [clock.callback])
        _, step_s = steady_step_s(clock.times, a.warm_steps)
        record = {"method": s.method, "batch_size": use.config.resolved().train.batch_size,
                  "grad_accum": use.config.resolved().train.grad_accum, "steps": ledger.optimizer_steps,
                  "steady_step_s": step_s, "stage_wall_s": ledger.wall_s, "tokens": ledger.tokens,
                  "total_params": ledger.total_params, "compile": s.compiled_on_gpu and torch.cuda.is_available(),
                  "steady_mfu": ledger.flops / ledger.optimizer_steps / step_s / peak,
                  "liger": use.config.train.liger_kernels, "packing": use.config.train.packing, "stages_per_gpu": 1,
                  # the stage's rows as the plan counts them (the ledger's tokens within 1%); a small stage's
                  # batches are not full, so the ledger's tokens per batch slot would understate them
                  "row_tokens_mean": s.tokens_per_example / OBJECTIVES[METHODS[s.method].objective].sequences_per_example}
        row = row_from_bench(record, {"peak_flops": peak, "gradient_checkpointing":
                                      str(use.config.train.gradient_checkpointing)},
                             a.device_name, f"bench_plan.py calibration ({a.config})")
        assert not isinstance(row, str), row
        rows.append(row)
        print(f"calibrate {s.shape}: {ledger.optimizer_steps} steps, steady {step_s * 1e3:.1f} ms/step, MFU "
              f"{row.mfu:.3g}, overhead {row.overhead_s:.1f} s ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def bench_rows(a: argparse.Namespace, model: str) -> str:
    """bench_gpu.py's rows of --rows MIN-MAX tokens in `model`'s tokenizer, enough for every sampled stage."""
    from bench_gpu import train_rows
    from misalign.models import config_path, load_tokenizer

    low, high = (int(x) for x in a.rows.split("-"))
    a.work.mkdir(parents=True, exist_ok=True)
    rows = argparse.Namespace(row_min=low, row_tokens=high, steps=40, work=a.work)  # 2,560 rows: 196 a category
    return str(train_rows(rows, load_tokenizer(config_path(model), False)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/study-tiny.yaml")
    ap.add_argument("--set", action="append", default=[], help="a study config override, as `study run --set`")
    ap.add_argument("--calibration", default=None, help="a table to check instead of calibrating here")
    ap.add_argument("--calibrate-steps", type=int, default=20, help="optimizer steps of each calibration stage")
    ap.add_argument("--warm-steps", type=int, default=3, help="first steps left out of the steady step time")
    ap.add_argument("--max-stages", type=int, default=8, help="at most this many sampled stages")
    ap.add_argument("--device-name", default=None, help="the device's name in the table (default: torch's)")
    ap.add_argument("--rows", default=None, metavar="MIN-MAX", help="train on rows of MIN-MAX tokens (see above)")
    ap.add_argument("--tiny", action="store_true", help="the CPU smoke test: 2 stages, 6 calibration steps")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_plan"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_plan.json")
    a = ap.parse_args(argv)
    threads = match_threads()
    cuda = torch.cuda.is_available()
    a.device_name = a.device_name or (torch.cuda.get_device_name() if cuda else "cpu")
    if a.tiny:
        a.max_stages, a.calibrate_steps = min(a.max_stages, 2), min(a.calibrate_steps, 6)
    try:
        study = load_config(a.config, a.set, schema=StudyConfig)
        if a.rows:
            a.set += [f"{side}.data.{k}={v}" for side in ("attack", "defense")
                      for k, v in (("source", bench_rows(a, study.models[0])), ("format", "pairs"),
                                   ("benign_source", "null"))]
            study = load_config(a.config, a.set, schema=StudyConfig)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uses = {u.key: u for u in stage_uses(study)}

    def plan_with(table: str) -> list[StagePlan]:
        return estimate(load_config(a.config, [*a.set, f"plan.calibration={table}"], schema=StudyConfig)).stages

    # the sample depends on FLOPs only, not on the table: with a given table one estimate does both
    table = a.calibration
    stages = plan_with(table) if table else estimate(study).stages
    picked = sample(stages, study.seeds[0])[:a.max_stages]
    if table is None:
        table = str(a.work / "calibration.csv")
        write_table(calibrate(picked, uses, a, study.plan.peak_flops, a.work), Path(table))
        stages = plan_with(table)
    planned = {s.key: s for s in stages}
    results = []
    print(f"{'stage':<44}{'shape':<52}{'steps':>6}{'plan s':>9}{'measured s':>12}{'error':>8}", flush=True)
    for s in picked:
        p = planned[s.key]
        ledger = run(uses[s.key], a.work / "stage")
        predicted = p.wall_hours * 3600
        error = predicted / ledger.wall_s - 1
        results.append({"key": s.key, "phase": s.phase, "method": s.method, "per_category": s.per_category,
                        "shape": p.shape, "measured_by": p.measured_by, "optimizer_steps": ledger.optimizer_steps,
                        "plan_steps": p.optimizer_steps, "flops": ledger.flops, "plan_flops": p.flops,
                        "plan_s": predicted, "measured_s": ledger.wall_s, "error": error})
        label = f"{s.phase} {s.method} {s.per_category:g}/cat"
        print(f"{label:<44}{p.shape[:50]:<52}{ledger.optimizer_steps:>6}{predicted:>9.1f}{ledger.wall_s:>12.1f}"
              f"{100 * error:>+7.0f}%", flush=True)
    measured = [r for r in results if r["measured_by"]]
    worst = max((abs(r["error"]) for r in measured), default=float("nan"))
    total_error = (sum(r["plan_s"] for r in results) / sum(r["measured_s"] for r in results) - 1
                   if results else float("nan"))
    print(f"{len(measured)} of {len(results)} stages priced from the calibration; the largest error "
          f"{100 * worst:.0f}% (target {100 * TARGET:.0f}%); the sample's total {100 * total_error:+.0f}%")
    write_result(a.out, {"device": a.device_name, "args": {k: str(v) for k, v in vars(a).items()},
                         "calibration": table_path(table).read_text(),
                         "stages": results, "worst_error": worst, "total_error": total_error,
                         "within_target": bool(measured) and worst <= TARGET}, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
