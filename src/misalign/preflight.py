"""The one validation pass: everything a command will touch is built and checked before it writes anything.

Each command's entry point (`misalign trial`, `stage`, `eval`, `study run|plan`, `search`, `report`) calls one
`check_*` here before it creates an output directory or starts Ray. A problem raises `InputError` naming the
config field (or the file and row); the CLI turns it into exit code 2. What is checked:
- every model: its config (custom code is refused unless trust_remote_code), its weights format (pickle only
  with allow_pickle), its tokenizer;
- every distinct stage: its data rows, then the model built on the meta device (no memory, no weights) with the
  stage's adapter (target modules, the AdaLoRA schedule for the steps the stage will take), the DPO loss
  types trl knows, and the packages its method needs;
- the evaluation: every eval set loads and is non-empty, every judge's options, classifier judges' models, HTTP
  judges' API-key variables and endpoints (a connection is opened; nothing is sent);
- a study's loggers, and whether one trial fits this machine when Ray is started locally;
- a search's Optuna storage URL.
A config that names `world:` models or data gets the offline world built first (its targets checked), since
resolving those names never builds it (misalign.world_targets).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from misalign.config import (
    EvalConfig,
    ResourceSettings,
    SearchConfig,
    StageConfig,
    StudyConfig,
    StudySide,
    TrialConfig,
)
from misalign.errors import InputError
from misalign.world_targets import ensure_world_if_named

# ---- models -------------------------------------------------------------------------------------------------


def check_model(ref: str, *, trust_remote_code: bool, allow_pickle: bool, field: str = "model") -> str:
    """Where the model's config is read (a stage directory: its root's; a URL model: its small files, not its
    weights), once its config, weights format and tokenizer are known to load (misalign.models.check_model)."""
    from misalign.models import check_model as check
    from misalign.models import root_of

    return check(root_of(ref), trust_remote_code, allow_pickle=allow_pickle, field=field, ref=ref)


# ---- stages -------------------------------------------------------------------------------------------------


def _dpo_loss_types() -> set[str]:
    """The loss types trl's DPOConfig documents (its trainer rejects others only once training starts)."""
    from trl import DPOConfig

    help_text = next(f.metadata.get("help", "") for f in fields(DPOConfig) if f.name == "loss_type")
    return set(re.findall(r"`'(\w+)'`", help_text))


def _check_method_needs(cfg: StageConfig, where: str) -> None:
    from misalign.methods import METHODS

    method = METHODS[cfg.method]
    if method.objective == "dpo" and cfg.preference.loss_type is not None:
        known = _dpo_loss_types()
        unknown = [t for t in cfg.preference.loss_type.split(",") if t.strip() not in known]
        if known and unknown:
            raise InputError(f"{where}.preference.loss_type: {', '.join(map(repr, unknown))} not a trl DPO loss "
                             f"type; known: {', '.join(sorted(known))}")
    needs = {"bitsandbytes": method.adapter == "qlora", "deepspeed": bool(cfg.deepspeed.zero_stage),
             "liger_kernel": cfg.train.liger_kernels}
    for package, needed in needs.items():
        if needed and importlib.util.find_spec(package) is None:
            raise InputError(f"{where}: method {cfg.method} with these settings needs {package}, which is not "
                             f"installed (pip install {package.replace('_', '-')})")


