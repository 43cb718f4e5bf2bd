"""`misalign search attack|defense`: Optuna (TPE, through Ray Tune's OptunaSearch) over a stage's knobs, for the
cheapest attack that misaligns a model or the cheapest defense that realigns it.

    run_search(SearchConfig, RunDir, address) -> answer (also SEARCH/answer.json)

Each Tune trial is one point of the space: a trial of the study's kind (base eval, misalign, and for a defense
search realign), its stages and evaluations in the lineage cache, so a point seen before (or a misalignment a
study already trained, with --stages pointing at that study's stages/) costs nothing. The trial reports the
point's budget (misalign.budget), unsafety, utility and its constraint values; Optuna keeps them in its
database (SQLite beside the search by default, any SQLAlchemy URL otherwise) with the constraint as a user
attribute and as the trial's constraints (Trial.set_constraint), which TPE reads: infeasible trials stay in the
study and steer the sampler away.
Parallel trials: TPE's constant liar, so trials running at once do not all propose the same point.
Rerunning the same command resumes from the database: the study continues (the sampler learns from every
finished trial) and only the missing trials run, each run in its own Tune experiment directory.

The search directory:
    search.yaml, environment.json   the config (a rerun must match it), versions
    optuna.db                       the Optuna study (unless `storage` names another database)
    stages/                         the lineage cache (or the study's, with --stages)
    points/<id>.parquet             the rows of each evaluated point
    trials.parquet                  every trial: its knobs, budget, unsafety, utility, feasibility
    answer.json                     the answer: the cheapest feasible point (or the Pareto front)
    tune/, tune-1/, ...             Ray Tune's experiment of each run
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from misalign.budget import BUDGETS, money, stage_budget
from misalign.cache import note_store_use
from misalign.config import SearchConfig, TrialConfig
from misalign.errors import InputError
from misalign.results import BASE, DEVICE_S, MISALIGN, PHASE, REALIGN, REUSED, UNSAFETY, UTILITY
from misalign.rundir import RunDir, open_run_dir
from misalign.storage import Store, check_store

# ---- the space and one point --------------------------------------------------------------------------------

def optuna_space(cfg: SearchConfig) -> dict[str, Any]:
    """Optuna distributions: the searched side's method and size lists (when they offer a choice), then `space`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    side = cfg.searched
    space: dict[str, Any] = {}
    if len(side.methods) > 1:
        space["method"] = CategoricalDistribution(side.methods)
    if len(side.per_category) > 1:
        if _ordinal(side.per_category):  # sizes are ordered: TPE models "more data" as a direction
            space[SIZE_INDEX] = IntDistribution(0, len(side.per_category) - 1)
        else:
            space["per_category"] = CategoricalDistribution(side.per_category)
    for key, k in cfg.space.items():
        if k.integer:
            space[key] = IntDistribution(int(k.low), int(k.high), log=k.log, step=int(k.step or 1))
        else:
            space[key] = FloatDistribution(k.low, k.high, log=k.log, step=k.step)
    return space


SIZE_INDEX = "per_category_index"  # the sampled position in the sorted per_category list


def _ordinal(sizes: list[float | None]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sizes)


def decode(cfg: SearchConfig, sampled: dict[str, Any]) -> dict[str, Any]:
    """The point a sampled configuration stands for: {method, per_category, <knob>: value}."""
    side = cfg.searched
    out = dict(sampled)
    if SIZE_INDEX in out:
        out["per_category"] = sorted(side.per_category)[int(out.pop(SIZE_INDEX))]
    out.setdefault("method", side.methods[0])
    out.setdefault("per_category", side.per_category[0])
    return out


def encode(cfg: SearchConfig, point: dict[str, Any]) -> dict[str, Any]:
    """The sampled form of a point (decode's inverse), for the points tried first."""
    space = optuna_space(cfg)
    side = cfg.searched
    out = {k: v for k, v in point.items() if k in space}
    if SIZE_INDEX in space and "per_category" in point:
        out[SIZE_INDEX] = sorted(side.per_category).index(point["per_category"])
    missing = set(space) - set(out)
    if missing:  # Optuna needs a value for every knob of a point it is told to try
        raise InputError(f"start_points: {point} gives no value for {', '.join(sorted(missing))}")
    return out


