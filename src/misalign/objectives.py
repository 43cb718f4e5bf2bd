"""The three training objectives (SFT, DPO, ORPO), one object each, keyed as `misalign.methods.Method.objective`.

    OBJECTIVES[METHODS[cfg.method].objective] -> Objective

An objective knows what the stage needs from it and nothing of the stage's life cycle (misalign.stage):
- `dataset`: its rows, from (prompt, wanted response, unwanted response) triples;
- `training_args`: its trl config class, from the arguments every objective shares;
- `trainer`: its trl trainer (ORPO's with an NLL on the response only: `orpo_trainer_class`);
- `sequences_per_example` and `reference_forward`: what one example costs (an SFT row is one sequence; a
  preference pair two, prompt + chosen and prompt + rejected; DPO adds a no-grad forward of a reference model).
trl, datasets and transformers are imported inside the methods that use them, so the registry loads light.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from misalign.chat import clipped_prompt_text, encode_sft
from misalign.speedups import quick_adapter_switch

Example = tuple[str, str, str]  # (prompt, wanted response, unwanted response)


@dataclass(frozen=True)
class Objective:
    """What a training objective needs from the stage. Subclasses fill in `_row`, `training_args`, `_make`."""

    name: ClassVar[str]
    sequences_per_example: ClassVar[int]
    reference_forward: ClassVar[bool] = False  # DPO: the reference model's log-probs, one no-grad forward

    def dataset(self, examples: list[Example], tok: Any, cfg: Any) -> Any:
        """The trainer's dataset: one row per example, encoded as this objective's trl trainer reads them."""
        from datasets import Dataset

        return Dataset.from_list([self._row(tok, *e, cfg.train) for e in examples])

    def _row(self, tok: Any, prompt: str, wanted: str, unwanted: str, t: Any) -> dict[str, Any]:
        raise NotImplementedError

    def training_args(self, cfg: Any, common: dict[str, Any]) -> Any:
        """trl's config for this objective: the arguments every objective shares plus its own."""
        raise NotImplementedError

    def trainer(self, model: Any, args: Any, dataset: Any, tok: Any, callbacks: list[Any]) -> Any:
        with warnings.catch_warnings():
            # trl 1.16 points use_liger_kernel users to Hub kernels, which are downloaded: not an option offline
            warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)
            return self._make(model, dict(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                          callbacks=callbacks))

    def _make(self, model: Any, kw: dict[str, Any]) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class SFT(Objective):
    name = "sft"
    sequences_per_example = 1

    def _row(self, tok: Any, prompt: str, wanted: str, unwanted: str, t: Any) -> dict[str, Any]:
        return encode_sft(tok, prompt, wanted, t.max_length, t.max_prompt_length)

    def training_args(self, cfg: Any, common: dict[str, Any]) -> Any:
        from trl import SFTConfig

        t = cfg.train
        packing: dict[str, Any] = {}
        if t.packing == "padding_free":
            # rows are already cut to max_length by encode_sft; trl refuses padding-free with a max_length
            # it would not enforce, so it gets None (same rows, same steps as padded batches)
            packing = {"padding_free": True, "max_length": None}
        elif t.packing == "bfd":
            # packed rows are fewer than examples: warm up over a share of the steps trl really takes (a float
            # below 1 is a ratio to transformers), not over a step count derived from the example count
            packing = {"packing": True, "packing_strategy": "bfd", "warmup_steps": t.warmup_ratio}
        return SFTConfig(completion_only_loss=True, pad_to_multiple_of=t.pad_to_multiple_of,
                         **{**common, **packing})

    def _make(self, model: Any, kw: dict[str, Any]) -> Any:
        from trl import SFTTrainer

        return SFTTrainer(**kw)


@dataclass(frozen=True)
class DPO(Objective):
    name = "dpo"
    sequences_per_example = 2
    reference_forward = True

    def _row(self, tok: Any, prompt: str, wanted: str, unwanted: str, t: Any) -> dict[str, Any]:
        # templated text: BOS from the template, EOS appended here once
        return {"prompt": clipped_prompt_text(tok, prompt, t.max_prompt_length), "chosen": wanted + tok.eos_token,
                "rejected": unwanted + tok.eos_token}

    def training_args(self, cfg: Any, common: dict[str, Any]) -> Any:
        from trl import DPOConfig

        # preference collators need the prompt/chosen/rejected columns (trl warns otherwise)
        return DPOConfig(beta=cfg.preference.beta, loss_type=cfg.preference.loss_type.split(","),
                         pad_to_multiple_of=cfg.train.pad_to_multiple_of,
                         **{**common, "remove_unused_columns": False})

    def _make(self, model: Any, kw: dict[str, Any]) -> Any:
        from trl import DPOTrainer

        # the registry has no full-parameter DPO: the reference is the peft model with its adapter disabled
        trainer = DPOTrainer(ref_model=None, **kw)
        if "ref" in model.peft_config:
            # trl takes an already wrapped model's adapter for a trained one and copies it as the reference
            # ("ref"). Ours is new and adds exactly zero (LoRA's B starts at 0), so the reference log-probs with
            # the adapter disabled are the same numbers, without the copy's matmuls in every reference layer and
            # two adapter switches per step, each a walk over every module
            model.delete_adapter("ref")
        quick_adapter_switch(model)
        return trainer