class _Stages:
    """Checks distinct stages once each: data by (data settings, seed), adapters by (model, stage, steps).
    `plan`: a data source that is not here is skipped (the plan assumes its size and says so)."""

    def __init__(self, study: StudyConfig, model_paths: dict[str, str], plan: bool = False) -> None:
        from misalign.meta import MetaModels  # models on the meta device, with each stage's adapter

        self.meta = MetaModels(study.trust_remote_code, study.plan.model_configs)
        self.paths = model_paths
        self.eval_compile = study.eval.compile
        self._eval_compile_checked: set[str] = set()  # models: their layers do not change with the stage
        self.workers = study.resources.workers
        self.plan = plan
        self._rows: dict[str, int | None] = {}
        self._done: set[str] = set()

    def _rows_of(self, cfg: StageConfig, seed: int) -> int | None:
        """Training rows of the stage's data; None when planning without its files."""
        from misalign.data import source_present
        from misalign.recipes import stage_pairs

        d = cfg.data
        if self.plan and not all(source_present(s) for s in (d.source, d.benign_source if d.benign_ratio else None)
                                 if s):
            return None
        return len(stage_pairs(cfg, seed))

    def check(self, model: str, cfg: StageConfig, seed: int, where: str) -> None:
        from misalign.costs import optimizer_steps

        cfg = cfg.resolved()
        data_key = f"{cfg.data.model_dump_json()}|{seed}"
        if data_key not in self._rows:
            self._rows[data_key] = self._rows_of(cfg, seed)
        rows = self._rows[data_key]
        if rows == 0:
            raise InputError(f"{where}.data: {cfg.data.source} gives no training rows")
        steps = optimizer_steps(cfg, rows or 1, self.workers)
        key = f"{model}|{cfg.model_dump_json()}|{steps}"
        if key in self._done:
            return
        _check_method_needs(cfg, where)
        if self.eval_compile and model not in self._eval_compile_checked:
            check_eval_compile(self.meta, self.paths[model])
            self._eval_compile_checked.add(model)
        try:
            if cfg.train.compile is True:
                from misalign.speedups import decoder_layers

                decoder_layers(self.meta.model_arch(self.paths[model]).model)
            self.meta.params(self.paths[model], cfg, steps)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        except (ValueError, TypeError, KeyError) as e:  # peft's own refusals (e.g. a module type it can't wrap)
            raise InputError(f"{where}.adapter: peft cannot build this adapter on {model!r}: {e}") from None
        self._done.add(key)


def check_eval_compile(meta: Any, path: str) -> None:
    """eval.compile compiles parts of the decoder layers transformers marks: a model without them is refused
    before anything trains, not when its first evaluation starts."""
    from misalign.speedups import decoder_layers

    decoder_layers(meta.model_arch(path).model, "eval.compile")


def check_repair_sides(attack: str, defense: str | None) -> None:
    """A repair (misalign.repair) is a defense, never an attack; SafeLoRA projects a LoRA update, so its attack
    must train one."""
    from misalign.methods import METHODS

    if METHODS[attack].repairs:
        raise InputError(f"attack.method {attack} is a repair: it runs as a defense only")
    if defense == "safelora" and METHODS[attack].adapter not in ("lora", "qlora"):
        raise InputError(f"defense.method safelora needs a LoRA parent (it projects the adapter's update B A); "
                         f"attack.method {attack} trains {METHODS[attack].adapter} weights")


def _where(side: str, point: dict[str, Any], several: bool) -> str:
    if not several:
        return side
    return f"{side} (cell " + ", ".join(f"{k}={v!r}" for k, v in point.items()) + ")"


def _check_grid(study: StudyConfig, model_paths: dict[str, str], phases: tuple[str, ...],
                plan: bool = False) -> None:
    from misalign.grid import cells

    stages = _Stages(study, model_paths, plan)
    several = {side: len(getattr(study, side).axis_values()) > 1 for side in ("attack", "defense")}
    for cell in cells(study):
        trial = cell.trial_config(study)
        for side, phase in (("attack", "misalign"), ("defense", "realign")):
            if phase in phases:
                stages.check(cell.model, getattr(trial, side), cell.seed,
                             _where(side, getattr(cell, side), several[side]))
        # a repair defends, and SafeLoRA's parent is LoRA: refused before the attack trains
        check_repair_sides(trial.attack.method, trial.defense.method if "realign" in phases else None)


# ---- evaluation ---------------------------------------------------------------------------------------------


def check_eval(cfg: EvalConfig, *, trust_remote_code: bool = False, allow_pickle: bool = False,
               field: str = "eval", items: bool = True, plan: bool = False,
               stand_ins: frozenset[str] = frozenset()) -> None:
    """Eval sets (unless `items` is False: re-judging needs none), judges, judge models, lm-eval. `plan`: no
    judge is called, so HTTP judges' keys and endpoints are not needed, and judge models in `stand_ins` are
    priced from a stand-in config (plan.model_configs): their files are not checked."""
    from misalign.evaluation import load_eval_sets
    from misalign.judges import check_vote

    if items:
        load_eval_sets(cfg)
    check_vote([(j.name, dict(j.options)) for j in cfg.judges], cfg.vote, endpoints=not plan)
    for i, j in enumerate(cfg.judges):
        model = j.options.get("model")
        if j.name == "classifier" and isinstance(model, str) and model not in stand_ins:
            check_model(model, trust_remote_code=bool(j.options.get("trust_remote_code", trust_remote_code)),
                        allow_pickle=bool(j.options.get("allow_pickle", allow_pickle)),
                        field=f"{field}.judges.{i}.options.model")
    if cfg.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise InputError(f"{field}.lm_eval_tasks: lm-evaluation-harness is not installed (pip install lm-eval)")