def point_trial(cfg: SearchConfig, params: dict[str, Any]) -> TrialConfig:
    """The trial a point stands for: the searched side's stage at `params`, the other side fixed."""
    side = cfg.searched
    point = {"method": params.get("method", side.methods[0]),
             "per_category": params.get("per_category", side.per_category[0]),
             **{k: v for k, v in params.items() if k not in ("method", "per_category")}}
    searched = side.stage(point)
    attack = searched if cfg.kind == "attack" else cfg.attack.stage(
        {"method": cfg.attack.methods[0], "per_category": cfg.attack.per_category[0]})
    return TrialConfig(model=cfg.model, seed=cfg.seed, rounds=1, attack=attack,
                       defense=searched if cfg.kind == "defense" else attack, eval=cfg.eval,
                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)


def point_id(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def outcome(cfg: SearchConfig, rows: pd.DataFrame) -> dict[str, Any]:
    """A point's budget, safety and utility, and its constraint values (<= 0 means satisfied)."""
    base = rows[rows[PHASE] == BASE].iloc[0]
    stage = rows[rows[PHASE] == (MISALIGN if cfg.kind == "attack" else REALIGN)]
    row = stage.iloc[0]
    drop = float(base[UTILITY] - row[UTILITY])
    margin = float(row[UNSAFETY]) - cfg.tau  # attack: reach tau; defense: stay at or below it
    constraint = [-margin if cfg.kind == "attack" else margin]
    if cfg.eps is not None:  # a model broken past usefulness is not a cheap attack, nor a good defense
        constraint.append(drop - cfg.eps)
    return {"budget": float(stage_budget(stage, cfg.budget).iloc[0]), "unsafety": float(row[UNSAFETY]),
            "utility": float(row[UTILITY]), "utility_drop": drop, "base_unsafety": float(base[UNSAFETY]),
            "device_s": float(row[DEVICE_S]), "constraint": constraint,
            "feasible": all(c <= 0 for c in constraint), "trained": not bool(row[REUSED])}


def search_trainable(config: dict[str, Any], search: dict[str, Any], root: str, stages: str) -> None:
    """The Tune function trainable: one point. Reports once, at the end (Optuna reads the final result)."""
    from ray import tune

    from misalign.cluster import hold_assigned_resources
    from misalign.trial import run_cached_trial

    cfg = SearchConfig.model_validate(search)
    paths = RunDir(Store(root), Store(stages))
    config = decode(cfg, config)
    pid = point_id(config)
    if paths.store.exists(paths.point_file(pid)):  # evaluated before (a repeated proposal, or before a crash)
        rows = paths.store.read_parquet(paths.point_file(pid))
    else:
        hold_assigned_resources(cfg.resources.cpus_per_worker)
        rows = pd.DataFrame(run_cached_trial(point_trial(cfg, config), {"point_id": pid, **config}, paths.stages,
                                             (paths.store, paths.point_file(pid)), attack_only=cfg.kind == "attack"))
    tune.report({**outcome(cfg, rows), "point_id": pid})


# ---- Optuna through Tune -------------------------------------------------------------------------------------

_RECORDED = ("budget", "unsafety", "utility", "utility_drop", "constraint", "feasible", "point_id", "trained",
             "device_s")


def _searcher(cfg: SearchConfig, storage: Any, first_run: bool = True) -> Any:
    """OptunaSearch that also records each result as user attributes (the constraint TPE reads among them)."""
    from ray.tune.search.optuna import OptunaSearch

    class RecordingOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """A trial reports once, at its end, and nothing is pruned: no intermediate values to record."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and trial_id in self._ot_trials:
                trial = self._ot_trials[trial_id]
                for key in _RECORDED:
                    if key in result:
                        trial.set_user_attr(key, result[key])
                if not pareto and "constraint" in result:  # what TPE reads to keep infeasible trials apart
                    for name, value in zip(("tau", "eps"), result["constraint"], strict=False):
                        trial.set_constraint(name, value)
            super().on_trial_complete(trial_id, result, error)

    pareto = cfg.objective == "pareto"
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials, constant_liar=True)
    if not pareto and SIZE_INDEX in optuna_space(cfg) and not cfg.space and cfg.kind == "attack":
        sampler = SizeBisectionSampler(sampler, len(cfg.searched.per_category), cfg.seed)
    if pareto:
        metric = ["budget", "unsafety"] + (["utility"] if cfg.kind == "defense" else [])
        mode = ["min", "max"] if cfg.kind == "attack" else ["min", "min", "max"]
    else:
        metric, mode = "budget", "min"
    return RecordingOptunaSearch(space=optuna_space(cfg), metric=metric, mode=mode, sampler=sampler,
                                 study_name=cfg.name, storage=storage,
                                 points_to_evaluate=[encode(cfg, p) for p in cfg.start_points]
                                 if first_run and cfg.start_points else None)


def optuna_storage(cfg: SearchConfig, paths: RunDir) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines ("A new study created") are not ours
    url = cfg.storage or f"sqlite:///{paths.optuna_db}"
    return optuna.storages.RDBStorage(url)


class SizeBisectionSampler(optuna.samplers.BaseSampler):
    """For an attack search over method x ordered sizes: unsafety grows with data, so the cheapest feasible
    size of a method is found by bisection along the size axis, and a method whose next probe would cost
    more than the cheapest feasible point found so far is done. Everything else (and every method once all
    are done) is left to the wrapped TPE sampler, whose constraint bookkeeping runs as usual."""

    def __init__(self, base: Any, n_sizes: int, seed: int) -> None:
        self.base, self.n, self.rng = base, n_sizes, np.random.default_rng(seed)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, space: dict[str, Any]) -> dict[str, Any]:
        return self.base.sample_relative(study, trial, space)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def _known(self, study: Any, me: int) -> tuple[list[Any], list[Any]]:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        done = [t for t in trials if t.state == TrialState.COMPLETE and "feasible" in t.user_attrs]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number != me and t.params]
        return done, running

    def _next_probe(self, method: Any, done: list[Any], running: list[Any]) -> int | None:
        mine = [t for t in done if t.params.get("method", method) == method]
        feasible = [t.params[SIZE_INDEX] for t in mine if t.user_attrs["feasible"]]
        hi = min(feasible, default=self.n)
        lo = max((t.params[SIZE_INDEX] for t in mine if not t.user_attrs["feasible"]
                  and t.params[SIZE_INDEX] < hi), default=-1)
        busy = {t.params.get(SIZE_INDEX) for t in running if t.params.get("method", method) == method}
        open_ = [k for k in range(lo + 1, min(hi, self.n)) if k not in busy]
        if not open_:
            return None
        probe = open_[len(open_) // 2]
        best = min((t.user_attrs["budget"] for t in done if t.user_attrs["feasible"]), default=np.inf)
        priced = [(t.params[SIZE_INDEX], t.user_attrs["budget"]) for t in mine]
        if priced and np.isfinite(best):  # budget grows about linearly with the examples: skip dear probes
            k, b = max(priced)
            if b * (probe + 1) / (k + 1) >= best:
                return None
        return probe

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        done, running = self._known(study, trial.number)
        if name == "method":
            live = [m for m in dist.choices if self._next_probe(m, done, running) is not None]
            if live:  # the least-explored method still worth a probe
                counts = [sum(t.params.get("method") == m for t in done + running) for m in live]
                fewest = [m for m, c in zip(live, counts, strict=True) if c == min(counts)]
                return fewest[int(self.rng.integers(len(fewest)))]
        if name == SIZE_INDEX:
            method = trial.params.get("method")
            probe = self._next_probe(method, done, running)
            if probe is not None:
                return probe
            tried = [t for t in done if t.params.get("method", method) == method]
            if tried:  # nothing left worth paying for on this method: repeat its best point (the cache has it)
                feasible = [t.params[SIZE_INDEX] for t in tried if t.user_attrs["feasible"]]
                return min(feasible) if feasible else max(t.params[SIZE_INDEX] for t in tried)
        return self.base.sample_independent(study, trial, name, dist)


def run_search(cfg: SearchConfig, paths: RunDir, *, address: str | None = None,
               started: float | None = None) -> dict[str, Any]:
    """Run (or resume) the search, whose config passed the preflight (misalign.preflight.check_search: the CLI
    runs it, nothing here checks again); returns the answer (also SEARCH/answer.json and trials.parquet).
    `started`: when the command started (the answer's wall_s counts from there)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from misalign.claims import start_leases
    from misalign.cluster import init_ray, tune_storage

    t0 = started or time.time()
    check_store(paths.store)
    resuming = open_run_dir(cfg, paths.store, "search.yaml")
    init_ray(address, dashboard=False)
    if paths.stages.remote:
        start_leases(paths.stages.url)
    paths.optuna_db.parent.mkdir(parents=True, exist_ok=True)
    note_store_use(paths.store)  # what `misalign cache` says this node's copy is, and when a run last used it
    if paths.store.remote and not cfg.storage:
        if not resuming:  # a new search: a copy this node kept of an older one under the same URL is stale
            paths.optuna_db.unlink(missing_ok=True)
        elif not paths.optuna_db.exists() and paths.store.exists(_DB):  # resumed on another machine
            paths.optuna_db.write_bytes(paths.store.read_bytes(_DB))
    storage = optuna_storage(cfg, paths)
    trainable = tune.with_parameters(search_trainable, search=cfg.model_dump(mode="json"),
                                     root=paths.store.location, stages=paths.stages.location)
    trainable = tune.with_resources(trainable, {"cpu": cfg.resources.cpus_per_worker,
                                                "gpu": cfg.resources.gpus_per_worker})
    # The Optuna database is the search's state: a rerun continues the study it holds (TPE learns from every
    # finished trial) and runs only the trials still missing. (Tune's own restore lags the database by up to its
    # checkpoint period, so after a SIGKILL it would run trials Optuna already has.)
    finished = finished_trials(cfg, storage) if resuming else 0
    run = sum(d.startswith("tune") for d in paths.store.subdirs())  # each run keeps its own Tune experiment
    remaining = cfg.trials - finished
    if remaining > 0:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(_searcher(cfg, storage, first_run=finished == 0), cfg.max_concurrent),
                num_samples=remaining, reuse_actors=True),
            run_config=tune.RunConfig(name="tune" if run == 0 else f"tune-{run}", verbose=0,
                                      **tune_storage(paths.store), callbacks=[_database_copier(cfg, paths)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
        tuner.fit()
    answer = write_answer(cfg, paths, storage)
    answer["wall_s"] = round(time.time() - t0, 1)
    paths.store.write_json(paths.answer, answer)
    _copy_database(cfg, paths)
    return answer


_DB = "optuna.db"


def _copy_database(cfg: SearchConfig, paths: RunDir) -> None:
    """An object-store search keeps its SQLite database on the driver's disk and copies it to the store, so a
    driver that dies (or moves) resumes from there."""
    if paths.store.remote and not cfg.storage and paths.optuna_db.exists():
        paths.store.write_bytes(_DB, paths.optuna_db.read_bytes())


def _database_copier(cfg: SearchConfig, paths: RunDir) -> Any:
    from ray import tune

    class CopyDatabase(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _copy_database(cfg, paths)

    return CopyDatabase()


def finished_trials(cfg: SearchConfig, storage: Any) -> int:
    """Finished trials in the database. Trials an interrupted run left RUNNING are marked FAIL: their points,
    if they finished, are in the point cache and cost nothing when proposed again."""
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:  # the first run died before creating the study
        return 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def trials_frame(cfg: SearchConfig, storage: Any) -> pd.DataFrame:
    """Every finished trial of the Optuna study: its knobs and what it recorded (infeasible ones included)."""

    study = optuna.load_study(study_name=cfg.name, storage=storage)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **(decode(cfg, t.params) if t.params else {}),
                     **{k: t.user_attrs.get(k) for k in _RECORDED}})
    return pd.DataFrame(rows)


def write_answer(cfg: SearchConfig, paths: RunDir, storage: Any) -> dict[str, Any]:

    frame = trials_frame(cfg, storage)
    paths.store.write_parquet(paths.trials, frame)
    done = frame[frame.state == "COMPLETE"] if not frame.empty else frame
    side = cfg.searched
    knobs = [k for k, values in (("method", side.methods), ("per_category", side.per_category)) if len(values) > 1]
    knobs += list(cfg.space)

    def entry(r: pd.Series) -> dict[str, Any]:
        return {"params": {k: _plain(r[k]) for k in knobs}, "budget": float(r.budget),
                "unsafety": float(r.unsafety), "utility": float(r.utility), "utility_drop": float(r.utility_drop),
                "feasible": bool(r.feasible), "point_id": r.point_id}

    feasible = done[done.feasible.astype(bool)] if not done.empty else done
    best = None
    if not feasible.empty:
        order = ["budget", "unsafety"] if cfg.kind == "defense" else ["budget"]
        best = entry(feasible.sort_values(order).iloc[0])
        if cfg.price_per_device_hour is not None:
            best["money"] = money(float(feasible.sort_values(order).iloc[0].device_s), cfg.price_per_device_hour)
    pareto = []
    if cfg.objective == "pareto":
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        numbers = {t.number for t in study.best_trials}
        pareto = [entry(r) for _, r in done[done.number.isin(numbers)].sort_values("budget").iterrows()]
    # a point proposed again reads its rows back from the point cache (they say it trained): its budget was
    # spent once, so each trained point counts once
    trained = done[done.trained.astype(bool)].drop_duplicates("point_id") if not done.empty else done
    spent = float(trained.budget.sum()) if not trained.empty else 0.0
    answer = {"kind": cfg.kind, "model": cfg.model, "method": cfg.searched.methods[0]
              if len(cfg.searched.methods) == 1 else None, "budget_kind": cfg.budget,
              "budget_meaning": BUDGETS[cfg.budget], "tau": cfg.tau, "eps": cfg.eps,
              "objective": cfg.objective, "best": best, **answer_bound(done, best), "pareto": pareto,
              "trials": int(len(done)),
              "infeasible_trials": int(len(done) - len(feasible)), "budget_spent": spent,
              "distinct_points": int(done.point_id.nunique()) if not done.empty else 0}
    return answer


def answer_bound(done: pd.DataFrame, best: dict[str, Any] | None) -> dict[str, Any]:
    """What the answer says about the cheapest feasible budget, which the search sees only at the points it
    tried: `bound` 'at most' the best budget (a cheaper untried point may be feasible), with `bracket` [the
    most expensive cheaper infeasible point of the best's method (None when none was tried: the search did not
    look below), the best budget]; 'at least' the largest budget tried when no point was feasible, bracket
    [that budget, None]; 'undefined' when nothing finished."""
    if done.empty:
        return {"bound": "undefined", "bracket": [None, None]}
    if best is None:
        return {"bound": "at least", "bracket": [float(done.budget.max()), None]}
    method = best["params"].get("method")
    same = done[done.method == method] if method is not None and "method" in done else done
    below = same[(same.budget < best["budget"]) & ~same.feasible.astype(bool)]
    return {"bound": "at most", "bracket": [float(below.budget.max()) if len(below) else None, best["budget"]]}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v