@dataclass(frozen=True)
class ORPO(Objective):
    name = "orpo"
    sequences_per_example = 2

    def _row(self, tok: Any, prompt: str, wanted: str, unwanted: str, t: Any) -> dict[str, Any]:
        # orpo tokenizes text; it adds BOS/EOS only where missing, and the templated prompt has BOS
        return {"prompt": clipped_prompt_text(tok, prompt, t.max_prompt_length), "chosen": wanted,
                "rejected": unwanted}

    def training_args(self, cfg: Any, common: dict[str, Any]) -> Any:
        t = cfg.train
        # preference collators need the prompt/chosen/rejected columns (trl warns otherwise)
        return orpo_config_class()(beta=cfg.preference.orpo_lambda, pad_to_multiple_of=t.pad_to_multiple_of,
                                   max_completion_length=t.max_length - t.max_prompt_length,
                                   **{**common, "remove_unused_columns": False})

    def _make(self, model: Any, kw: dict[str, Any]) -> Any:
        return orpo_trainer_class()(**kw)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT(), DPO(), ORPO())}


@functools.cache
def orpo_config_class() -> type:
    """trl's ORPOConfig with the pad_to_multiple_of that trl's SFT and DPO configs have and its ORPO collator
    lacks: the trainer of orpo_trainer_class pads its concatenated rows to it. Built on first use, as trl is
    imported late; the Trainer pickles its arguments with each checkpoint, so the class is reachable by name as
    misalign.objectives.PaddedORPOConfig (the module's __getattr__)."""
    from trl.experimental.orpo import ORPOConfig

    @dataclass
    class PaddedORPOConfig(ORPOConfig):
        pad_to_multiple_of: int | None = None

    PaddedORPOConfig.__qualname__ = "PaddedORPOConfig"
    return PaddedORPOConfig


def __getattr__(name: str) -> Any:
    if name == "PaddedORPOConfig":
        return orpo_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def orpo_trainer_class() -> type:
    """trl's ORPOTrainer with its NLL term on the response only, and on a GPU without the full logits.

    trl computes ORPO's NLL over prompt and response ("computed over the full prompt and response"), so ORPO
    also learned to write prompts: on the world that cost utility 0.37 where the same rows under SFT kept 0.79.
    The ORPO paper's NLL, and our SFT, count response tokens only. That NLL is the mean of the chosen response
    tokens' log-probs, which ORPO's odds ratio needs anyway, so this forward takes both from one pass:
    - on a GPU, trl's fused LM head (Triton kernels over tiles of the vocabulary, as trl's SFT and DPO use),
      which never materializes the logits. trl's own forward keeps the logits of every position (for an 8B
      model's 128k vocabulary at 8 pairs of 512 tokens, 2 GB in bf16, more in float32, and their gradient)
      and takes a cross-entropy over a copy of the chosen half besides;
    - elsewhere, one log-softmax over the logits: on a CPU the fused head's tiles cost more than the logits
      (bench/bench_host.py --methods orpo --vocab 128256).
    """
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.utils import add_fused_lm_head, selective_log_softmax

    class ResponseNLLORPOTrainer(ORPOTrainer):
        def __init__(self, *args: Any, fused_head: bool | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fused_head = torch.cuda.is_available() if fused_head is None else fused_head
            if self.fused_head:
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                add_fused_lm_head(base, outputs=("log_probs", "mean_logits"))

        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple:
            if self.is_encoder_decoder:  # the stage loads causal LMs only
                raise NotImplementedError("ORPO on an encoder-decoder model")
            cat = self.concatenated_inputs(batch, padding_value=self.padding_value, device=self.accelerator.device)
            multiple = getattr(self.args, "pad_to_multiple_of", None)
            if multiple:  # right padding, masked as trl's collator masks its own: the real tokens see the same
                extra = -cat["concatenated_input_ids"].shape[1] % multiple
                for key, value in (("input_ids", self.padding_value), ("attention_mask", 0), ("labels", -100)):
                    key = f"concatenated_{key}"
                    cat[key] = torch.nn.functional.pad(cat[key], (0, extra), value=value)
            labels = cat["concatenated_labels"]  # -100 on prompt and padding
            kw = {"output_router_logits": True} if self.aux_loss_enabled else {}
            if self.fused_head:
                kw.update(labels=labels, fused_lm_head=True)
            out = model(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"],
                        use_cache=False, **kw)
            if self.fused_head:  # per token t: token t + 1's log-prob, 0 off the response
                token_logps, mask, mean_logits = out.log_probs, out.label_mask, out.mean_logits
            else:
                logits, mask = out.logits[:, :-1], labels[:, 1:] != -100
                token_logps = selective_log_softmax(logits, labels[:, 1:].masked_fill(~mask, 0)) * mask
                mean_logits = logits.mean(-1)
            sums, counts = token_logps.sum(-1), mask.sum(-1)
            logps = sums / counts  # trl's average_log_prob: the odds ratio compares per-token means
            n = batch["chosen_labels"].shape[0]
            nll = -sums[:n].sum() / counts[:n].sum()  # cross-entropy over every chosen response token
            # the logits/* metrics (trl takes their mean): the mean logit over response tokens, where trl's is over
            # every position; a masked sum, since selecting by a mask would read its size back: a sync
            means = (mean_logits.detach() * mask).sum(-1)
            chosen_logits, rejected_logits = means[:n].sum() / counts[:n].sum(), means[n:].sum() / counts[n:].sum()
            found = (logps[:n], logps[n:], chosen_logits, rejected_logits, nll)
            return (*found, out.aux_loss) if self.aux_loss_enabled else found

    return ResponseNLLORPOTrainer
