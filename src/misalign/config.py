"""Typed, validated configs (pydantic v2), loaded from YAML with `--set dotted.key=value` overrides.

Every hyperparameter a method uses is a field here. Fields left unset take the method's default from the
registry (misalign.methods); `resolved()` fills them in, and the resolved config is what results store. To
compare methods fairly, set the shared fields (lr, epochs, batch, targets, precision) explicitly and they
hold for every method.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from misalign.errors import InputError
from misalign.judge_names import JUDGE_NAMES


def _size(v: float | None) -> float | None:
    """An examples-per-category size with whole numbers as int: 3.0 and 3 are one size, one cache key."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _unique(values: list[Any], what: str) -> list[Any]:
    """A swept list must not repeat a value: the repeated cells would train and count twice."""
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} is listed twice; each {what} once")
        seen.append(v)
    return values


def _registered(name: str, registry: Collection[str], what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    return name


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type really takes a bool (pydantic would otherwise read `true` as 1 or 1.0)."""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(v, bool) for v in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


def _bool_where_not_allowed(annotation: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return not _admits_bool(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):  # e.g. list[int] | None: the list member decides
        members = [a for a in args if typing.get_origin(a) in (list, dict)]
        return any(_bool_where_not_allowed(a, value) for a in members)
    if origin is list and isinstance(value, list) and args:
        return any(_bool_where_not_allowed(args[0], v) for v in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(_bool_where_not_allowed(args[1], v) for v in value.values())
    return False


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` epochs would train forever, `.inf` ratios overflow; numbers must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `true`/`yes` as a bool, which pydantic's lax mode turns into 1: `rounds: true` ran one round
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_where_not_allowed(field.annotation, value):
            raise ValueError("a boolean where a number or text is expected (YAML reads true/false/yes/no as "
                             "booleans)")
        return value


class TrainSettings(_Strict):
    """Optimization settings shared by every method. None = the method's default (see methods.METHODS)."""

    lr: float | None = Field(None, gt=0, description="peak learning rate")
    epochs: float | None = Field(None, gt=0, description="passes over the stage data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int | None = Field(None, ge=1, description="examples per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warmup")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    max_length: int = Field(256, ge=8, description="prompt + response tokens; longer responses are truncated")
    max_prompt_length: int = Field(128, ge=4, description="prompts are cut from the left to this many tokens")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision. auto: the parent model's: bf16 autocast for bf16 weights (most "
                            "released LLMs; what a GPU runs fast), fp32 otherwise (fp16 weights included: set "
                            "fp16 for fp16 mixed precision on a GPU). A function of the model, not the machine, "
                            "so a stage's key says what it trains")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, about a third more compute "
                           "(trl turns it on by default; worth it for multi-billion-parameter models)")
    log_every: int | None = Field(None, ge=1, description="optimizer steps between progress lines "
                                  "(None: about 25 lines per stage; every line costs a device sync)")
    # GPU throughput (issue 13); the default keeps every stage's batches exactly as before
    packing: Literal["none", "padding_free", "bfd"] = Field(
        "none", description="SFT batches without padding: 'padding_free' flattens each micro-batch into one row "
                            "(same examples and steps, no compute on pad tokens); 'bfd' packs examples into rows "
                            "of max_length tokens, batch_size rows per micro-batch (a token-budget micro-batch: "
                            "fewer, fuller steps). Sequences never attend across each other (position ids restart "
                            "per example). DPO/ORPO ignore it (trl 1.16 disables DPO padding-free)")
    liger_kernels: bool = Field(
        False, description="Liger's fused Triton kernels for the model's RMSNorm, RoPE and SwiGLU (CUDA only; "
                           "pip install 'misalign[liger]'). trl already fuses the LM head and its loss")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer (regional compilation, as torchtune does): "
                            "fused elementwise kernels (norms, RoPE, activations, LoRA's casts and dropout) and "
                            "far fewer kernel launches per step. On one H200 it took steady MFU from 33% to 48% "
                            "(8B LoRA) and from 25-29% to 40-45% (DPO, ORPO), at a compile of up to a minute "
                            "per stage. auto: on for a stage on a CUDA device whose training is large enough to "
                            "repay that compile (misalign.stage.COMPILE_AUTO_MIN_FLOPS), with full or LoRA "
                            "weights, without DeepSpeed or Liger; off otherwise (CPU workers included). true "
                            "forces it (CPU workers then need a C++ compiler). Not under DeepSpeed or with "
                            "Liger's kernels. How a stage runs, not what it trains: kept out of the stage key")

    @model_validator(mode="after")
    def _lengths(self) -> TrainSettings:
        if self.max_prompt_length >= self.max_length:
            # a prompt that fills max_length leaves no response tokens: trl's ORPO then gives NaN losses
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) so every example keeps response tokens")
        return self