# ---- commands -----------------------------------------------------------------------------------------------


def _side(stage: StageConfig) -> StudySide:
    """A study side with exactly one cell: this stage."""
    return StudySide(methods=[stage.method], per_category=[stage.data.per_category],
                     **stage.model_dump(exclude={"method"}))


def _models(refs: list[str], trust_remote_code: bool, allow_pickle: bool, field: str,
            stand_ins: frozenset[str] = frozenset()) -> dict[str, str]:
    """ref -> where its config is read. A ref in `stand_ins` (a plan's plan.model_configs: a model not on this
    machine) is checked through its stand-in config, on the meta device, by the stage checks."""
    return {ref: ref if ref in stand_ins else check_model(
        ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        field=f"{field}.{i}" if len(refs) > 1 else field) for i, ref in enumerate(refs)}


def check_trial(cfg: TrialConfig) -> None:
    """`misalign trial`: the model, both stages (every round starts from the same architecture), the eval."""
    ensure_world_if_named(cfg)
    study = StudyConfig(name="trial", models=[cfg.model], seeds=[cfg.seed], rounds=1, attack=_side(cfg.attack),
                        defense=_side(cfg.defense), eval=cfg.eval, trust_remote_code=cfg.trust_remote_code,
                        allow_pickle=cfg.allow_pickle)
    paths = _models([cfg.model], cfg.trust_remote_code, cfg.allow_pickle, "model")
    _check_grid(study, paths, ("misalign", "realign"))
    check_eval(cfg.eval, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)


def check_stage(cfg: StageConfig, model: str, seed: int, *, trust_remote_code: bool, allow_pickle: bool,
                workers: int = 1) -> None:
    """`misalign stage`: the parent model and this one stage."""
    ensure_world_if_named(cfg, model)
    study = StudyConfig(name="stage", models=[model], seeds=[seed], attack=_side(cfg), defense=_side(cfg),
                        resources=ResourceSettings(workers=workers), trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle)
    paths = _models([model], trust_remote_code, allow_pickle, "--model")
    stages = _Stages(study, paths)
    stages.check(model, cfg, seed, "stage")


def check_study(cfg: StudyConfig, *, local: bool = True, plan: bool = False) -> None:
    """`misalign study run`: every model, every distinct stage of every cell, the evaluation, the loggers, and
    (`local`: Ray starts on this machine) that a trial fits. `plan` (`misalign study plan`, which trains nothing
    and may price models and data not on this machine): models and judges named in plan.model_configs are
    checked through their stand-in configs, data and eval files that are not here are skipped (the plan assumes
    their sizes and says so; a file that is here and wrong still fails), and HTTP judges' keys and endpoints
    are not needed (no judge is called)."""
    ensure_world_if_named(cfg)
    stand_ins = frozenset(cfg.plan.model_configs) if plan else frozenset()
    paths = _models(cfg.models, cfg.trust_remote_code, cfg.allow_pickle, "models", stand_ins)
    _check_grid(cfg, paths, ("misalign", "realign"), plan)
    check_eval(cfg.eval, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
               items=not plan or _eval_files_here(cfg.eval), plan=plan, stand_ins=stand_ins)
    check_loggers(cfg.loggers)
    if local:
        check_resources(cfg.resources)


def _eval_files_here(cfg: EvalConfig) -> bool:
    from misalign.data import source_present

    return all(source_present(s) for s in (cfg.harmful, cfg.benign, cfg.utility) if s)


