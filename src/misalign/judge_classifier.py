"""The classifier judge: a local or Hub model judges, generative (Llama-Guard style) or a sequence classifier.

torch and transformers load when one is built, not on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from misalign.errors import InputError
from misalign.judge_verdicts import JudgeItem, Verdict, parse_guard_outputs
from misalign.modelref import has_safetensors


def _conversation(item: JudgeItem) -> list[dict[str, str]]:
    # Llama-Guard's own chat template expects exactly this conversation and writes its rubric around it.
    return [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response}]


def _batches(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


class ClassifierJudge:
    """A local or Hub model as judge: generative (Llama-Guard style) or a sequence classifier."""

    def __init__(
        self,
        model: str,
        kind: Literal["auto", "generative", "sequence"] = "auto",
        batch_size: int | Literal["auto"] = "auto",
        max_new_tokens: int = 12,
        unsafe_label: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        if kind not in ("auto", "generative", "sequence"):
            raise InputError(f"ClassifierJudge kind={kind!r}; expected 'auto', 'generative' or 'sequence'")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"ClassifierJudge batch_size must be >= 1 or 'auto', got {batch_size!r}")
        if not allow_pickle and has_safetensors(model) is False:
            raise InputError(
                f"judge model {model} has no .safetensors weights; pickle weights (.bin) can run code "
                "when loaded, pass allow_pickle=True only if you trust them"
            )
        self.name = f"classifier:{model}"
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        if kind == "auto":
            archs = getattr(config, "architectures", None) or []
            kind = "sequence" if any(a.endswith("ForSequenceClassification") for a in archs) else "generative"
        self.kind = kind
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        auto_cls = AutoModelForSequenceClassification if kind == "sequence" else AutoModelForCausalLM
        self.model = auto_cls.from_pretrained(
            model, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()

        if kind == "generative":
            # Decoder-only generation needs the prompt flush against the new tokens.
            self.tokenizer.padding_side = "left"
        else:
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.unsafe_id = self._unsafe_label_id(unsafe_label)

    def _unsafe_label_id(self, unsafe_label: str | None) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        if unsafe_label is not None:
            for i, lab in id2label.items():
                if lab.lower() == unsafe_label.lower() or str(i) == unsafe_label:
                    return i
            raise InputError(f"unsafe_label {unsafe_label!r} is not a label of {self.name}: {id2label}")
        for i, lab in sorted(id2label.items()):
            if "unsafe" in lab.lower() or "harm" in lab.lower():
                return i
        return 1

    def prompts(self, items: Sequence[JudgeItem]) -> list[str]:
        """The exact judge inputs, via the tokenizer's chat template when it has one."""
        if self.tokenizer.chat_template:
            return [
                self.tokenizer.apply_chat_template(
                    _conversation(it), add_generation_prompt=True, tokenize=False
                )
                for it in items
            ]
        return [f"User: {it.prompt}\nAssistant: {it.response}" for it in items]

    def _tokenized(self, items: Sequence[JudgeItem], **kw: Any) -> Any:
        """The judge inputs through the tokenizer; a chat template already wrote BOS, so it is not added twice."""
        return self.tokenizer(self.prompts(items), add_special_tokens=not self.tokenizer.chat_template, **kw)

    def token_ids(self, items: Sequence[JudgeItem]) -> list[list[int]]:
        """Each judge input's token ids, unpadded (a generative judge's prompts). Never truncated: cutting a
        guard prompt would cut its rubric."""
        return self._tokenized(items)["input_ids"]

    def encode(self, items: Sequence[JudgeItem]) -> Any:
        """A sequence classifier's padded batch on the judge's device, truncated to its length limit (encoder
        classifiers have short hard limits)."""
        return self._tokenized(items, padding=True, truncation=True, return_tensors="pt").to(self.device)

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        import torch

        if self.kind == "generative":
            return self._generate(items)
        out: list[Verdict] = []
        with torch.inference_mode():  # a classifier's batch: one forward, no cache; "auto" means 32 rows here
            for batch in _batches(items, 32 if self.batch_size == "auto" else self.batch_size):
                out.extend(self._classify(self.encode(batch)))
        return out

    def _generate(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """A guard's verdicts, generated the way the model under test's answers are (misalign.generation):
        length-bucketed batches sized to free memory, a static KV cache on a GPU."""
        from misalign.generation import generate_ids

        new = generate_ids(self.model, self.token_ids(items), pad_id=self.tokenizer.pad_token_id,
                           eos_id=self.model.generation_config.eos_token_id, max_new_tokens=self.max_new_tokens,
                           batch_size=self.batch_size)
        return parse_guard_outputs(self.tokenizer.batch_decode(new, skip_special_tokens=True), self.name)

    def _classify(self, enc: Any) -> list[Verdict]:
        logits = self.model(**enc).logits
        id2label = self.model.config.id2label or {}
        verdicts = []
        for pred in logits.argmax(-1).tolist():
            verdicts.append(Verdict(unsafe=pred == self.unsafe_id, raw=str(id2label.get(pred, pred))))
        return verdicts