class AdapterSettings(_Strict):
    """Parameter-efficient adapter settings (LoRA family and IA3). Ignored by full fine-tuning."""

    r: int | None = Field(None, ge=1, description="LoRA rank (AdaLoRA: the target average rank)")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    targets: str | list[str] | None = Field(
        None, description="'attention' (q,v), 'all-linear', or module names; resolved per architecture")
    adalora_init_r: int = Field(12, ge=1, description="AdaLoRA starting rank, pruned toward r during training")
    adalora_tinit: float = Field(0.1, ge=0, lt=1, description="share of steps before rank pruning starts")
    adalora_tfinal: float = Field(0.2, ge=0, lt=1, description="share of steps at the end with ranks fixed")
    adalora_delta_t: int = Field(1, ge=1, description="steps between rank reallocations")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit type")
    double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too")

    @model_validator(mode="after")
    def _adalora_phases(self) -> AdapterSettings:
        if self.adalora_tinit + self.adalora_tfinal >= 1:  # AdaLoRA prunes ranks between the two phases
            raise ValueError(f"adalora_tinit ({self.adalora_tinit}) + adalora_tfinal ({self.adalora_tfinal}) must "
                             "be below 1, leaving steps for rank budgeting")
        return self

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (not v or any(not t.strip() for t in v)):
            raise ValueError("an adapter needs at least one target module (names must not be empty)")
        return v


class PreferenceSettings(_Strict):
    """Preference-method settings (DPO, ORPO)."""

    beta: float | None = Field(None, gt=0, description="DPO: KL strength (paper 0.1)")
    loss_type: str | None = Field(None, description="DPO loss(es), comma-separated trl loss_type names; "
                                  "'sigmoid' is the paper's, 'sigmoid,sft' adds an NLL term on chosen (RPO)")
    orpo_lambda: float | None = Field(None, gt=0, description="ORPO: odds-ratio weight (paper 0.1)")


class DeepSpeedSettings(_Strict):
    """DeepSpeed ZeRO, used when the stage runs on several workers (or `always`)."""

    zero_stage: Literal[0, 1, 2, 3] | None = Field(None, description="None: plain DDP / single process")
    offload: bool = Field(False, description="offload optimizer state (and ZeRO-3 params) to CPU")


class DataSettings(_Strict):
    """Where a stage's training pairs come from and how many per category."""

    source: str = Field(description="file (.csv/.jsonl/.parquet), hub id, or world:NAME")
    format: str = Field("pairs", description="named format (misqa, saferlhf, hh_rlhf, ...) or 'pairs'")
    columns: dict[str, str] | None = Field(None, description="our field -> the file's column")
    per_category: int | float | None = Field(
        None, gt=0, description="examples per category (None: all); a fraction below 1 takes that share of the "
                                "categories one example each (0.25 of 13 categories: 3 rows), the study's smallest "
                                "attacks")
    benign_source: str | None = Field(None, description="benign rows mixed in (defense data), e.g. world:benign")
    benign_ratio: float = Field(0.0, ge=0, description="benign rows per harmful row")

    @field_validator("per_category")
    @classmethod
    def _whole_sizes_as_int(cls, v: float | None) -> float | None:
        return _size(v)


