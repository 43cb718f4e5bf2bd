"""`misalign study run`: the grid of cells as a Ray Tune experiment, stages shared through the lineage cache.

    run_study(StudyConfig, RunDir, address) -> StudyRun (results table, failed and unfinished cells)

Life cycle: after the preflight (misalign.preflight.check_study, run by the CLI: every cell's data, eval sets,
judges and models; bad input exits 2 before anything runs), write or check the study directory (the same
config and the same inputs, by contents, to resume: misalign.rundir); start or join Ray (misalign.cluster);
build DeepSpeed's ops once per node when a stage uses ZeRO; run a Tune experiment, one trial per cell not yet
done (cells keep their own attempt logs: misalign.attempts); assemble the results.

A trial with one worker trains in its Tune trial's own process (actors are reused between trials, so a trial
costs no start-up); a trial with several workers runs one Ray Train TorchTrainer fit (gloo on CPUs, NCCL on
GPUs) in which every rank runs the whole cell: all its stages and evaluations, never one fit per stage.

The study directory, on its storage (a directory every node sees, or an object store: misalign.storage):
    study.yaml, inputs.json   the study config and its inputs' contents; a rerun must match both (then it resumes)
    environment.json      package versions, Ray version, command line
    stages/               the lineage cache (misalign.lineage): every stage (adapter or weights) and evaluation
    cells/<id>.parquet    the rows of a finished cell (written atomically by the cell's trial)
    results.parquet       every row of every finished cell, rebuilt atomically as cells finish
    status.json           trials done / running / retrying / pending / failed and the cost so far (the live view)
    attempts/<id>.json    each attempt at a cell: node, outcome (done, failed, crashed, preempted, node lost), the
                          work it lost; preemptions do not use up max_failures
    tune/, tune-N/        Ray Tune's experiment of each run of the command (CSV/JSON/TensorBoard logs): Ray's tools
    train/                Ray Train's run directories of multi-worker trials
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import yaml

from misalign import preemption
from misalign.attempts import DONE, FAILED, NOTICED, CellAttempts, preemption_summary
from misalign.claims import start_leases
from misalign.cluster import (
    check_storage,
    hold_assigned_resources,
    init_ray,
    max_concurrent,
    needs_deepspeed_ops,
    prebuild_deepspeed_ops,
    single_process_group_env,
    trial_asks,
    tune_storage,
)
from misalign.config import StudyConfig
from misalign.errors import InputError
from misalign.grid import Cell, cells, stage_uses, unique_stages
from misalign.results import (
    assemble_results,
    cell_rows,
    cost_summary,
    read_results,
)
from misalign.rundir import RunDir, open_run_dir
from misalign.storage import Store, check_store

STATUS = "status.json"


# ---- one cell -------------------------------------------------------------------------------------------

def run_cell(study: StudyConfig, cell: Cell, paths: RunDir, report: Any = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Run one cell on this rank (every rank of a multi-worker trial calls it); rank 0 writes its rows."""
    # imported here: trial brings torch and trl, which `study status` and the driver's start do without
    from misalign.trial import run_cached_trial

    return run_cached_trial(cell.trial_config(study), {"cell_id": cell.id, **cell.axes}, paths.stages,
                            (paths.store, paths.cell_file(cell.id)), report=report, progress=progress,
                            checkpoint_every=study.checkpoint_every, peak_flops=study.plan.peak_flops)


def cell_trainable(config: dict[str, Any], study: dict[str, Any], root: str, run: float) -> None:
    """The Tune function trainable: one cell (one attempt at it). Reports one result per evaluated row.

    Tune retries every error (its max_failures is -1): this attempt log tells preemptions from failures and
    ends a cell that failed more than `max_failures` times in this run (`run`: when the command started) by
    returning without rows; the driver reports it (misalign.attempts)."""
    import ray
    from ray import tune

    cfg, paths, cell = StudyConfig.model_validate(study), RunDir(Store(root)), Cell.from_axes(config["cell"])
    if paths.cell_done(cell.id):  # finished before a crash or a restore: nothing to redo
        for row in paths.store.read_parquet(paths.cell_file(cell.id)).to_dict("records"):
            tune.report({**row, "restored": True})
        return
    attempts = CellAttempts(paths.store, cell.id).load()
    if attempts.given_up(run, cfg.max_failures, cfg.max_preemptions):
        return  # given up; the driver names it
    attempts.begin(run, ray.get_runtime_context().get_node_id(), cfg.resources.workers, _node_gone)

    def report(row: dict[str, Any]) -> None:
        tune.report(row)
        attempts.kept()  # a stage and its evaluation are done: a retry starts after them

    try:
        with preemption.on_saved(attempts.kept):
            if cfg.resources.workers == 1:
                hold_assigned_resources(cfg.resources.cpus_per_worker)
                if needs_deepspeed_ops(cfg)[0]:
                    single_process_group_env()
                run_cell(cfg, cell, paths, report=report)
            else:
                _fit_workers(cfg, cell, paths, study)
                for row in paths.store.read_parquet(paths.cell_file(cell.id)).to_dict("records"):
                    tune.report(row)
    except preemption.StagePreempted as e:
        attempts.end(NOTICED, str(e))
        raise
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        attempts.end(FAILED, f"{type(e).__name__}: {lines[-1] if lines else ''}")
        raise
    attempts.end(DONE)


