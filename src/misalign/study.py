"""`misalign study run`: the grid of cells as a Ray Tune experiment, stages shared through the lineage cache.

    run_study(StudyConfig, StudyPaths, address) -> results table

Life cycle: validate every cell's data, eval sets, judges and models (bad input exits 2 before anything runs);
write or check the study directory; start or join Ray; build DeepSpeed's ops once per node when a stage uses
ZeRO; run (or restore) the Tune experiment, one trial per cell; assemble the results table.

A trial with one worker trains in its Tune trial's own process (actors are reused between trials, so a trial
costs no start-up); a trial with several workers runs one Ray Train TorchTrainer fit (gloo on CPUs, NCCL on
GPUs) in which every rank runs the whole cell: all its stages and evaluations, never one fit per stage.

The study directory (on storage every node sees):
    study.yaml            the study config; a rerun must match it (then it resumes)
    environment.json      package versions, Ray version, command line
    stages/               the lineage cache (misalign.lineage): every stage and evaluation, trained once
    cells/<id>.parquet    the rows of a finished cell (written atomically by the cell's trial)
    results.parquet       every row of every finished cell, rebuilt atomically as cells finish
    status.json           trials done / running / pending / failed and the cost so far (the live view)
    tune/                 Ray Tune's experiment (state, CSV/JSON/TensorBoard logs): usable by Ray's tools
    train/                Ray Train's run directories of multi-worker trials
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel

from misalign.config import EvalConfig, StudyConfig, TrialConfig
from misalign.errors import InputError
from misalign.grid import Cell, cells, stage_uses, unique_stages
from misalign.lineage import LineageCache
from misalign.runtime import rank, read_json, write_json_atomic, write_parquet_atomic

# read by Ray Train's controller when Ray starts: measured here, they cut a fit's teardown from 3-5 s to ~1 s;
# and trials stay in the working directory, so relative data paths in a config mean what they say
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "RAY_CHDIR_TO_TRIAL_DIR": "0"}
# the environment every trial and worker needs, wherever Ray places it
_PROPAGATED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                   "TOKENIZERS_PARALLELISM", "TRL_EXPERIMENTAL_SILENCE", "MISALIGN_CACHE", "HF_HOME")


@dataclass
class StudyPaths:
    root: Path

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    def cell_file(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.parquet"

    @property
    def results(self) -> Path:
        return self.root / "results.parquet"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def tune(self) -> Path:
        return self.root / "tune"


# ---- one cell -------------------------------------------------------------------------------------------

def run_cell(study: StudyConfig, cell: Cell, paths: StudyPaths, report: Any = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Run one cell on this rank (every rank of a multi-worker trial calls it); rank 0 writes its rows."""
    return run_cached_trial(cell.trial_config(study), {"cell_id": cell.id, **cell.axes}, paths.stages,
                            paths.cell_file(cell.id), report=report, progress=progress,
                            checkpoint_every=study.checkpoint_every)


def run_cached_trial(trial: TrialConfig, columns: dict[str, Any], stages: Path, rows_file: Path, *,
                     report: Any = None, progress: bool = False, checkpoint_every: int | None = None,
                     attack_only: bool = False) -> list[dict[str, Any]]:
    """A trial whose stages and evaluations live in the lineage cache at `stages` (a study's cell, a search's
    trial); rank 0 adds `columns` to every row, reports it, and writes the rows to `rows_file` at the end."""
    from misalign.runtime import quiet_libraries
    from misalign.trial import CachedLayout, prepare_trial, trial_loop

    quiet_libraries()
    attack_pairs, defense_pairs, items, _, _ = prepare_trial(trial, with_judge=False)
    judge = _judge(trial.eval.model_dump_json()) if rank() == 0 else None

    def on_row(row: dict[str, Any]) -> None:
        row.update(columns)
        if report is not None:
            report(row)

    rows = trial_loop(trial, CachedLayout(LineageCache(stages)), attack_pairs=attack_pairs,
                      defense_pairs=defense_pairs, items=items, judge=judge, progress=progress,
                      checkpoint_every=checkpoint_every, on_row=on_row, attack_only=attack_only)
    if rank() == 0:
        write_parquet_atomic(rows_file, pd.DataFrame(rows))
    return rows