class StageConfig(_Strict):
    """One fine-tuning stage: a method, its data and every hyperparameter."""

    method: str = Field(description="lora | qlora | adalora | ia3 | full | dpo | orpo (`misalign methods`)")
    data: DataSettings = Field(description="training data")
    train: TrainSettings = Field(TrainSettings(), description="optimization (shared by all methods)")
    adapter: AdapterSettings = Field(AdapterSettings(), description="adapter shape")
    preference: PreferenceSettings = Field(PreferenceSettings(), description="DPO/ORPO settings")
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="ZeRO settings")

    @model_validator(mode="before")
    @classmethod
    def _per_category_shorthand(cls, d: Any) -> Any:
        # `--set attack.per_category=5` (the CLI's documented example) means attack.data.per_category
        if not isinstance(d, dict) or "per_category" not in d:
            return d
        data = d.get("data")
        if isinstance(data, (dict, DataSettings, type(None))):
            data = data.model_dump() if isinstance(data, DataSettings) else dict(data or {})
            d = {**d, "data": {**data, "per_category": d["per_category"]}}
            del d["per_category"]
        return d

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from misalign.methods import METHODS

        return _registered(v, METHODS, "method")

    @model_validator(mode="after")
    def _compatible(self) -> StageConfig:
        if self.method == "qlora" and self.deepspeed.zero_stage == 3:
            raise ValueError("qlora cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned); "
                             "use zero_stage 0 or 2")
        if self.train.compile is True and self.deepspeed.zero_stage is not None:
            # ZeRO-3 gathers each module's weights in hooks that a compiled layer's traced submodules bypass;
            # ZeRO-1/2 with compiled layers is untested here
            raise ValueError("train.compile cannot be combined with DeepSpeed (deepspeed.zero_stage "
                             f"{self.deepspeed.zero_stage}): set train.compile auto or false, or "
                             "deepspeed.zero_stage null")
        if self.train.compile is True and self.train.liger_kernels:
            # on an H200 dynamo printed tracebacks analysing Liger's Triton kernels (triton CompilationError) and
            # the 8B LoRA stage had not finished 10 steps in 70 s; compiled layers alone did better than Liger
            raise ValueError("train.compile cannot be combined with train.liger_kernels (torch.compile cannot "
                             "trace Liger's Triton kernels): set one of them false; train.compile auto leaves a "
                             "stage with Liger eager")
        if self.method == "adalora" and self.deepspeed.zero_stage in (2, 3):
            raise ValueError("adalora needs full gradients on every worker for its rank reallocation; "
                             "ZeRO-2/3 partition them: use zero_stage 0 or none")
        return self

    def resolved(self) -> StageConfig:
        """A copy with every None filled from the method's defaults (what actually trains)."""
        from misalign.methods import METHODS

        d = self.model_dump()
        for section, values in METHODS[self.method].defaults.items():
            for key, value in values.items():
                if d[section].get(key) is None:
                    d[section][key] = value
        return StageConfig.model_validate(d)


class JudgeSpec(_Strict):
    """One judge of the evaluation's vote (judges.JUDGES)."""

    name: str = Field(description="keyword | classifier | http")
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options of that judge")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(v, JUDGE_NAMES, "judge")


class EvalConfig(_Strict):
    """What an evaluation measures and how responses are judged."""

    harmful: str = Field("world:eval_harmful", min_length=1, description="harmful prompts (unsafety)")
    benign: str | None = Field("world:eval_benign", description="benign look-alikes (over-refusal)")
    utility: str | None = Field("world:eval_utility", description="utility items with reference answers")
    format: str = Field("eval", description="named format of the eval files (eval, jailbreak_test_set)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks (utility)")
    lm_eval_include: str | None = Field(None, description="directory of local lm-eval task YAMLs")
    lm_eval_limit: int | None = Field(None, description="items per lm-eval task (None: all)")
    judges: list[JudgeSpec] = Field(
        default_factory=lambda: [JudgeSpec(name="classifier", options={"model": "world:guard"})])
    vote: str = Field("any", description="any | majority | all | atleast:K")
    refusal_phrases: list[str] | None = Field(None, description="phrases marking a refusal (None: defaults)")
    max_new_tokens: int = Field(40, ge=1, le=2048)
    batch_size: int | Literal["auto"] = Field(
        "auto", description="prompts per generation batch (>= 1); 'auto': each batch as large as fits in the free "
                            "device memory (misalign.generation.auto_batches; within a trial's share of a GPU "
                            "when resources.gpus_per_worker < 1), larger for shorter prompts, up to 1,024 on a "
                            "GPU and 128 on a CPU")
    cache: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="KV cache during generation: 'static' allocates it once per batch, 'dynamic' grows it "
                            "every step; 'auto': static on a GPU, dynamic on a CPU. Greedy outputs are the same")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N of each set (smoke runs)")
    max_unparsed: float = Field(
        0.05, ge=0, le=1, description="highest share of harmful responses a judge may answer with neither safe "
        "nor unsafe (such outputs count as safe, so they understate unsafety); above it the evaluation fails, "
        "naming the judge and showing a sample")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        return v


class TrialConfig(_Strict):
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


