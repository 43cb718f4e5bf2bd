"""The plan's evaluation costs (misalign.plan): what one evaluation of a model costs, how many run with and
without sharing, and the bytes each keeps.

One evaluation, per item: (prompt tokens + max_new_tokens) x (2N + A) for generation (max_new_tokens is an
upper bound: generation stops at EOS), plus a classifier judge's forward over prompt, response, its own template
and its new tokens. lm-eval tasks and http judges are counted as calls, not FLOPs. Its files, eval.json +
generations.parquet: items x (prompt characters + max_new_tokens x 4 characters), uncompressed (an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from misalign.config import EvalConfig
from misalign.costs import CHARS_PER_TOKEN, TokenLengths, Totals, forward_flops
from misalign.data import JUDGED_KINDS, EvalItem, source_present
from misalign.errors import InputError
from misalign.meta import Arch, MetaModels, first_line

ASSUMED_EVAL_ITEMS = 1900         # the paper's harmful eval set, used when the eval files are unread
ASSUMED_EVAL_PROMPT_TOKENS = 64   # a templated harmful prompt of one or two sentences
EVAL_RECORD_BYTES = 4_000         # eval.json: scores per judge and category
_UNREAD = object()                # eval items not loaded yet


class EvalCosts:
    """The study's evaluation, priced per model; reads the eval sets once (or says what it assumes)."""

    def __init__(self, ev: EvalConfig, models: MetaModels, tokenizer: Callable[..., Any | None],
                 assume: Callable[[str], None]) -> None:
        self.ev = ev
        self.models = models
        self.tokenizer = tokenizer  # (ref, counting=True) -> the tokenizer or None, from the plan's cache
        self.assume = assume
        self._items: Any = _UNREAD

    def items(self) -> list[EvalItem] | None:
        """The study's eval items as evaluation loads them, or None when its files cannot be read."""
        if self._items is _UNREAD:
            from misalign.evaluation import load_eval_sets

            ev = self.ev
            try:
                self._items = load_eval_sets(ev)
            except InputError as e:
                missing = [s for s in (ev.harmful, ev.benign, ev.utility) if s and not source_present(s)]
                if not missing:
                    raise
                self._items = None
                self.assume(f"eval set {', '.join(missing)} not readable ({first_line(e)}): assumed "
                            f"{self._assumed_items():,} harmful prompts (the paper's set) of "
                            f"{ASSUMED_EVAL_PROMPT_TOKENS} tokens each")
        return self._items

    def _assumed_items(self) -> int:
        return min(ASSUMED_EVAL_ITEMS, self.ev.limit or ASSUMED_EVAL_ITEMS)

    def bytes(self) -> float:
        """One evaluation's eval.json + generations.parquet (every item's prompt and response, uncompressed)."""
        items = self.items()
        response = self.ev.max_new_tokens * CHARS_PER_TOKEN  # the most a response can be
        if items is None:
            text = self._assumed_items() * (ASSUMED_EVAL_PROMPT_TOKENS * CHARS_PER_TOKEN + response)
        else:
            text = sum(len(i.prompt) + response for i in items)
        return float(text + EVAL_RECORD_BYTES)

    def add(self, shared: Totals, unshared: Totals, stage_models: list[str], models: list[str],
            cell_models: list[str], rounds: int) -> None:
        """Shared: one evaluation per unique stage (`stage_models`: each one's model) and per base model.
        Unshared: every cell evaluates its base and each of its 2 x rounds stages itself."""
        one = {m: self.cost(m) for m in models}
        for m in stage_models:
            shared.add(one[m])
        for m in models:
            shared.add(one[m])
        for m in cell_models:
            unshared.add(one[m], times=1 + 2 * rounds)

    def cost(self, ref: str) -> Totals:
        """One evaluation of a model of this architecture: generation, then the classifier judges."""
        arch = self.models.model_arch(ref)
        new = self.ev.max_new_tokens
        prompts = self._prompts(ref)
        out = Totals(runs=1)
        for _, p in prompts:
            out.forward_tokens += p + new
            out.flops += _forward(arch, p + new)
        harmful = [p for kind, p in prompts if kind in JUDGED_KINDS]  # triggered copies are judged too
        for j in self.ev.judges:
            if j.name == "classifier":
                tokens, flops = self._judge_cost(j.options, harmful, new)
                out.forward_tokens += tokens
                out.flops += flops
        return out

    def judges(self) -> list[str]:
        """Classifier judges whose architecture could be read (the others are listed under Assumed)."""
        refs = [str(j.options.get("model", "")) for j in self.ev.judges if j.name == "classifier"]
        return [r for r in dict.fromkeys(refs) if self.models.arch(r) is not None]

    def notes(self, shared: int, unshared: int) -> list[str]:
        """What the FLOPs leave out: http judges' calls and lm-eval tasks, with and without sharing."""
        ev, items, out = self.ev, self.items(), []
        harmful = sum(i.kind in JUDGED_KINDS for i in items) if items is not None else self._assumed_items()
        for j in ev.judges:
            if j.name == "http":
                out.append(f"http judge {j.options.get('model', '')}: {harmful * shared:,} calls "
                           f"({harmful * unshared:,} without sharing); API cost not estimated")
        if ev.lm_eval_tasks:
            out.append(f"lm-eval tasks {', '.join(ev.lm_eval_tasks)} run in each of the {shared:,} "
                       f"evaluations ({unshared:,} without sharing): not in the FLOPs")
        return out

    def _prompts(self, ref: str) -> list[tuple[str, int]]:
        """(kind, prompt tokens) of every eval item as generation tokenizes it for this model."""
        items = self.items()
        if items is None:
            return [("harmful", ASSUMED_EVAL_PROMPT_TOKENS)] * self._assumed_items()
        lengths = TokenLengths(self.tokenizer(ref))
        return [(i.kind, lengths.prompt(i.prompt, None)) for i in items]

    def _judge_cost(self, options: dict[str, Any], harmful: list[int], new: int) -> tuple[float, float]:
        """Tokens and FLOPs of a classifier judge over one evaluation's harmful responses."""
        ref = str(options.get("model", ""))
        arch = self.models.arch(ref)
        if arch is None:
            self.assume(f"judge {ref}: config not readable (add it to plan.model_configs): its FLOPs are "
                        "not counted")
            return 0.0, 0.0
        archs = getattr(arch.config, "architectures", None) or []
        sequence = options.get("kind") == "sequence" or (
            options.get("kind", "auto") == "auto" and any(a.endswith("ForSequenceClassification") for a in archs))
        judge_new = 0 if sequence else int(options.get("max_new_tokens", 12))
        template = self._judge_template_tokens(ref)
        tokens = flops = 0.0
        for p in harmful:
            width = p + new + template + judge_new
            tokens += width
            flops += _forward(arch, width)
        return tokens, flops

    def _judge_template_tokens(self, ref: str) -> int:
        """Tokens a judge's chat template adds around (prompt, response): its rubric, measured when loadable."""
        tok = self.tokenizer(ref, counting=False)
        if tok is None or not tok.chat_template:
            why = "no tokenizer" if tok is None else "no chat template"
            self.assume(f"judge {ref}: the tokens its template/rubric adds to each item are not counted ({why})")
            return 0
        convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template may reject this conversation shape: count nothing rather than fail
            return 0
        return max(0, len(tok(text, add_special_tokens=False)["input_ids"]) - 2)


def _forward(arch: Arch, width: int) -> float:
    return forward_flops(arch.matmul, arch.layers, arch.d_model, width)