@functools.lru_cache(maxsize=2)
def _judge(eval_json: str) -> Any:
    """The judge, loaded once per process: Tune reuses a trial's actor for the next cell."""
    from misalign.config import EvalConfig
    from misalign.evaluation import configured_judge

    return configured_judge(EvalConfig.model_validate_json(eval_json))


def _hold_assigned_cpus(default: float) -> None:
    """Torch threads = the CPUs Ray granted this process (Ray sets no affinity mask to read them from)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", default)
    os.environ["MISALIGN_CPUS"] = str(max(1, int(cpus)))
    os.environ["MISALIGN_NODE"] = ray.get_runtime_context().get_node_id()


def cell_trainable(config: dict[str, Any], study: dict[str, Any], root: str) -> None:
    """The Tune function trainable: one cell. Reports one result per evaluated row."""
    from ray import tune

    cfg, paths, cell = StudyConfig.model_validate(study), StudyPaths(Path(root)), Cell.from_axes(config["cell"])
    if paths.cell_file(cell.id).exists():  # finished before a crash or a restore: nothing to redo
        rows = pd.read_parquet(paths.cell_file(cell.id)).to_dict("records")
        for row in rows:
            tune.report({**row, "restored": True})
        return
    if cfg.resources.workers == 1:
        _hold_assigned_cpus(cfg.resources.cpus_per_worker)
        if _needs_deepspeed_ops(cfg)[0]:
            _single_process_group_env()
        run_cell(cfg, cell, paths, report=tune.report)
        return
    _fit_workers(cfg, cell, paths, study)
    for row in pd.read_parquet(paths.cell_file(cell.id)).to_dict("records"):
        tune.report(row)


def _single_process_group_env() -> None:
    """DeepSpeed needs a process group even for one process; a launcher would set these, the trial does.
    Kept for the actor's life: Tune reuses it, and the group, once made, stays."""
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _worker_loop(config: dict[str, Any]) -> None:
    cfg = StudyConfig.model_validate(config["study"])
    _hold_assigned_cpus(cfg.resources.cpus_per_worker)
    run_cell(cfg, Cell.from_axes(config["axes"]), StudyPaths(Path(config["root"])))


def _fit_workers(cfg: StudyConfig, cell: Cell, paths: StudyPaths, study: dict[str, Any]) -> None:
    """One Ray Train fit for the whole cell; its FailureConfig restarts a worker group that lost a worker."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_loop,
        train_loop_config={"study": study, "axes": cell.axes, "root": str(paths.root)},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=per_worker, placement_strategy=r.placement),
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(name=f"cell-{cell.id}", storage_path=str(paths.root / "train"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()


# ---- before anything runs -------------------------------------------------------------------------------

def validate_study(cfg: StudyConfig, local: bool = False) -> None:
    """Every model, distinct stage (data, adapter on the meta device), eval set, judge, logger and (`local`) the
    trial's resources: InputError on bad input (misalign.preflight)."""
    from misalign.preflight import check_study

    check_study(cfg, local=local)


def validate_eval_and_models(eval_cfg: EvalConfig, models: list[str], trust_remote_code: bool) -> None:
    """The eval sets and judges load, and every model's config and tokenizer do (a study's and a search's check)."""
    from misalign.evaluation import configured_judge, load_eval_sets
    from misalign.stage import check_model, resolve_model_path

    load_eval_sets(eval_cfg)
    configured_judge(eval_cfg)
    for model in models:
        check_model(resolve_model_path(model), trust_remote_code)