class StudySide(_Strict):
    """One side of the study grid (attack or defense): the axes it sweeps and the settings every cell shares.

    A cell's stage is `data`/`train`/`adapter`/`preference`/`deepspeed` with one method, one per_category,
    one value of every `grid` axis, and that method's `per_method` overrides applied.
    """

    methods: list[str] = Field(min_length=1, description="methods swept (`misalign methods`)")
    per_category: list[int | float | None] = Field(
        [None], min_length=1, description="examples per category swept (None: all rows; fractions below 1 allowed)")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="more axes: a dotted stage field -> its values, e.g. train.lr: [1e-4, 3e-4]")
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method -> {dotted stage field: value}, e.g. dpo: {train.lr: 3e-5}")
    data: DataSettings = Field(description="training data (per_category is the axis above)")
    train: TrainSettings = Field(TrainSettings(), description="optimization shared by every cell")
    adapter: AdapterSettings = Field(AdapterSettings(), description="adapter shape shared by every cell")
    preference: PreferenceSettings = Field(PreferenceSettings(), description="DPO/ORPO settings")
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="ZeRO settings")

    @field_validator("methods", "per_category")
    @classmethod
    def _no_repeats(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        if info.field_name == "per_category":
            bad = [v for v in values if v is not None and (isinstance(v, bool) or not v > 0)]
            if bad:
                raise ValueError(f"sizes must be > 0 examples per category (or null: all rows), got {bad[0]!r}")
            values = [_size(v) for v in values]
        return _unique(values, "method" if info.field_name == "methods" else "size")

    @model_validator(mode="after")
    def _axes(self) -> StudySide:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid[{key!r}] has no values")
            try:
                _unique(values, "value")
            except ValueError as e:
                raise ValueError(f"grid[{key!r}]: {e}") from None
            if key.split(".")[0] not in ("data", "train", "adapter", "preference", "deepspeed"):
                raise ValueError(f"grid[{key!r}]: axes are dotted stage fields such as train.lr or adapter.r")
        for method in self.per_method:
            if method not in self.methods:
                raise ValueError(f"per_method[{method!r}]: not one of methods {self.methods}")
        self.stages()  # every cell must be a valid stage: checked here, before any compute
        return self

    def axis_values(self) -> list[dict[str, Any]]:
        """Every point of this side's grid, as {axis: value} (method, per_category, then the grid axes)."""
        import itertools

        keys = ["method", "per_category", *self.grid]
        lists = [self.methods, self.per_category, *self.grid.values()]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]

    def stage(self, point: dict[str, Any]) -> StageConfig:
        d = self.model_dump(exclude={"methods", "per_category", "grid", "per_method"})
        d["method"] = point["method"]
        d["data"]["per_category"] = point["per_category"]
        for key, value in [*((k, v) for k, v in point.items() if "." in k),
                           *self.per_method.get(point["method"], {}).items()]:
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


class ResourceSettings(_Strict):
    """What one trial holds. One worker trains in the Tune trial's own process; several launch one Ray Train
    TorchTrainer per trial (gloo on CPUs, NCCL on GPUs) that runs all of the trial's stages."""

    workers: int = Field(1, ge=1, description="training workers per trial (DeepSpeed/DDP ranks)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker holds (torch threads match it)")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker holds (0: CPU training)")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a trial's workers are placed on nodes (Ray placement group strategy)")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once (None: as many as the cluster's CPUs/GPUs hold, or on an "
        "autoscaling cluster can grow to; required where its autoscaler's limits cannot be read)")
    start_timeout_s: float = Field(
        1800, gt=0, description="stop the run when no trial could start for this long: the cluster cannot hold "
        "one, and no node the autoscaler added so far could (time for an autoscaler to add GPU nodes included)")


class PlanSettings(_Strict):
    """`misalign study plan`: how analytic FLOPs become device-hours and money."""

    device: str = Field("NVIDIA H100 SXM (bf16 dense)", description="the device the estimate is for")
    peak_flops: float = Field(989e12, gt=0, description="the device's peak FLOP/s at the training precision")
    mfu: float = Field(0.35, gt=0, le=1, description="model FLOPs utilization assumed (share of peak reached)")
    price_per_device_hour: float | None = Field(None, ge=0, description="currency per device-hour (money line)")
    devices_per_node: int = Field(1, ge=1, description="devices (GPUs) a cluster node holds: node-hours = device-"
                                                       "hours held / this")
    tokens_per_example: int = Field(
        300, ge=1, description="assumed prompt+response tokens of a training example when its data is unreadable")
    categories: int = Field(13, ge=1, description="assumed categories when a stage's data file is unreadable")
    model_configs: dict[str, str] = Field(
        default_factory=dict, description="model -> a local config.json, for models whose hub config is unreachable")


class StudyConfig(_Strict):
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


class SearchKnob(_Strict):
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


class SearchConfig(_Strict):
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
                  DeepSpeedSettings, EvalConfig, JudgeSpec):
        lines += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            ann = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", str(f.annotation))
            ann = re.sub(r"\b(?:typing|__main__|misalign\.config)\.", "", ann)
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            if isinstance(f.default, BaseModel):
                default = f"{type(f.default).__name__}()"
            lines.append(f"| `{name}` | `{ann}` | `{default}` | {f.description or ''} |".replace("\n", " "))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