def _node_gone(node_id: str) -> float | None:
    """When the Ray node `node_id` died (seconds since the epoch), or None while it lives. The GCS's node table
    has the time of death; ray.nodes() does not."""
    from ray._private.worker import global_worker

    for info in global_worker.gcs_client.get_all_node_info(timeout=30).values():
        if info.node_id.hex() == node_id:
            return None if info.state == 0 else (info.end_time_ms / 1000 or time.time())  # 0: ALIVE
    return time.time()  # no longer in the table: long gone


def _worker_loop(config: dict[str, Any]) -> None:
    cfg = StudyConfig.model_validate(config["study"])
    hold_assigned_resources(cfg.resources.cpus_per_worker)
    run_cell(cfg, Cell.from_axes(config["axes"]), RunDir(Store(config["root"])))


def _fit_workers(cfg: StudyConfig, cell: Cell, paths: RunDir, study: dict[str, Any]) -> None:
    """One Ray Train fit for the whole cell; its FailureConfig restarts a worker group that lost a worker."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_loop,
        train_loop_config={"study": study, "axes": cell.axes, "root": paths.root},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=per_worker, placement_strategy=r.placement),
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(name=f"cell-{cell.id}", **tune_storage(paths.store.child("train")),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()


# ---- results and progress ---------------------------------------------------------------------------------

class StudyStalled(InputError):
    """No trial could start: what a trial asks for is more than any node the cluster has (or gained) holds."""


def _study_progress_callback(paths: RunDir, total: int, cfg: StudyConfig, run: float) -> Any:
    from ray import tune

    timeout_s = cfg.resources.start_timeout_s
    asks = trial_asks(cfg.resources)

    def cell_of(trial: Any) -> str:
        return Cell.from_axes(trial.config["cell"]).id

    class StudyProgress(tune.Callback):
        """The live view: status.json after every trial event, one line per finished or failed trial."""

        def __init__(self) -> None:
            self.status: dict[str, str] = {}
            self.t0 = time.time()
            self.first_start: float | None = None

        def _write(self, trial: Any, state: str, say: bool) -> None:
            self.status[trial.trial_id] = state
            counts = {s: sum(v == s for v in self.status.values()) for s in ("done", "running", "retrying",
                                                                              "failed")}
            counts["pending"] = max(0, total - len(self.status))
            results = assemble_results(paths.store) if state == "done" else read_results(paths.store)
            cost = cost_summary(results)
            paths.store.write_json(STATUS, {"cells": total, **counts, "cost": cost, "updated": time.time(),
                                            "started": self.t0, "first_trial_start": self.first_start,
                                            "trials": self.status})
            if say:
                print(f"[study] {counts['done']}/{total} done, {counts['running']} running, "
                      f"{counts['pending']} pending, {counts['failed']} failed | stages trained "
                      f"{cost['stages_trained']}, reused {cost['stages_reused']} | {cost['flops_trained']:.3g} "
                      f"FLOPs, {cost['device_s_trained']:.0f} device-s | {time.time() - self.t0:.0f}s", flush=True)

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            """Tune waits forever for resources no node has: after start_timeout_s with no trial started,
            stop and say what a trial asks for and what the cluster has."""
            if self.first_start is None and time.time() - self.t0 > timeout_s:
                import ray

                nodes = [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
                         for n in ray.nodes() if n["Alive"]]
                raise StudyStalled(
                    f"no trial could start in {timeout_s:g} s (resources.start_timeout_s): a trial asks for "
                    f"{asks}; the cluster's nodes have {nodes}. Lower resources.* or add nodes that fit one")

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.first_start = self.first_start or time.time()
            self._write(trial, "running", False)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # a trial that returns without its cell done gave the cell up (misalign.attempts)
            self._write(trial, "done" if paths.cell_done(cell_of(trial)) else "failed", True)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            """Tune retries every error; say what the attempt was and how many are left."""
            attempts = CellAttempts(paths.store, cell_of(trial)).load()
            last = attempts.history[-1] if attempts.history else None
            how = f"{last.outcome}: {last.error}" if last is not None and last.outcome != "running" else \
                "its trial was lost (the next attempt settles how)"
            print(f"[study] cell {cell_of(trial)} {how[:300]} | retrying ({attempts.failures(run)} of "
                  f"{cfg.max_failures} failure retries, {attempts.preemptions()} of {cfg.max_preemptions} "
                  "preemption retries used)", flush=True)
            self._write(trial, "retrying", False)

    return StudyProgress()


def _logger_callbacks(cfg: StudyConfig) -> list[Any]:
    out: list[Any] = []
    for name in cfg.loggers:
        try:
            if name == "mlflow":
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                out.append(MLflowLoggerCallback(experiment_name=cfg.name))
            else:
                from ray.air.integrations.wandb import WandbLoggerCallback

                out.append(WandbLoggerCallback(project=cfg.name))  # its API key comes from WANDB_API_KEY
        except ImportError as e:
            raise InputError(f"loggers: {name} is not installed ({e.name}); pip install {name}") from None
    return out


# ---- the study --------------------------------------------------------------------------------------------

@dataclass
class StudyRun:
    """What a run of a study left: the results table (also STUDY/results.parquet), the cells that failed after
    their retries, and the cells left unfinished because the run was stopped (Ctrl-C, SIGTERM)."""

    results: pd.DataFrame
    failed: list[str]
    unfinished: list[str]


def run_study(cfg: StudyConfig, paths: RunDir, *, address: str | None = None, storage_given: bool = False,
              started: float | None = None) -> StudyRun:
    """Run (or resume) the study, whose config passed the preflight (misalign.preflight.check_study: the CLI
    runs it, nothing here checks again). `started`: when the command started (its timing counts from there)."""
    from ray import tune

    t0 = started or time.time()
    timing: dict[str, float] = {}
    check_store(paths.store)
    timing["validate_s"] = time.time() - t0
    grid = cells(cfg)
    store = paths.store
    resuming = open_run_dir(cfg, store)
    init_ray(address, dashboard=cfg.resources.workers > 1)
    timing["ray_ready_s"] = time.time() - t0
    import ray

    nodes = check_storage(store, storage_given)
    # one trainer per stage without file locks: the lease actor (detached; misalign.claims)
    if store.remote:
        start_leases(paths.stages.url)
    from misalign.runtime import package_versions

    store.write_json("environment.json", {
        "versions": {**package_versions(), "ray": ray.__version__}, "command": sys.argv, "nodes": nodes,
        "cluster_resources": ray.cluster_resources()})
    ds, offload = needs_deepspeed_ops(cfg)
    if ds and not all(paths.cell_done(c.id) for c in grid):
        print(f"[study] DeepSpeed ops built on {nodes} node(s): {prebuild_deepspeed_ops(offload)}", flush=True)

    study = cfg.model_dump(mode="json")
    trainable = tune.with_parameters(cell_trainable, study=study, root=store.location, run=t0)
    r = cfg.resources
    single = r.workers == 1
    # a multi-worker trial only waits on its fit: it holds no CPU (a token of memory: Tune needs some resource)
    trial_resources = ({"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker} if single
                       else {"cpu": 0, "memory": 2**20})
    trainable = tune.with_resources(trainable, trial_resources)
    done_before = sum(paths.cell_done(c.id) for c in grid)
    at_once = max_concurrent(cfg)  # on an autoscaling cluster, what it can grow to
    # every trial that may run is asked for at once, so an autoscaler sees the study's whole width (ray #43451);
    # Tune's own rule (200, or 1.1 x the cluster's CPUs with a warning) would track a cluster that has not grown
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(at_once))
    print(f"[study] {cfg.name}: {len(grid)} cells ({done_before} done before this run), "
          f"{len(unique_stages(stage_uses(cfg)))} unique stages, up to {at_once} at once -> {store.url}", flush=True)
    # a fresh Tune experiment each run of the command (tune, tune-1, ...): every cell not done runs, failed
    # ones included, and finished ones only report their rows. Tune retries every error (max_failures -1):
    # the cell's attempt log counts failures and preemptions apart (misalign.attempts)
    runs_before = sum(d == "tune" or d.startswith("tune-") for d in store.subdirs()) if resuming else 0
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([c.axes for c in grid])},
        tune_config=tune.TuneConfig(max_concurrent_trials=at_once, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name="tune" if runs_before == 0 else f"tune-{runs_before}", **tune_storage(store),
            failure_config=tune.FailureConfig(max_failures=-1),
            callbacks=[_study_progress_callback(paths, len(grid), cfg, t0), *_logger_callbacks(cfg)],
            verbose=0),
    )
    timing["tune_start_s"] = time.time() - t0
    tuner.fit()
    timing["tune_end_s"] = time.time() - t0
    results = assemble_results(store)
    timing["total_s"] = time.time() - t0
    if store.exists(STATUS):  # where the wall time went, for bench/bench_study.py and the curious
        status = store.read_json(STATUS)
        if status.get("first_trial_start"):
            timing["first_trial_start_s"] = status["first_trial_start"] - t0
        store.write_json(STATUS, {**status, "timing": {k: round(v, 2) for k, v in timing.items()}})
    missing = [c.id for c in grid if not paths.cell_done(c.id)]
    cost = cost_summary(results)
    print(f"[study] done in {time.time() - t0:.0f}s: {len(grid) - len(missing)}/{len(grid)} cells, "
          f"{len(results)} rows -> {paths.results}; stages trained {cost['stages_trained']}, reused "
          f"{cost['stages_reused']} (saved {cost['device_s_saved']:.0f} device-s)", flush=True)
    errors = _cell_errors(cfg, paths, missing, t0)
    failed = [c for c in missing if c in errors]
    unfinished = [c for c in missing if c not in errors]  # stopped before they ended, never failed
    lost = preemption_summary(store)
    if lost["preemptions"] or lost["failures"]:
        print(f"[study] preemptions survived: {lost['preemptions']} ({lost['noticed']} with a notice, "
              f"{lost['nodes_lost']} nodes lost without one), failed attempts: {lost['failures']}; interrupted "
              f"attempts lost {lost['lost_device_s']:.0f} device-s", flush=True)
    if failed:
        print(f"[study] {len(failed)} cell(s) failed after retries: {', '.join(failed)}; rerun to retry them",
              flush=True)
        for cell_id in failed:
            print(f"[study]   {cell_id}: {errors[cell_id]}", flush=True)
    if unfinished:
        print(f"[study] {len(unfinished)} cell(s) unfinished, the run was stopped: {', '.join(unfinished)}; "
              "rerun the same command to resume", flush=True)
    return StudyRun(results, failed, unfinished)


def _cell_errors(cfg: StudyConfig, paths: RunDir, missing: list[str], run: float) -> dict[str, str]:
    """Each unfinished cell that was given up in this run, with the last line of its last error (the whole
    traceback is in Tune's error file)."""
    errors = {}
    for cell_id in missing:
        attempts = CellAttempts(paths.store, cell_id).load()
        if attempts.given_up(run, cfg.max_failures, cfg.max_preemptions):
            errors[cell_id] = attempts.history[-1].error if attempts.history else "failed"
    return errors


def _trial_dirname(trial: Any) -> str:
    return f"cell-{Cell.from_axes(trial.config['cell']).id}"


def read_status(paths: RunDir) -> dict[str, Any]:
    """`misalign study status`: the live view's numbers, from the study directory alone (no Ray needed)."""
    store = paths.store
    if not store.exists("study.yaml"):
        raise InputError(f"{store.url} is not a study directory (no study.yaml)")
    cfg = StudyConfig.model_validate(yaml.safe_load(store.read_text("study.yaml")))
    grid = cells(cfg)
    done = sum(paths.cell_done(c.id) for c in grid)
    live = store.read_json(STATUS) if store.exists(STATUS) else {}
    results = cell_rows(store)
    uses = stage_uses(cfg)
    return {"name": cfg.name, "cells": len(grid), "done": done, "running": live.get("running", 0),
            "failed": live.get("failed", 0), "retrying": live.get("retrying", 0),
            "pending": len(grid) - done - live.get("running", 0) - live.get("retrying", 0),
            "preemptions": preemption_summary(store),
            "unique_stages": len(unique_stages(uses)), "stage_uses": len(uses),
            "cost": cost_summary(results), "updated": live.get("updated")}
