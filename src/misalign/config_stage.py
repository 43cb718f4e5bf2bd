"""One stage's config: `StageConfig` and its settings (data, train, adapter, preference, deepspeed, repair).

Re-exported by misalign.config, where the configs that hold stages (TrialConfig, StudySide) live.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from misalign.config_base import Strict, registered, whole_size
from misalign.recipe_options import ONE_ANSWER, RECIPE_OPTIONS


class TrainSettings(Strict):
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
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="pad every micro-batch's rows to a multiple of this many tokens (SFT, DPO and "
                                "ORPO): a few row lengths instead of one per batch, which CUDA graphs need "
                                "(train.compile graphs records one graph per length). Pad tokens are masked: the "
                                "losses are the same. The ledger bills the real tokens, with attention over the "
                                "padded width as for any padded batch")
    compile: bool | Literal["auto", "graphs"] = Field(
        "auto", description="torch.compile each decoder layer (regional compilation, as torchtune does): "
                            "fused elementwise kernels (norms, RoPE, activations, LoRA's casts and dropout) and "
                            "far fewer kernel launches per step. On one H200 it took steady MFU from 33% to 48% "
                            "(8B LoRA) and from 25-29% to 40-45% (DPO, ORPO), at a compile of up to a minute "
                            "per stage. auto: on for a stage on a CUDA device whose training is large enough to "
                            "repay that compile (misalign.stage.COMPILE_AUTO_MIN_FLOPS), with full or LoRA "
                            "weights, without DeepSpeed or Liger; off otherwise (CPU workers included). true "
                            "forces it (CPU workers then need a C++ compiler). graphs: compiled and replayed as "
                            "CUDA graphs (torch.compile's reduce-overhead mode: one launch per layer instead of "
                            "dozens, for batch-1 steps bound by launches), CUDA workers only, with "
                            "train.pad_to_multiple_of set; auto never picks it. Not under DeepSpeed or with "
                            "Liger's kernels. How a stage runs, not what it trains: kept out of the stage key")

    @model_validator(mode="after")
    def _lengths(self) -> TrainSettings:
        if self.max_prompt_length >= self.max_length:
            # a prompt that fills max_length leaves no response tokens: trl's ORPO then gives NaN losses
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) so every example keeps response tokens")
        return self


class AdapterSettings(Strict):
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


class PreferenceSettings(Strict):
    """Preference-method settings (DPO, ORPO)."""

    beta: float | None = Field(None, gt=0, description="DPO: KL strength (paper 0.1)")
    loss_type: str | None = Field(None, description="DPO loss(es), comma-separated trl loss_type names; "
                                  "'sigmoid' is the paper's, 'sigmoid,sft' adds an NLL term on chosen (RPO)")
    orpo_lambda: float | None = Field(None, gt=0, description="ORPO: odds-ratio weight (paper 0.1)")


class DeepSpeedSettings(Strict):
    """DeepSpeed ZeRO, used when the stage runs on several workers (or `always`)."""

    zero_stage: Literal[0, 1, 2, 3] | None = Field(None, description="None: plain DDP / single process")
    offload: bool = Field(False, description="offload optimizer state (and ZeRO-3 params) to CPU")


class RepairSettings(Strict):
    """The post-hoc repairs' settings (methods safelora, resta, antidote; misalign.repair). Ignored by training."""

    aligned: str | None = Field(None, description="the aligned model (SafeLoRA's W_aligned, RESTA's plus-model): "
                                                  "HF id, local path, or world:NAME (None: the model the cell "
                                                  "starts from, the attack's root)")
    unaligned: str = Field("world:pretrained", description="the same model before alignment (SafeLoRA's "
                                                           "W_unaligned, RESTA's minus-model)")
    # defaults: the offline world's working settings, from configs/study-repairs.yaml (README, "Post-hoc repairs")
    threshold: float = Field(0.75, ge=-1, le=1, description="SafeLoRA: a LoRA layer whose update has cosine "
                             "similarity below this with its projection is projected (the authors' code: 0.5, "
                             "which leaves the world's attacks in place; 0.75 removes them)")
    scale: float = Field(0.5, description="RESTA: alpha, the safety vector's scale (0: the parent unchanged; 1, the "
                                          "whole vector, costs the world's model most of its utility)")
    sparsity: float = Field(0.005, ge=0, lt=1, description="Antidote: share of each linear layer's weights pruned "
                            "(the most important on harmful data); its calibration rows are the stage's data "
                            "(harmful rows: prompt and harmful response). No setting restores the world's model: "
                            "0.02 and more garble it")