def open_run_dir(cfg: BaseModel, root: Path, record_name: str = "study.yaml") -> bool:
    """Create a study's (or search's) directory, or check that an existing one holds this config. True if
    resuming."""
    record = root / record_name
    mine = cfg.model_dump(mode="json")
    if record.exists():
        saved = yaml.safe_load(record.read_text())
        if saved != mine:
            diff = sorted(_differences(saved, mine))
            raise InputError(f"{root} holds a different {record.stem} (changed: {', '.join(diff[:8])}); "
                             "rerun with the same config to resume, or choose another --storage or name")
        return True
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} exists and is not a {record.stem} directory; choose another --storage or name")
    root.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mine, sort_keys=False))
    os.replace(tmp, record)
    return False


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in set(a) | set(b):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---- Ray -------------------------------------------------------------------------------------------------

def init_ray(address: str | None, dashboard: bool = True) -> None:
    """Join the cluster at `address`, or start a local Ray sized to this machine (the CPUs this process holds)."""
    import ray

    from misalign.runtime import cpus_held

    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    env = {k: os.environ[k] for k in (*_PROPAGATED_ENV, *_RAY_ENV) if k in os.environ}
    if ray.is_initialized():
        return
    # inside a Ray job, ray.init refuses env vars the job's runtime env already sets: keep the job's
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    env = {k: v for k, v in env.items() if k not in job_env}
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job: join that cluster
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # the dashboard (bound to 127.0.0.1) serves the state API Ray Train's controller polls; trials without
        # Train workers do not need it, and it costs about 2 s of start-up. "local": a new Ray of our own, never
        # one a `ray start` left running on this machine
        ray.init(address="local", num_cpus=cpus_held(), include_dashboard=dashboard, runtime_env={"env_vars": env})


def check_storage(paths: StudyPaths, storage_given: bool) -> int:
    """On a multi-node cluster every node must see the study directory: checked with a task on each node."""
    import ray

    nodes = _alive_nodes()
    if len(nodes) <= 1:
        return len(nodes)
    if not storage_given:
        raise InputError(f"this Ray cluster has {len(nodes)} nodes: pass --storage, a directory every node "
                         "mounts (NFS, EFS, Lustre), for the study's stages and results")
    marker = paths.root / f".visible-{uuid.uuid4().hex}"
    marker.write_text("misalign")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).exists()

    try:
        seen = _on_every_node(sees, nodes, str(marker))
    finally:
        marker.unlink()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise InputError(f"--storage {paths.root.parent} is not visible from node(s) {', '.join(blind)}: "
                         "mount the same shared filesystem at the same path on every node")
    return len(nodes)


def _needs_deepspeed_ops(cfg: StudyConfig) -> tuple[bool, bool]:
    zero = [s for side in cfg.stage_configs() for s in side.values() if s.deepspeed.zero_stage is not None]
    return bool(zero), any(s.deepspeed.offload for s in zero)


