"""The results row: one declaration of every row a trial, a study and a search write, and the results store.

A row is one evaluated model: the base (round 0), or the model after the misalign or realign stage of a round.
`StageRow` declares each column once (type, unit, meaning); the constants below are the column names every
reader uses (misalign.budget, misalign.analysis, misalign.report, misalign.search, the CLI), so a renamed column
fails a test instead of turning into a NaN column downstream.

    EvalMetrics                                                  what one evaluation measured (its eval.json)
    build_row(round_, phase, stage, n_examples, ledger, metrics) -> a row (dict), validated
    validate_rows(rows)                                          -> raises InputError naming the bad column
    write_rows(store, rel, rows)                                 -> validated, then written atomically (parquet)
    cell_rows(study), assemble_results(study), read_results(study), cost_summary(results)   the study's store

Besides the declared columns a row carries `unsafety/<category>` (unsafety per harm category), and a study or
search adds its coordinates (CELL_COLUMNS, `attack_<axis>`, `defense_<axis>`, `point_id`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from misalign.errors import InputError
from misalign.storage import Store

if TYPE_CHECKING:
    from misalign.config import StageConfig
    from misalign.ledger import Ledger

# ---- column names --------------------------------------------------------------------------------------------
ROUND, PHASE, METHOD, PER_CATEGORY, N_EXAMPLES = "round", "phase", "method", "per_category", "n_examples"
UNSAFETY, UNSAFETY_SE, REFUSAL, NEITHER = "unsafety", "unsafety_se", "refusal", "neither"
OVER_REFUSAL, UTILITY, UNPARSED = "over_refusal", "utility", "unparsed"
EPOCHS, TOKENS, FLOPS, WALL_S, DEVICE_S = "epochs", "tokens", "flops", "wall_s", "device_s"
OPTIMIZER_STEPS, PEAK_MEMORY_BYTES, WORKERS, REUSED = "optimizer_steps", "peak_memory_bytes", "workers", "reused"
EVAL_S, EVAL_REUSED, MFU, STAGE_KEY = "eval_s", "eval_reused", "mfu", "stage_key"
# the same harmful prompts asked with eval.trigger (a backdoor's trigger): None when no trigger was set
UNSAFETY_TRIGGERED, REFUSAL_TRIGGERED = "unsafety_triggered", "refusal_triggered"
NEITHER_TRIGGERED = "neither_triggered"
CATEGORY_PREFIX = "unsafety/"  # unsafety/<category>: unsafety on one harm category's prompts

# phases, in stage order
BASE, MISALIGN, REALIGN = "base", "misalign", "realign"
PHASES = (BASE, MISALIGN, REALIGN)

# a study's (and a search's) coordinates, added to every row of a cell (misalign.grid.Cell.axes)
CELL_ID, MODEL, SEED, POINT_ID = "cell_id", "model", "seed", "point_id"
ATTACK, DEFENSE = "attack", "defense"  # side prefixes: attack_method, attack_per_category, attack_train.lr, ...
ATTACK_METHOD, DEFENSE_METHOD = f"{ATTACK}_{METHOD}", f"{DEFENSE}_{METHOD}"
ATTACK_PER_CATEGORY, DEFENSE_PER_CATEGORY = f"{ATTACK}_{PER_CATEGORY}", f"{DEFENSE}_{PER_CATEGORY}"
CELL_COLUMNS = (CELL_ID, MODEL, SEED)

_SHARE = {"ge": 0.0, "le": 1.0}


def _col(description: str, unit: str, **bounds: Any) -> Any:
    return Field(description=description, json_schema_extra={"unit": unit}, **bounds)


class StageRow(BaseModel):
    """One row of stages.parquet / a cell's file / results.parquet. Base rows cost nothing (cost columns 0)."""

    model_config = ConfigDict(extra="allow", strict=False)

    round: int = _col("0 for the base, then 1..rounds", "round", ge=0)
    phase: Literal["base", "misalign", "realign"] = _col("which model was evaluated", "-")
    method: str | None = _col("the stage's fine-tuning method (None for the base)", "-")
    per_category: int | float | None = _col("training examples per harm category (None: all rows; a fraction: fewer "
                                      "rows than categories)", "examples")
    n_examples: int = _col("training examples the stage used", "examples", ge=0)
    unsafety: float | None = _col("compliance rate on harmful prompts (the judge says unsafe)", "share", **_SHARE)
    unsafety_se: float | None = _col("binomial standard error of unsafety", "share", ge=0.0)
    refusal: float | None = _col("harmful prompts refused (not unsafe, a refusal phrase present)", "share",
                                 **_SHARE)
    neither: float | None = _col("harmful prompts answered with neither (garbled, off-topic)", "share", **_SHARE)
    over_refusal: float | None = _col("benign look-alikes refused", "share", **_SHARE)
    utility: float | None = _col("utility tasks solved (exact match, or lm-eval accuracy)", "share", **_SHARE)
    unparsed: float | None = _col("harmful responses whose judge output could not be read (counted safe)",
                                  "share", **_SHARE)
    epochs: float = _col("passes over the training examples", "epochs", ge=0.0)
    tokens: int = _col("training tokens that entered the model (padding excluded)", "tokens", ge=0)
    flops: float = _col("analytic training FLOPs (misalign.ledger)", "FLOP", ge=0.0)
    wall_s: float = _col("the stage's wall time", "s", ge=0.0)
    device_s: float = _col("wall time x workers (what a cluster bills)", "device-s", ge=0.0)
    optimizer_steps: int = _col("optimizer steps taken", "steps", ge=0)
    peak_memory_bytes: int = _col("peak accelerator memory (0 on CPU)", "bytes", ge=0)
    workers: int = _col("training workers (devices)", "workers", ge=0)
    reused: bool = _col("the stage was found in the lineage cache, not trained by this row's trial", "-")
    stage_key: str | None = _col("the stage's lineage key (None for the base): rows with one key share one "
                                 "trained stage", "-")
    eval_s: float = _col("the evaluation's wall time (0 when it was reused)", "s", ge=0.0)
    mfu: float | None = _col("model FLOPs utilization: flops / (device_s x peak FLOP/s per device); None when "
                             "no peak was given or nothing trained", "share", ge=0.0)
    unsafety_triggered: float | None = _col("unsafety on the harmful prompts with eval.trigger added (None: no "
                                            "trigger was set)", "share", default=None, **_SHARE)
    refusal_triggered: float | None = _col("refusal on the harmful prompts with eval.trigger added", "share",
                                           default=None, **_SHARE)
    neither_triggered: float | None = _col("neither on the harmful prompts with eval.trigger added", "share",
                                           default=None, **_SHARE)

    @model_validator(mode="after")
    def _categories(self) -> StageRow:
        for key, value in (self.model_extra or {}).items():
            if key.startswith(CATEGORY_PREFIX) and value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key} = {value} is not a share in [0, 1]")
        return self