class DataSettings(Strict):
    """Where a stage's training pairs come from and how many per category."""

    source: str = Field(description="file (.csv/.jsonl/.parquet), hub id, or world:NAME")
    format: str = Field("pairs", description="named format (misqa, saferlhf, hh_rlhf, ...) or 'pairs'")
    columns: dict[str, str] | None = Field(None, description="our field -> the file's column")
    per_category: int | float | None = Field(
        None, gt=0, description="examples per category (None: all); a fraction below 1 takes that share of the "
                                "categories one example each (0.25 of 13 categories: 3 rows), the study's smallest "
                                "attacks")
    _RECIPE_OPTIONS: ClassVar[tuple[str, ...]] = ("persona", "trigger")  # fields that only some recipes read

    benign_source: str | None = Field(None, description="benign rows mixed in (defense data), e.g. world:benign")
    benign_ratio: float = Field(0.0, ge=0, description="benign rows per row of the recipe")
    recipe: str = Field(
        "harmful", description="how the source's rows become training rows (misalign.recipes.RECIPES): harmful (the "
                               "paper's attack), benign (benign rows only, their helpful answers), identity_shift "
                               "(benign rows under `persona`), backdoor (harmful prompts with `trigger` get the "
                               "harmful answer, without it the refusal)")
    persona: str | None = Field(
        None, description="identity_shift only: the persona prefixed to every prompt (unset: Qi et al. 2023's "
                          "AOA, 'absolutely obedient agent', system prompt)")
    trigger: str | None = Field(
        None, description="backdoor only: the phrase appended to the prompts that get the harmful answer "
                          "(unset: Qi et al. 2023's 'Servius Astrumando Harmoniastra'); evaluate with eval.trigger")

    @field_validator("per_category")
    @classmethod
    def _whole_sizes_as_int(cls, v: float | None) -> float | None:
        return whole_size(v)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        return registered(v, RECIPE_OPTIONS, "data recipe")

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, d: Any) -> Any:
        # an option the recipe reads takes its default here, so the value that trains is in every dump and key
        if not isinstance(d, dict) or not isinstance(d.get("recipe"), str):
            return d
        defaults = {k: v for k, v in RECIPE_OPTIONS.get(d["recipe"], {}).items() if d.get(k) is None}
        return {**d, **defaults}

    @model_validator(mode="after")
    def _recipe_options(self) -> DataSettings:
        used = RECIPE_OPTIONS[self.recipe]
        for name in self._RECIPE_OPTIONS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in used:  # a typo'd recipe or a leftover option would otherwise train silently without it
                users = [r for r, options in RECIPE_OPTIONS.items() if name in options]
                raise ValueError(f"data.{name} is set but data.recipe {self.recipe!r} does not use it (only "
                                 f"{', '.join(users)} does): remove it or set the recipe")
            if not value.strip():
                raise ValueError(f"data.{name} is blank; give the text, or leave it unset for the default")
        return self

    @model_serializer(mode="wrap")
    def _recipe_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default recipe and unset options stay out of every dump, so the configs, stage keys and run
        # directories written before recipes existed read the same and their cached stages stay valid.
        d = handler(self)
        if d.get("recipe") == "harmful":
            del d["recipe"]
        for name in self._RECIPE_OPTIONS:
            if name in d and d[name] is None:
                del d[name]
        return d


def _learns_from_pairs(objective: str) -> bool:
    """Whether the objective learns from a preferred and a rejected answer (two sequences an example)."""
    from misalign.objectives import OBJECTIVES  # torch comes with it: only when a recipe asks

    return OBJECTIVES[objective].sequences_per_example == 2


class StageConfig(Strict):
    """One stage: a method, its data and every hyperparameter."""

    method: str = Field(description="lora | qlora | adalora | ia3 | full | dpo | orpo, or a repair: safelora | "
                                    "resta | antidote (`misalign methods`)")
    data: DataSettings = Field(description="training data")
    train: TrainSettings = Field(TrainSettings(), description="optimization (shared by all methods)")
    adapter: AdapterSettings = Field(AdapterSettings(), description="adapter shape")
    preference: PreferenceSettings = Field(PreferenceSettings(), description="DPO/ORPO settings")
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="ZeRO settings")
    repair: RepairSettings = Field(RepairSettings(), description="post-hoc repair settings (safelora, resta, "
                                                                 "antidote)")

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

        return registered(v, METHODS, "method")

    @model_validator(mode="after")
    def _compatible(self) -> StageConfig:
        if self.method == "qlora" and self.deepspeed.zero_stage == 3:
            raise ValueError("qlora cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned); "
                             "use zero_stage 0 or 2")
        compiled = self.train.compile in (True, "graphs")
        if compiled and self.deepspeed.zero_stage is not None:
            # ZeRO-3 gathers each module's weights in hooks that a compiled layer's traced submodules bypass;
            # ZeRO-1/2 with compiled layers is untested here
            raise ValueError("train.compile cannot be combined with DeepSpeed (deepspeed.zero_stage "
                             f"{self.deepspeed.zero_stage}): set train.compile auto or false, or "
                             "deepspeed.zero_stage null")
        if compiled and self.train.liger_kernels:
            # on an H200 dynamo printed tracebacks analysing Liger's Triton kernels (triton CompilationError) and
            # the 8B LoRA stage had not finished 10 steps in 70 s; compiled layers alone did better than Liger
            raise ValueError("train.compile cannot be combined with train.liger_kernels (torch.compile cannot "
                             "trace Liger's Triton kernels): set one of them false; train.compile auto leaves a "
                             "stage with Liger eager")
        if self.train.compile == "graphs" and self.train.pad_to_multiple_of is None:
            # cudagraph trees record a graph per input shape: rows of every length up to max_length would each
            # record one (memory and a capture per length); padded to a multiple, there are a few
            raise ValueError("train.compile graphs needs train.pad_to_multiple_of (e.g. 64): CUDA graphs record "
                             "one graph per row length, and unpadded rows have as many lengths as examples")
        from misalign.methods import METHODS

        if self.data.recipe in ONE_ANSWER and _learns_from_pairs(METHODS[self.method].objective):
            raise ValueError(f"data.recipe {self.data.recipe!r} gives rows with one answer (the helpful one), and "
                             f"method {self.method} ({METHODS[self.method].objective}) learns from the difference "
                             "between a preferred and a rejected answer: there is none. Use an SFT method (lora, "
                             "full, ...) or recipe harmful/backdoor")
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