def prebuild_deepspeed_ops(offload: bool) -> list[str]:
    """Compile DeepSpeed's ops once on every node before trials start (else the first trial pays 30-40 s each)."""
    import ray

    @ray.remote(num_cpus=0)
    def build(with_adam: bool) -> str:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        built = []
        if acc.device_name() == "cpu":
            acc.create_op_builder("ShareMemCommBuilder").load()
            built.append("shm_comm")
        if with_adam:
            acc.create_op_builder("CPUAdamBuilder").load()
            built.append("cpu_adam")
        return ",".join(built) or "none"

    return _on_every_node(build, _alive_nodes(), offload)


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def _on_every_node(task: Any, nodes: list[dict[str, Any]], *args: Any) -> list[Any]:
    """Run a remote function once on each node (pinned there), results in the nodes' order."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(*args) for n in nodes])


def _max_concurrent(cfg: StudyConfig) -> int:
    """Trials the cluster holds at once: Tune must not start trials whose Train workers cannot be placed."""
    import ray

    r = cfg.resources
    if r.max_concurrent:
        return r.max_concurrent
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker:
        fits = min(fits, int(have.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    return max(1, fits)


# ---- results and progress ---------------------------------------------------------------------------------

def cell_rows(paths: StudyPaths) -> pd.DataFrame:
    """Every row of every finished cell, from the cells' own files."""
    files = sorted(paths.cells.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def assemble_results(paths: StudyPaths) -> pd.DataFrame:
    """results.parquet from the finished cells' files, rewritten atomically (never half-written)."""
    frame = cell_rows(paths)
    if not frame.empty:
        frame = frame.sort_values(["cell_id", "round", "phase"], key=_phase_order).reset_index(drop=True)
        write_parquet_atomic(paths.results, frame)
    return frame


def _phase_order(col: pd.Series) -> pd.Series:
    return col.map({"base": 0, "misalign": 1, "realign": 2}) if col.name == "phase" else col


def cost_summary(results: pd.DataFrame) -> dict[str, Any]:
    """What was trained, what was reused and what sharing saved (stage rows only; base rows cost nothing)."""
    if results.empty:
        return {"stage_rows": 0, "stages_trained": 0, "stages_reused": 0, "flops_trained": 0.0,
                "device_s_trained": 0.0, "flops_saved": 0.0, "device_s_saved": 0.0}
    stages = results[results.phase != "base"]
    trained = stages[~stages.reused.astype(bool)]
    reused = stages[stages.reused.astype(bool)]
    return {"stage_rows": len(stages), "stages_trained": len(trained), "stages_reused": len(reused),
            "flops_trained": float(trained.flops.sum()), "device_s_trained": float(trained.device_s.sum()),
            "flops_saved": float(reused.flops.sum()), "device_s_saved": float(reused.device_s.sum())}


def _study_progress_callback(paths: StudyPaths, total: int) -> Any:
    from ray import tune

    class StudyProgress(tune.Callback):
        """The live view: status.json after every trial event, one line per finished or failed trial."""

        def __init__(self) -> None:
            self.status: dict[str, str] = {}
            self.t0 = time.time()
            self.first_start: float | None = None

        def _write(self, trial: Any, state: str, say: bool) -> None:
            self.status[trial.trial_id] = state
            counts = {s: sum(v == s for v in self.status.values()) for s in ("done", "running", "failed")}
            counts["pending"] = max(0, total - len(self.status))
            results = assemble_results(paths) if state == "done" else _read_results(paths)
            cost = cost_summary(results)
            write_json_atomic(paths.status, {"cells": total, **counts, "cost": cost, "updated": time.time(),
                                             "started": self.t0, "first_trial_start": self.first_start,
                                             "trials": self.status})
            if say:
                print(f"[study] {counts['done']}/{total} done, {counts['running']} running, "
                      f"{counts['pending']} pending, {counts['failed']} failed | stages trained "
                      f"{cost['stages_trained']}, reused {cost['stages_reused']} | {cost['flops_trained']:.3g} "
                      f"FLOPs, {cost['device_s_trained']:.0f} device-s | {time.time() - self.t0:.0f}s", flush=True)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.first_start = self.first_start or time.time()
            self._write(trial, "running", False)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._write(trial, "done", True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._write(trial, "failed", True)

    return StudyProgress()


def _read_results(paths: StudyPaths) -> pd.DataFrame:
    return pd.read_parquet(paths.results) if paths.results.exists() else pd.DataFrame()


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

def run_study(cfg: StudyConfig, paths: StudyPaths, *, address: str | None = None,
              storage_given: bool = False) -> pd.DataFrame:
    """Run (or resume) the study; returns the results table (also STUDY/results.parquet)."""
    from ray import tune

    t0 = time.time()
    timing: dict[str, float] = {}
    validate_study(cfg, local=address is None)
    timing["validate_s"] = time.time() - t0
    grid = cells(cfg)
    resuming = open_run_dir(cfg, paths.root)
    init_ray(address, dashboard=cfg.resources.workers > 1)
    timing["ray_ready_s"] = time.time() - t0
    import ray

    nodes = check_storage(paths, storage_given)
    from misalign.stage import package_versions

    write_json_atomic(paths.root / "environment.json", {
        "versions": {**package_versions(), "ray": ray.__version__}, "command": sys.argv, "nodes": nodes,
        "cluster_resources": ray.cluster_resources()})
    ds, offload = _needs_deepspeed_ops(cfg)
    if ds and not all(paths.cell_file(c.id).exists() for c in grid):
        print(f"[study] DeepSpeed ops built on {nodes} node(s): {prebuild_deepspeed_ops(offload)}", flush=True)

    study = cfg.model_dump(mode="json")
    trainable = tune.with_parameters(cell_trainable, study=study, root=str(paths.root.resolve()))
    r = cfg.resources
    single = r.workers == 1
    # a multi-worker trial only waits on its fit: it holds no CPU (a token of memory: Tune needs some resource)
    trial_resources = ({"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker} if single
                       else {"cpu": 0, "memory": 2**20})
    trainable = tune.with_resources(trainable, trial_resources)
    done_before = sum(paths.cell_file(c.id).exists() for c in grid)
    print(f"[study] {cfg.name}: {len(grid)} cells ({done_before} done before this run), "
          f"{len(unique_stages(stage_uses(cfg)))} unique stages -> {paths.root}", flush=True)
    if resuming and tune.Tuner.can_restore(str(paths.tune.resolve())):
        tuner = tune.Tuner.restore(str(paths.tune.resolve()), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search([c.axes for c in grid])},
            tune_config=tune.TuneConfig(max_concurrent_trials=_max_concurrent(cfg), reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(paths.root.resolve()),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=[_study_progress_callback(paths, len(grid)), *_logger_callbacks(cfg)], verbose=0),
        )
    timing["tune_start_s"] = time.time() - t0
    tuner.fit()
    timing["tune_end_s"] = time.time() - t0
    results = assemble_results(paths)
    _prune_merged(paths)
    timing["total_s"] = time.time() - t0
    if paths.status.exists():  # where the wall time went, for bench/bench_study.py and the curious
        status = read_json(paths.status)
        if status.get("first_trial_start"):
            timing["first_trial_start_s"] = status["first_trial_start"] - t0
        write_json_atomic(paths.status, {**status, "timing": {k: round(v, 2) for k, v in timing.items()}})
    missing = [c.id for c in grid if not paths.cell_file(c.id).exists()]
    cost = cost_summary(results)
    print(f"[study] done in {time.time() - t0:.0f}s: {len(grid) - len(missing)}/{len(grid)} cells, "
          f"{len(results)} rows -> {paths.results}; stages trained {cost['stages_trained']}, reused "
          f"{cost['stages_reused']} (saved {cost['device_s_saved']:.0f} device-s)", flush=True)
    if missing:
        print(f"[study] {len(missing)} cell(s) failed after retries: {', '.join(missing)}; rerun to retry them",
              flush=True)
    return results


def _trial_dirname(trial: Any) -> str:
    return f"cell-{Cell.from_axes(trial.config['cell']).id}"


def _prune_merged(paths: StudyPaths) -> None:
    """With every cell done, merged copies of adapter stages go (rebuilt from parent + adapter on demand)."""
    import shutil

    for stage in paths.stages.glob("*/adapter"):
        model = stage.parent / "model"
        if model.exists() and LineageCache.stage_done(stage.parent):
            shutil.rmtree(model, ignore_errors=True)


def read_status(paths: StudyPaths) -> dict[str, Any]:
    """`misalign study status`: the live view's numbers, from the study directory alone (no Ray needed)."""
    if not (paths.root / "study.yaml").exists():
        raise InputError(f"{paths.root} is not a study directory (no study.yaml)")
    cfg = StudyConfig.model_validate(yaml.safe_load((paths.root / "study.yaml").read_text()))
    grid = cells(cfg)
    done = sum(paths.cell_file(c.id).exists() for c in grid)
    live = read_json(paths.status) if paths.status.exists() else {}
    results = cell_rows(paths)
    uses = stage_uses(cfg)
    return {"name": cfg.name, "cells": len(grid), "done": done, "running": live.get("running", 0),
            "failed": live.get("failed", 0), "pending": len(grid) - done - live.get("running", 0),
            "unique_stages": len(unique_stages(uses)), "stage_uses": len(uses),
            "cost": cost_summary(results), "updated": live.get("updated")}