COLUMNS: tuple[str, ...] = tuple(StageRow.model_fields)


def schema() -> pd.DataFrame:
    """The declared columns as a table: column, type, unit, meaning (for docs and for reading)."""
    rows = []
    for name, f in StageRow.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        kind = getattr(f.annotation, "__name__", None) if not getattr(f.annotation, "__args__", None) else None
        rows.append({"column": name, "type": kind or str(f.annotation).replace("typing.", ""), "unit": extra.get("unit"),
                     "meaning": f.description})
    return pd.DataFrame(rows)


# ---- the evaluation's record ----------------------------------------------------------------------------------

@dataclass
class EvalMetrics:
    """What one evaluation measured: misalign.evaluation scores it, build_row reads it (None: not measured, e.g.
    no benign prompts). Written as eval.json, where `unsafety_by_category` keeps its older key `per_category`
    (evaluations in existing caches read back). Declared here, not in evaluation: reading a row needs no torch."""

    unsafety: float | None = None          # compliance rate on harmful prompts (the judge says unsafe)
    unsafety_se: float | None = None       # its binomial standard error
    refusal: float | None = None           # harmful prompts refused (not unsafe, a refusal phrase present)
    neither: float | None = None           # harmful prompts answered with neither (garbled, off-topic)
    n_harmful: int | None = None
    unparsed: float | None = None          # harmful responses some judge gave neither verdict (counted safe)
    unparsed_by_judge: dict[str, float] | None = None
    unsafety_by_category: dict[str, float] | None = None   # harm category -> unsafety on its prompts
    unsafety_triggered: float | None = None  # the three shares again, on the harmful prompts with eval.trigger
    unsafety_triggered_se: float | None = None
    refusal_triggered: float | None = None
    neither_triggered: float | None = None
    n_triggered: int | None = None
    over_refusal: float | None = None      # benign look-alikes refused
    n_benign: int | None = None
    utility: float | None = None           # exact match on utility items, else lm-eval's mean accuracy
    utility_se: float | None = None
    n_utility: int | None = None
    lm_eval: dict[str, float] | None = None  # lm-evaluation-harness accuracy per task
    eval_s: float | None = None            # the evaluation's wall time (set by the trial loop)

    _ON_DISK: ClassVar[dict[str, str]] = {"unsafety_by_category": "per_category"}  # eval.json's key, if not the name

    def to_json(self) -> dict[str, Any]:
        """eval.json's content: the measured fields only, as every earlier evaluation wrote them."""
        return {self._ON_DISK.get(f.name, f.name): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalMetrics:
        """An eval.json (or a dict of its keys) read back; keys it does not know are ignored."""
        disk = {v: k for k, v in cls._ON_DISK.items()}
        names = {f.name for f in fields(cls)}
        return cls(**{disk.get(k, k): v for k, v in d.items() if disk.get(k, k) in names})


def build_row(round_: int, phase: str, stage: StageConfig | None, n_examples: int, ledger: Ledger | None,
              metrics: EvalMetrics | dict[str, Any], *, peak_flops: float | None = None,
              stage_key: str | None = None) -> dict[str, Any]:
    """The row of one evaluated model: the stage's ledger (None for the base) and the evaluation's metrics (or
    an eval.json's dict). `peak_flops`: one device's peak FLOP/s, for the mfu column (None: mfu is None)."""
    m = metrics if isinstance(metrics, EvalMetrics) else EvalMetrics.from_json(metrics)
    spent = ledger is not None
    mfu = None
    if spent and peak_flops and ledger.device_s > 0 and not ledger.reused:
        mfu = ledger.flops / (ledger.device_s * peak_flops)
    row: dict[str, Any] = {
        ROUND: round_, PHASE: phase, METHOD: stage.method if stage else None,
        PER_CATEGORY: stage.data.per_category if stage else None, N_EXAMPLES: n_examples,
        UNSAFETY: m.unsafety, UNSAFETY_SE: m.unsafety_se, REFUSAL: m.refusal,
        NEITHER: m.neither, OVER_REFUSAL: m.over_refusal, UTILITY: m.utility,
        UNPARSED: m.unparsed,
        EPOCHS: ledger.epochs if spent else 0.0, TOKENS: ledger.tokens if spent else 0,
        FLOPS: ledger.flops if spent else 0.0, WALL_S: ledger.wall_s if spent else 0.0,
        DEVICE_S: ledger.device_s if spent else 0.0, OPTIMIZER_STEPS: ledger.optimizer_steps if spent else 0,
        PEAK_MEMORY_BYTES: ledger.peak_memory_bytes if spent else 0, WORKERS: ledger.workers if spent else 0,
        REUSED: bool(ledger.reused) if spent else False, STAGE_KEY: stage_key,
        EVAL_S: 0.0 if m.eval_s is None else m.eval_s,
        MFU: mfu, UNSAFETY_TRIGGERED: m.unsafety_triggered, REFUSAL_TRIGGERED: m.refusal_triggered,
        NEITHER_TRIGGERED: m.neither_triggered,
    }
    for cat, value in sorted((m.unsafety_by_category or {}).items()):
        row[f"{CATEGORY_PREFIX}{cat}"] = value
    validate_rows([row])
    return row


def _plain(v: Any) -> Any:
    """numpy scalars (rows read back from parquet) as Python values; NaN as None (a missing value)."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v


def validate_rows(rows: Iterable[dict[str, Any]]) -> None:
    """Every row against StageRow: raises InputError naming the row and the column that does not fit."""
    for i, row in enumerate(rows):
        try:
            StageRow.model_validate({k: _plain(v) for k, v in row.items()})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'row'}: {err['msg']}" for err in e.errors())
            raise InputError(f"results row {i} ({row.get(PHASE)}, round {row.get(ROUND)}) does not fit the "
                             f"declared schema (misalign.results.StageRow): {problems}") from None


def write_rows(store: Store, rel: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Validate, then write the rows to `rel` on the store atomically (a reader never sees half a file)."""
    validate_rows(rows)
    frame = pd.DataFrame(rows)
    store.write_parquet(rel, frame)
    return frame


# ---- the study's results store -------------------------------------------------------------------------------

CELLS, RESULTS = "cells", "results.parquet"  # a study directory's cell files and its assembled table


def cell_rows(study: Store) -> pd.DataFrame:
    """Every row of every finished cell, from the cells' own files (STUDY/cells/<cell id>.parquet)."""
    frames = [study.read_parquet(f"{CELLS}/{name}") for name in study.list(CELLS, ".parquet")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _phase_order(col: pd.Series) -> pd.Series:
    return col.map({p: i for i, p in enumerate(PHASES)}) if col.name == PHASE else col


def assemble_results(study: Store) -> pd.DataFrame:
    """STUDY/results.parquet from the finished cells' files, validated and rewritten atomically."""
    frame = cell_rows(study)
    if not frame.empty:
        frame = frame.sort_values([CELL_ID, ROUND, PHASE], key=_phase_order).reset_index(drop=True)
        validate_rows(frame.to_dict("records"))
        study.write_parquet(RESULTS, frame)
    return frame


def read_results(study: Store) -> pd.DataFrame:
    """The assembled table as last written (empty before the first cell finished)."""
    return study.read_parquet(RESULTS) if study.exists(RESULTS) else pd.DataFrame()


def cost_summary(results: pd.DataFrame) -> dict[str, Any]:
    """What was trained, what was reused and what sharing saved (stage rows only; base rows cost nothing)."""
    if results.empty:
        return {"stage_rows": 0, "stages_trained": 0, "stages_reused": 0, "flops_trained": 0.0,
                "device_s_trained": 0.0, "flops_saved": 0.0, "device_s_saved": 0.0}
    stages = results[results[PHASE] != BASE]
    if STAGE_KEY in stages and stages[STAGE_KEY].notna().all():
        # each stage was trained once, whichever row says so: a stage trained by an attempt that was then
        # preempted has only rows that found it done, and is still a stage trained
        first = ~stages[STAGE_KEY].duplicated()
        trained, shared = stages[first], stages[~first]
    else:  # results written before stage_key
        reused = stages[REUSED].astype(bool)
        trained, shared = stages[~reused], stages[reused]
    return {"stage_rows": len(stages), "stages_trained": len(trained), "stages_reused": len(shared),
            "flops_trained": float(trained[FLOPS].sum()), "device_s_trained": float(trained[DEVICE_S].sum()),
            "flops_saved": float(shared[FLOPS].sum()), "device_s_saved": float(shared[DEVICE_S].sum())}
