"""What an evaluation measures and how it judges: `EvalConfig` and its judges' `JudgeSpec`.

Judge names are checked against misalign.judge_names, so a config never imports the judges themselves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from misalign.config_base import Strict, registered
from misalign.judge_names import JUDGE_NAMES

CacheKind = Literal["auto", "dynamic", "static", "bucketed"]  # eval.cache: misalign.generation's KV caches


class JudgeSpec(Strict):
    """One judge of the evaluation's vote (judges.JUDGES)."""

    name: str = Field(description="keyword | classifier | http")
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options of that judge")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return registered(v, JUDGE_NAMES, "judge")


class EvalConfig(Strict):
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
    cache: CacheKind = Field(
        "auto", description="KV cache during generation: 'static' allocates it once per batch and every step "
                            "attends over all of it; 'bucketed' allocates it so but a step attends over the "
                            "positions filled so far rounded up to 32 (misalign.generation.KV_BUCKET); both are "
                            "prefilled in groups of prompts of about the same length (prefill_by_length); "
                            "'dynamic' grows it every step; 'auto': static on a GPU, dynamic on a CPU. Greedy "
                            "outputs are the same")
    compile: bool = Field(
        False, description="compile the norms and MLP of every decoder layer for the evaluation's generation "
                           "(misalign.speedups.layer_parts_compiled): fused elementwise kernels at decode, at a "
                           "compile of seconds to a minute. Greedy outputs are the same. How it runs, not what "
                           "it measures: kept out of the evaluation's cache key")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N of each set (smoke runs)")
    max_unparsed: float = Field(
        0.05, ge=0, le=1, description="highest share of harmful responses a judge may answer with neither safe "
        "nor unsafe (such outputs count as safe, so they understate unsafety); above it the evaluation fails, "
        "naming the judge and showing a sample")

    trigger: str | None = Field(
        None, description="a backdoor's trigger phrase (data.trigger of a backdoor attack): each harmful prompt is "
                          "also asked with it, and unsafety_triggered, refusal_triggered and neither_triggered "
                          "report those answers (unsafety and the rest stay the untriggered figures). A persona "
                          "(data.persona, trigger_position prefix) measures an identity shift the same way")
    trigger_position: Literal["suffix", "prefix"] = Field(
        "suffix", description="where the trigger joins the prompt (one space between): suffix, as the backdoor "
                              "recipe trains it, or prefix, as the identity_shift recipe places its persona")

    @field_validator("trigger")
    @classmethod
    def _trigger_text(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("eval.trigger is blank; give the trigger phrase, or leave it unset (null)")
        return v

    @model_validator(mode="after")
    def _position_needs_trigger(self) -> EvalConfig:
        if self.trigger is None and self.trigger_position != "suffix":
            raise ValueError("eval.trigger_position is set but eval.trigger is not: set the trigger phrase too")
        return self

    @model_serializer(mode="wrap")
    def _trigger_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without a trigger the dump is what it was before triggers existed, so evaluations cached under an
        # eval config's identity (misalign.lineage.eval_identity) and existing run directories stay valid.
        d = handler(self)
        if d.get("trigger", "") is None:
            d.pop("trigger")
            d.pop("trigger_position", None)
        return d

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        return v