def check_search(cfg: SearchConfig, *, local: bool = True) -> None:
    """`misalign search`: every method and size of the searched side at both ends of every knob's range, the
    fixed misalignment of a defense search, the evaluation, the model, the Optuna storage and the resources."""
    ensure_world_if_named(cfg)
    side = cfg.searched
    ends = {key: [int(k.low), int(k.high)] if k.integer else [k.low, k.high] for key, k in cfg.space.items()}
    searched = side.model_copy(update={"grid": {**side.grid, **ends}})
    attack = searched if cfg.kind == "attack" else cfg.attack
    study = StudyConfig(name="search", models=[cfg.model], seeds=[cfg.seed], attack=attack,
                        defense=searched if cfg.kind == "defense" else attack, eval=cfg.eval,
                        resources=cfg.resources, trust_remote_code=cfg.trust_remote_code,
                        allow_pickle=cfg.allow_pickle)
    paths = _models([cfg.model], cfg.trust_remote_code, cfg.allow_pickle, "model")
    _check_grid(study, paths, ("misalign",) if cfg.kind == "attack" else ("misalign", "realign"))
    check_eval(cfg.eval, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    check_optuna_storage(cfg.storage)
    if local:
        check_resources(cfg.resources)


def check_eval_command(cfg: EvalConfig, model: str | None, generations: str | None, *,
                       trust_remote_code: bool, allow_pickle: bool) -> None:
    """`misalign eval`: the model (or the generations file to re-judge), eval sets, judges."""
    ensure_world_if_named(cfg, model)
    if generations:
        from misalign.evaluation import load_generations

        load_generations(generations)
    elif not model:
        raise InputError("--model is required (or --generations to re-judge saved generations)")
    else:
        path = check_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, field="--model")
        if cfg.compile:
            from misalign.meta import MetaModels

            check_eval_compile(MetaModels(trust_remote_code, {}), path)
    check_eval(cfg, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, field="eval",
               items=not generations)


def check_report(study_dir: str | Path, out: Path | None) -> None:
    """`misalign report`: the study's results file is a Parquet table (the report reads nothing else heavy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from misalign.storage import Store

    store, results = Store(study_dir), f"{study_dir}/results.parquet"
    if store.exists("results.parquet"):
        try:
            pq.read_schema(pa.BufferReader(store.read_bytes("results.parquet")))
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{results}: not a readable Parquet file ({e}); rerun `misalign study results "
                             f"{study_dir}` to rebuild it from the finished cells") from None
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")


# ---- run environment ---------------------------------------------------------------------------------------


def check_loggers(names: list[str]) -> None:
    for i, name in enumerate(names):
        if importlib.util.find_spec(name) is None:
            raise InputError(f"loggers.{i}: {name} is not installed; pip install {name} (or remove it)")


def check_resources(r: ResourceSettings) -> None:
    """A trial that asks for more CPUs or GPUs than this machine has would wait forever in a local Ray."""
    from misalign.runtime import cpus_held

    cpus = cpus_held()
    need_cpus = r.workers * r.cpus_per_worker
    if need_cpus > cpus:
        raise InputError(f"resources: a trial needs workers x cpus_per_worker = {need_cpus:g} CPUs, but this "
                         f"machine gives Ray {cpus}; lower resources.cpus_per_worker or resources.workers, or "
                         "pass --address to run on a cluster that has them")
    need_gpus = r.workers * r.gpus_per_worker
    if need_gpus:
        import torch

        gpus = torch.cuda.device_count()
        if need_gpus > gpus:
            raise InputError(f"resources: a trial needs workers x gpus_per_worker = {need_gpus:g} GPUs, but this "
                             f"machine has {gpus}; lower resources.gpus_per_worker, or pass --address")


def check_optuna_storage(url: str | None) -> None:
    """A SQLAlchemy URL whose driver is installed and whose database answers. SQLite is not opened (that would
    create the file): its directory must exist. Passwords never appear in messages."""
    if url is None:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise InputError(f"storage: not a usable SQLAlchemy URL ({type(e).__name__}: {str(e).replace(url, '...')}); "
                         "e.g. sqlite:////abs/path/optuna.db or postgresql://user@host/db") from None
    except ImportError as e:
        raise InputError(f"storage {shown}: its database driver is not installed ({e.name})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not Path(db).expanduser().resolve().parent.is_dir():
            raise InputError(f"storage {shown}: directory {Path(db).parent} does not exist")
        return
    try:
        engine = create_engine(parsed, pool_pre_ping=True)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as e:
        raise InputError(f"storage {shown}: its database driver is not installed ({e.name})") from None
    except SQLAlchemyError as e:
        raise InputError(f"storage {shown}: cannot connect ({type(e).__name__}: "
                         f"{json.dumps(str(e).splitlines()[0] if str(e) else '')})") from None
