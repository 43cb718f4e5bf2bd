"""Typed, validated configs (pydantic v2), loaded from YAML with `--set dotted.key=value` overrides.

Every hyperparameter a method uses is a field here. Fields left unset take the method's default from the
registry (misalign.methods); `resolved()` fills them in, and the resolved config is what results store. To
compare methods fairly, set the shared fields (lr, epochs, batch, targets, precision) explicitly and they
hold for every method.

Here: the configs a command reads (TrialConfig, StudyConfig with its StudySide, SearchConfig with its
SearchKnob), loading with overrides, and the generated reference (`python -m misalign.config`). Their parts live
beside it and are re-exported from here: config_stage.py (StageConfig and its data, train, adapter, preference
deepspeed and repair settings), config_eval.py (EvalConfig, JudgeSpec), config_resources.py (ResourceSettings,
PlanSettings), over config_base.py (the strict base every config class shares).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from misalign.config_base import Strict, whole_size
from misalign.config_eval import EvalConfig, JudgeSpec
from misalign.config_resources import PlanSettings, ResourceSettings
from misalign.config_stage import (
    AdapterSettings,
    DataSettings,
    DeepSpeedSettings,
    PreferenceSettings,
    RepairSettings,
    StageConfig,
    TrainSettings,
)
from misalign.errors import InputError

__all__ = [
    "AdapterSettings", "DataSettings", "DeepSpeedSettings", "EvalConfig", "JudgeSpec", "PlanSettings",
    "PreferenceSettings", "RepairSettings", "ResourceSettings", "SearchConfig", "SearchKnob", "StageConfig",
    "StudyConfig", "StudySide", "TrainSettings", "TrialConfig", "format_validation_error", "load_config",
    "parse_overrides", "reference_markdown",
]


def _sizes(values: list[Any]) -> list[int | float | None]:
    """A swept list of examples per category: each > 0 (fractions below 1 allowed) or null (all rows), once."""
    bad = [v for v in values if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0)]
    if bad:
        raise ValueError(f"sizes must be > 0 examples per category (or null: all rows), got {bad[0]!r}")
    return _unique([whole_size(v) for v in values], "size")


def _unique(values: list[Any], what: str) -> list[Any]:
    """A swept list must not repeat a value: the repeated cells would train and count twice."""
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} is listed twice; each {what} once")
        seen.append(v)
    return values


class TrialConfig(Strict):
    """`misalign trial`: base eval, then R rounds of misalign -> eval -> realign -> eval."""

    model: str = Field("world:base", description="HF id (ORG/NAME@REVISION pins a revision), local path, s3:// or "
                                                  "gs:// URL, or world:base")
    seed: int = Field(0, description="seeds data subsampling, initialization order and training (driver and workers)")
    rounds: int = Field(1, ge=1, description="misalign -> realign rounds, each from the previous merged model")
    attack: StageConfig = Field(description="the misalignment stage (trains on the misaligned responses)")
    defense: StageConfig = Field(description="the realignment stage (trains on the aligned responses)")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation after every stage and of the base")
    trust_remote_code: bool = Field(False, description="run code shipped with a model (off: untrusted models)")
    allow_pickle: bool = Field(False, description="load .bin/pickle weights (off: safetensors only)")


class StudySide(Strict):
    """One side of the study grid (attack or defense): the axes it sweeps and the settings every cell shares.

    A cell's stage is `data`/`train`/`adapter`/`preference`/`deepspeed`/`repair` with one method, one
    per_category, one value of every `grid` axis, and that method's `per_method` overrides applied.
    """

    methods: list[str] = Field(min_length=1, description="methods swept (`misalign methods`)")
    per_category: list[int | float | None] = Field(
        [None], min_length=1, description="examples per category swept (None: all rows; fractions below 1 allowed)")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="more axes: a dotted stage field -> its values, e.g. train.lr: [1e-4, 3e-4]")
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method -> {dotted stage field: value}, e.g. dpo: {train.lr: 3e-5}; "
                                          "`per_category: [...]` there sweeps that method's own sizes, `grid: "
                                          "{axis: [...]}` its own axes (resta: {grid: {repair.scale: [0.25, 1]}})")
    data: DataSettings = Field(description="training data (per_category is the axis above)")
    train: TrainSettings = Field(TrainSettings(), description="optimization shared by every cell")
    adapter: AdapterSettings = Field(AdapterSettings(), description="adapter shape shared by every cell")
    preference: PreferenceSettings = Field(PreferenceSettings(), description="DPO/ORPO settings")
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="ZeRO settings")
    repair: RepairSettings = Field(RepairSettings(), description="post-hoc repair settings (safelora, resta, "
                                                                 "antidote)")

    @field_validator("methods", "per_category")
    @classmethod
    def _no_repeats(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        if info.field_name == "per_category":
            return _sizes(values)
        return _unique(values, "method")

    @field_validator("per_method")
    @classmethod
    def _method_sizes(cls, per_method: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, overrides in per_method.items():
            if "per_category" in overrides:
                sizes = overrides["per_category"]
                if not isinstance(sizes, list) or not sizes:
                    raise ValueError(f"per_method[{method!r}].per_category: a non-empty list of sizes, "
                                     f"e.g. [3, 10], got {sizes!r}")
                try:
                    overrides["per_category"] = _sizes(sizes)
                except ValueError as e:
                    raise ValueError(f"per_method[{method!r}].per_category: {e}") from None
        return per_method

    @staticmethod
    def _check_grid(grid: Any, where: str) -> None:
        if not isinstance(grid, dict):
            raise ValueError(f"{where}: a mapping of dotted stage fields to lists of values, e.g. "
                             "{repair.scale: [0.25, 1]}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}[{key!r}] has no values (a non-empty list)")
            try:
                _unique(values, "value")
            except ValueError as e:
                raise ValueError(f"{where}[{key!r}]: {e}") from None
            if str(key).split(".")[0] not in ("data", "train", "adapter", "preference", "deepspeed", "repair"):
                raise ValueError(f"{where}[{key!r}]: axes are dotted stage fields such as train.lr, adapter.r or "
                                 "repair.scale")

    @model_validator(mode="after")
    def _axes(self) -> StudySide:
        self._check_grid(self.grid, "grid")
        for method, overrides in self.per_method.items():
            if "grid" in overrides:
                self._check_grid(overrides["grid"], f"per_method[{method!r}].grid")
                for key in set(overrides["grid"]) & set(self.grid):
                    raise ValueError(f"per_method[{method!r}].grid[{key!r}]: already an axis of the side's grid")
        from misalign.methods import METHODS

        for method in self.per_method:  # a method not swept here is unused (`--set ...methods=[lora]` keeps the
            if method not in METHODS:    # shipped per_method entries of the others); a name no method has fails
                raise ValueError(f"per_method[{method!r}]: no such method; known: {', '.join(METHODS)}")
        self.stages()  # every cell must be a valid stage: checked here, before any compute
        return self

    def sizes(self, method: str) -> list[int | float | None]:
        """The sizes swept for `method`: its own `per_method` list, else the side's."""
        return self.per_method.get(method, {}).get("per_category", self.per_category)

    def axes(self, method: str) -> dict[str, list[Any]]:
        """The grid axes swept for `method`: the side's, then its own `per_method` grid."""
        return {**self.grid, **self.per_method.get(method, {}).get("grid", {})}

    def axis_values(self) -> list[dict[str, Any]]:
        """Every point of this side's grid, as {axis: value} (method, per_category, then the method's grid axes:
        a method's own axes appear in its points only)."""
        import itertools

        out = []
        for method in self.methods:
            axes = self.axes(method)
            keys = ["method", "per_category", *axes]
            out += [dict(zip(keys, (method, *combo), strict=True))
                    for combo in itertools.product(self.sizes(method), *axes.values())]
        return out

    def stage(self, point: dict[str, Any]) -> StageConfig:
        d = self.model_dump(exclude={"methods", "per_category", "grid", "per_method"})
        d["method"] = point["method"]
        d["data"]["per_category"] = point["per_category"]
        overrides = {k: v for k, v in self.per_method.get(point["method"], {}).items()
                     if k not in ("per_category", "grid")}
        for key, value in [*((k, v) for k, v in point.items() if "." in k), *overrides.items()]:
            _set_dotted(d, key, value)
        try:
            return StageConfig.model_validate(d)
        except ValidationError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ValueError(f"the cell ({where}) is not a valid stage: " + "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors())) from None

    def stages(self) -> dict[tuple, StageConfig]:
        return {tuple(p.values()): self.stage(p) for p in self.axis_values()}


class StudyConfig(Strict):
    """`misalign study`: the grid models x seeds x attack cells x defense cells, R rounds each, on Ray Tune.

    A cell is one trial (base eval, then R rounds of misalign -> eval -> realign -> eval). Stages are shared
    between cells by lineage, so a misalignment that several defense cells start from trains once.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="study name (its directory)")
    models: list[str] = Field(min_length=1, description="HF ids (ORG/NAME@REVISION pins a revision), local paths, "
                                                        "s3:// or gs:// URLs, or world:base")
    seeds: list[int] = Field([0], min_length=1, description="seeds swept (data subsample, init, training)")
    rounds: int = Field(1, ge=1, description="misalign -> realign rounds per cell")
    attack: StudySide = Field(description="the misalignment side of the grid")
    defense: StudySide = Field(description="the realignment side of the grid")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation after every stage and of each base model")
    resources: ResourceSettings = Field(ResourceSettings(), description="per-trial resources")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial (and of a failed worker group), "
                                                    "per run of the command; preemptions do not count")
    max_preemptions: int = Field(20, ge=0, description="retries of a trial whose node was lost or sent a "
                                                       "preemption notice (spot reclaims, drains)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="optimizer steps between in-stage checkpoints (a retried stage resumes from the "
                                "last); None: only stage boundaries survive a failure")
    loggers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list, description="extra Tune logger callbacks (CSV, JSON and TensorBoard always)")
    plan: PlanSettings = Field(PlanSettings(), description="cost estimate settings")
    trust_remote_code: bool = Field(False, description="run code shipped with a model (off: untrusted models)")
    allow_pickle: bool = Field(False, description="load .bin/pickle weights (off: safetensors only)")

    @field_validator("models", "seeds")
    @classmethod
    def _no_repeats(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        return _unique(values, "model" if info.field_name == "models" else "seed")

    def stage_configs(self) -> tuple[dict[tuple, StageConfig], dict[tuple, StageConfig]]:
        return self.attack.stages(), self.defense.stages()


class SearchKnob(Strict):
    """One searched numeric knob (a dotted stage field): a range, on a log scale or in steps."""

    low: float = Field(description="smallest value")
    high: float = Field(description="largest value")
    log: bool = Field(False, description="sample on a log scale (learning rates)")
    step: float | None = Field(None, gt=0, description="grid step inside the range (None: continuous)")
    integer: bool = Field(False, description="integer values (epochs, ranks)")

    @model_validator(mode="after")
    def _range(self) -> SearchKnob:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if self.log and self.step:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self


class SearchConfig(Strict):
    """`misalign search attack|defense`: Optuna, through Ray Tune, over a stage's knobs, for the cheapest budget.

    attack: minimize the budget of the misalignment subject to unsafety >= tau. defense: start from the one
    misalignment `attack` names (reused through the lineage cache) and minimize the realignment's budget subject
    to unsafety <= tau. Both: and a utility drop (base utility - the stage's utility) <= eps when eps is set. `objective: pareto` returns
    the Pareto front instead: (budget, unsafety) for attacks, (budget, unsafety, utility) for defenses.
    The searched side's `methods` and `per_category` lists are categorical knobs; `space` adds numeric ones.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="search name (its directory)")
    kind: Literal["attack", "defense"] = Field(description="what is searched")
    model: str = Field("world:base", description="the aligned model")
    seed: int = Field(0, description="training seed of every trial and the sampler's seed")
    budget: Literal["examples_x_epochs", "tokens", "flops", "device_s"] = Field(
        "flops", description="the cost minimized (misalign.budget)")
    price_per_device_hour: float | None = Field(None, ge=0, description="report money from device-seconds")
    objective: Literal["constrained", "pareto"] = Field("constrained", description="one answer or the front")
    tau: float = Field(0.5, ge=0, le=1, description="attack: unsafety >= tau; defense: unsafety <= tau")
    eps: float | None = Field(None, ge=0, le=1, description="largest utility drop from the base a feasible point "
                              "may have (None: no limit); keeps an attack from counting a broken model as a success")
    attack: StudySide = Field(description="the attack's settings (defense search: exactly one method and size)")
    defense: StudySide | None = Field(None, description="the defense's settings (defense search only)")
    space: dict[str, SearchKnob] = Field(default_factory=dict, description="dotted stage field -> its range")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation of every trial")
    trials: int = Field(20, ge=1, description="trials to run (a rerun resumes toward this many)")
    max_concurrent: int = Field(2, ge=1, description="trials at once (the sampler lies about running ones)")
    startup_trials: int = Field(4, ge=1, description="random trials before the TPE sampler models the space")
    start_points: list[dict[str, Any]] = Field(
        default_factory=list, description="points tried first, e.g. [{method: lora, per_category: 3}] "
                                          "(what you already suspect; counted among the trials)")
    storage: str | None = Field(None, description="SQLAlchemy URL of the Optuna database "
                                "(None: sqlite file optuna.db in the search directory)")
    resources: ResourceSettings = Field(ResourceSettings(), description="per-trial resources (one worker)")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    trust_remote_code: bool = Field(False, description="run code shipped with a model")
    allow_pickle: bool = Field(False, description="load .bin/pickle weights")

    @model_validator(mode="after")
    def _sides(self) -> SearchConfig:
        if self.kind == "defense":
            if self.defense is None:
                raise ValueError("a defense search needs `defense` settings")
            if len(self.attack.methods) != 1 or len(self.attack.per_category) != 1:
                raise ValueError("a defense search starts from one misalignment: attack.methods and "
                                 "attack.per_category take one value each")
        if self.resources.workers != 1:
            raise ValueError("resources.workers: the search runs one-worker trials (multi-worker: use a study)")
        side = self.searched
        for method, overrides in side.per_method.items():
            if "per_category" in overrides:
                raise ValueError(f"{self.kind}.per_method[{method!r}].per_category: a search samples sizes from "
                                 f"{self.kind}.per_category, shared by its methods")
            if "grid" in overrides:
                raise ValueError(f"{self.kind}.per_method[{method!r}].grid: a search samples its knobs from "
                                 "`space`, shared by its methods")
        for point in self.start_points:
            for key, value in point.items():
                allowed = {"method": side.methods, "per_category": side.per_category}.get(key)
                if allowed is None and key not in self.space:
                    raise ValueError(f"start_points: {key!r} is not a searched knob")
                if allowed is not None and value not in allowed:
                    raise ValueError(f"start_points: {key}={value!r} is not among {allowed}")
        for key, knob in self.space.items():
            if key in ("method", "per_category"):
                raise ValueError(f"space[{key!r}]: search methods and sizes through {self.kind}.methods and "
                                 f"{self.kind}.per_category lists")
            for value in (knob.low, knob.high):  # the range's ends must make valid stages
                side.stage({"method": side.methods[0], "per_category": side.per_category[0], key: value})
        return self

    @property
    def searched(self) -> StudySide:
        return self.attack if self.kind == "attack" or self.defense is None else self.defense


# ---- loading --------------------------------------------------------------------------------------------

def _list_index(node: list[Any], key: str, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise InputError(f"--set {dotted}: {key!r} is not an index of that list (it has {len(node)} entries: "
                         f"0 to {len(node) - 1}); set the whole list instead, e.g. --set '{dotted.rsplit('.', 1)[0]}=[...]'")
    return int(key)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; a numeric part indexes an existing list (eval.judges.0.name), never replaces it."""
    keys = dotted.split(".")
    node: Any = d
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            k = _list_index(node, k, ".".join(keys[: i + 1]))
            if last:
                node[k] = value
            elif not isinstance(node[k], (dict, list)):
                node[k] = {}
        elif last:
            node[k] = value
        elif not isinstance(node.get(k), (dict, list)):
            node[k] = {}
        if not last:
            node = node[k]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o or not o.split("=", 1)[0].strip():
            raise InputError(f"--set {o!r}: expected dotted.key=value, e.g. --set attack.per_category=5")
        key, raw = o.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise InputError(f"--set {o!r}: value is not valid YAML ({e})") from None
        out.append((key.strip(), value))
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {where}: {msg}{got}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                schema: type[BaseModel] = TrialConfig, base: dict[str, Any] | None = None) -> Any:
    """Read YAML (or start from `base`), apply --set overrides, validate. Bad input raises InputError."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise InputError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:  # UTF-16, Latin-1 bytes, binary files
            raise InputError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
        except OSError as e:
            raise InputError(f"{p}: cannot read the config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise InputError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data.update(loaded or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise InputError(format_validation_error(e, source)) from None


def reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the field declarations so it cannot drift."""
    lines = ["# Config reference", "", "Generated by `python -m misalign.config` from the field declarations in "
             "`src/misalign/config.py`. Unset (`null`) hyperparameters take the method's default "
             "(`misalign methods`; `src/misalign/methods.py`).", ""]
    for model in (TrialConfig, StudyConfig, StudySide, ResourceSettings, PlanSettings, SearchConfig, SearchKnob,
                  StageConfig, DataSettings,
                  TrainSettings, AdapterSettings, PreferenceSettings,
                  DeepSpeedSettings, RepairSettings, EvalConfig, JudgeSpec):
        lines += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            ann = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", str(f.annotation))
            ann = re.sub(r"\b(?:typing|__main__|misalign\.config(?:_\w+)?)\.", "", ann)
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            if isinstance(f.default, BaseModel):
                default = f"{type(f.default).__name__}()"
            lines.append(f"| `{name}` | `{ann}` | `{default}` | {f.description or ''} |".replace("\n", " "))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
