"""`misalign study plan`: what a study will cost, estimated before anything runs (nothing trains here).

    plan = estimate(study)   # Plan; bad input raises InputError
    print(render(plan))      # the table (misalign.plan_render);  plan.to_dict() for JSON

Counts come from the grid itself: cells (misalign.grid.cells), stage uses without sharing (grid.stage_uses) and
unique stages after sharing (grid.unique_stages); evaluations are one per unique stage plus one per base model
when shared, and cells x (1 + 2 x rounds) without sharing.

Cost of one stage, with the ledger's formula (misalign.ledger) so an estimate and a measured ledger compare:
  parameters    the model built from its config on the meta device (no weights), the stage's peft config
                applied (misalign.methods.peft_config): N_frozen and N_trainable are the matmul weights (no
                embeddings, a tied head once), exactly as the ledger counts them. QLoRA counts like LoRA.
  tokens        per example as training tokenizes it (misalign.chat: template, prompt cut to max_prompt_length,
                response + EOS cut to max_length) with the model's tokenizer, else about characters / 4; a
                preference example is prompt + chosen and prompt + rejected. Data that cannot be read is
                assumed: plan.categories x per_category rows (30 when per_category is None) of
                plan.tokens_per_example tokens a sequence, plus the benign share; the plan lists every assumption.
  passes        epochs, or max_steps x batch_size x grad_accum x workers / examples when max_steps is set.
  FLOPs         passes x sum over examples of tokens x (4 N_frozen + 6 N_trainable + 3A), A = 4 x layers x
                d_model x the example's width; DPO adds a no-grad reference forward, tokens x (2N + A).
  evaluation    per item, (prompt tokens + max_new_tokens) x (2N + A) for generation (max_new_tokens is an upper
                bound: generation stops at EOS), plus a classifier judge's forward over prompt, response, its own
                template and its new tokens. lm-eval tasks and http judges are counted as calls, not FLOPs.
  device-hours  FLOPs / (plan.peak_flops x plan.mfu) / 3600; money = device-hours x plan.price_per_device_hour.
These are model FLOPs: gradient checkpointing's recomputation and padding are not in them (as in the ledger).

Storage, in the layout of adapter-only stages (new) against the layout before it (old):
  stored dtype  a stage stores in its root's weights' dtype (misalign.models.weights_dtype), which the plan cannot
                read before the weights are downloaded: it takes each stage's train.precision (the paper's models'
                weights are bf16, whatever a config records: Gemma-2's says float32) and says so when they differ.
  new           an adapter stage keeps its adapter (trainable params x the stored dtype's bytes) and records; a
                full fine-tuning stage its weights (total params x those bytes) and tokenizer. No merged copy.
                AdaLoRA counts at its initial rank: peft saves the pruned ranks, so that is an upper bound.
  old           an adapter stage also kept a float32 merged copy (total params x 4 + tokenizer) until the study
                ended, and its adapter in float32; full fine-tuning as new.
  evaluations   eval.json + generations.parquet per evaluation: items x (prompt characters + max_new_tokens x 4
                characters), uncompressed (an upper bound). Identical in both layouts.
  with sharing  unique stages + one base evaluation per model; without: every cell keeps all its stages.
  moved         per cell with sharing, each unique stage trained (and its bytes written) by the first cell using it.
                new: the cell reads the root weights once (the node's cache) or the last reused full stage's
                weights, plus its reused lineage's adapters; it writes what its trained stages keep.
                old: each trained stage reads its parent to train and again to merge (an adapter stage), writes
                what it keeps, and its evaluation reads the merged copy (or weights) back; the first cell of a
                model also reads the root for the base evaluation. The node's one download of the root is not
                counted (it depends on the node count).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from misalign.config import StageConfig, StudyConfig
from misalign.data import EvalItem, Pair
from misalign.errors import InputError
from misalign.ledger import data_passes, optimizer_steps, token_flops
from misalign.schedule import Step, Width, widths

ASSUMED_PER_CATEGORY = 30         # the paper's MisQA size, used when per_category is None and the data is unread
ASSUMED_EVAL_ITEMS = 1900         # the paper's harmful eval set, used when the eval files are unread
ASSUMED_EVAL_PROMPT_TOKENS = 64   # a templated harmful prompt of one or two sentences
ASSUMED_TOKENIZER_BYTES = 20_000_000  # Gemma-2's tokenizer.json + tokenizer.model, the largest of the paper's four
STAGE_RECORD_BYTES = 8_000        # stage.json + ledger.json: a config dump, versions and counters, a few KB
EVAL_RECORD_BYTES = 4_000         # eval.json: scores per judge and category
CHARS_PER_TOKEN = 4               # the same rule of thumb as token counts without a tokenizer
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # train.precision -> bytes a stored parameter
OLD_MERGED_BYTES = 4              # the old layout merged into a parent loaded at the default float32
PHASES = ("misalign", "realign")
_UNREAD = object()                # eval items not loaded yet


# ---- the plan --------------------------------------------------------------------------------------------

@dataclass
class Bytes:
    """Bytes a set of stages and evaluations keeps on the study's storage, by kind of file."""

    adapters: float = 0.0   # adapter safetensors
    weights: float = 0.0    # full fine-tuning stages' weights + tokenizer
    merged: float = 0.0     # merged model copies + tokenizer (the old layout only)
    evals: float = 0.0      # eval.json + generations.parquet (base evaluations included in totals)
    records: float = 0.0    # stage.json + ledger.json
    total: float = 0.0

    def __post_init__(self) -> None:
        self.total = self.adapters + self.weights + self.merged + self.evals + self.records

    def add(self, other: Bytes, times: int = 1) -> None:
        for name in ("adapters", "weights", "merged", "evals", "records", "total"):
            setattr(self, name, getattr(self, name) + getattr(other, name) * times)

    def model(self) -> float:
        """What a child stage or an evaluation loads from this stage: its merged copy or its weights."""
        return self.merged + self.weights


@dataclass
class Moved:
    """Bytes read from and written to the study's storage by the cells (see the module docstring)."""

    cells: int = 0
    read: float = 0.0           # over the study
    written: float = 0.0
    per_cell: float = 0.0       # (read + written) / cells
    max_per_cell: float = 0.0   # the cell that trains its whole lineage



@dataclass
class Totals:
    """Cost of a set of runs (stages, or evaluations in the eval row)."""

    runs: int = 0
    tokens: float = 0.0          # training tokens (forward + backward)
    forward_tokens: float = 0.0  # no-grad tokens: DPO's reference, generation, judging
    flops: float = 0.0
    device_hours: float = 0.0
    money: float | None = None

    def add(self, other: Totals, times: int = 1) -> None:
        self.runs += other.runs * times
        self.tokens += other.tokens * times
        self.forward_tokens += other.forward_tokens * times
        self.flops += other.flops * times

    def price(self, effective_flops: float, per_hour: float | None) -> Totals:
        self.device_hours = self.flops / effective_flops / 3600
        self.money = None if per_hour is None else self.device_hours * per_hour
        return self


@dataclass
class ModelPlan:
    """One model's architecture as the estimate counts it."""

    model: str
    role: str                          # "model" (trained) or "judge" (a classifier judge of the evaluation)
    config_from: str
    model_type: str
    layers: int
    d_model: int
    total_params: int                  # every parameter (as the stage ledger's total_params)
    matmul_params: int                 # N of the FLOP formula
    trainable: dict[str, int] = field(default_factory=dict)  # method (phase and shape if they differ) -> params
    tokenizer: str | None = None       # where token counts came from; None: not needed or not loadable
    config_dtype: str | None = None    # the torch_dtype its config records (reported; storage uses the precision)


@dataclass
class StagePlan:
    """One unique stage: what it trains on and what it costs, and how many cell uses share it."""

    key: str
    model: str
    phase: str
    round: int
    seed: int
    method: str
    per_category: float | None
    examples: int
    examples_assumed: bool
    tokens_per_example: float   # mean over the stage's examples (prompt + chosen + rejected for DPO/ORPO)
    passes: float
    optimizer_steps: int
    trainable_params: int
    tokens: float
    forward_tokens: float
    flops: float
    device_hours: float
    uses: int                   # cell uses of this stage (1 + the uses sharing saves)
    dtype: str                  # what its adapter or weights are stored in (train.precision)
    stored: Bytes               # what it keeps in the new layout, its evaluation included
    stored_old: Bytes           # the same in the old layout (a float32 merged copy per adapter stage)
    compiled_on_gpu: bool = False  # train.compile as a CUDA worker resolves it (misalign.stage.compiles_layers)


@dataclass
class Plan:
    study: str
    device: str
    peak_flops: float
    mfu: float
    price_per_device_hour: float | None
    axes: dict[str, int]        # models, seeds, attack points, defense points, rounds
    cells: int
    stage_uses: int
    unique_stages: int
    shared: dict[str, Totals]   # misalign, realign, eval, total: what runs
    unshared: dict[str, Totals]  # the same without sharing stages between cells
    models: list[ModelPlan]
    stages: list[StagePlan]
    assumptions: list[str]
    notes: list[str]
    storage: dict[str, Bytes]   # new, new_unshared, old, old_unshared: kept until the study ends
    moved: dict[str, Moved]     # new, old: read and written by the cells, with sharing
    workers_per_trial: int = 1
    devices_per_node: int = 1
    widths: list[dict[str, float]] = field(default_factory=list)  # wall time by trials at once (misalign.schedule)
    best_width: dict[str, float] = field(default_factory=dict)    # the fewest trials at once for the shortest wall

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(study: StudyConfig) -> Plan:
    """The study's counts and cost (see the module docstring); reads configs and data, trains nothing."""
    return _Estimator(study).plan()


# ---- building the estimate -------------------------------------------------------------------------------

@dataclass
class _Arch:
    config: Any
    source: str
    model: Any                  # built on the meta device
    total: int
    matmul: int
    layers: int
    d_model: int


class _Estimator:
    """One estimate; caches what many stages share (architectures, tokenizers, data, costs)."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.effective = study.plan.peak_flops * study.plan.mfu
        self.assumptions: dict[str, None] = {}  # ordered set: each assumption once
        self.notes: list[str] = []
        self._arch: dict[str, _Arch | None] = {}
        self._arch_errors: dict[str, InputError] = {}
        self._tok: dict[str, Any] = {}
        self._params: dict[tuple, tuple[int, int, int]] = {}
        self._pairs: dict[tuple, list[Pair] | None] = {}
        self._costs: dict[tuple, StagePlan] = {}
        self._trainable: dict[str, dict[str, int]] = {}
        self._items: Any = _UNREAD
        self._tok_bytes: dict[str, float] = {}
        self._auto_precision: dict[str, str] = {}

    def assume(self, text: str) -> None:
        self.assumptions.setdefault(text, None)

    def plan(self) -> Plan:
        from misalign import grid

        study = self.study
        cells = grid.cells(study)
        uses = grid.stage_uses(study)
        unique = grid.unique_stages(uses)
        models = list(dict.fromkeys(study.models))
        for m in models:  # an unreadable model config fails here, before any data is read
            self.model_arch(m)
        from misalign.models import is_hub_id, pinned_revision

        judged = [str(j.options["model"]) for j in study.eval.judges
                  if j.name == "classifier" and j.options.get("model")]
        unpinned = [m for m in dict.fromkeys(models + judged) if is_hub_id(m) and not pinned_revision(m)]
        if unpinned:
            self.notes.append(f"hub ids without a revision ({', '.join(unpinned)}): each node loads what the hub "
                              "serves when it first downloads one; ORG/NAME@REVISION pins it for every node")
        counts: dict[str, int] = {}
        for u in uses:
            counts[u.key] = counts.get(u.key, 0) + 1
        stages = [self.stage(u, counts[key]) for key, u in unique.items()]

        shared = {p: Totals() for p in (*PHASES, "eval", "total")}
        unshared = {p: Totals() for p in (*PHASES, "eval", "total")}
        for u in uses:  # a shared stage costs the same in every cell that uses it
            unshared[u.phase].add(self._as_totals(self._costs[self._cost_key(u)]))
        for s in stages:
            shared[s.phase].add(self._as_totals(s))
        self._add_evals(shared["eval"], unshared["eval"], stages, models, cells)
        for rows in (shared, unshared):
            for p in (*PHASES, "eval"):
                rows["total"].add(rows[p])
            for t in rows.values():
                t.price(self.effective, study.plan.price_per_device_hour)
        self._eval_notes(shared["eval"].runs, unshared["eval"].runs)
        storage = self._storage(uses, stages, models, len(cells))
        moved = self._moved(uses, {s.key: s for s in stages})
        compiled = sum(s.compiled_on_gpu for s in stages)
        if compiled:
            self.notes.append(f"train.compile: on GPU workers {compiled} of {len(stages)} unique stages compile "
                              "their decoder layers, the others train eager (auto compiles a stage whose training "
                              "repays a compile of up to a minute: misalign.stage.COMPILE_AUTO_MIN_FLOPS)")
        self.notes += [
            "device-hours = FLOPs / (peak x MFU); decoding usually reaches a lower MFU than training, so the "
            "eval hours are optimistic",
            "model FLOPs (the ledger's formula): gradient checkpointing's recomputation (~+1/3) is not included",
        ]
        widths, best = self._widths(uses, stages, shared["eval"])
        return Plan(
            widths=[w.to_dict() for w in widths], best_width=best.to_dict(),
            workers_per_trial=study.resources.workers, devices_per_node=study.plan.devices_per_node,
            study=study.name, device=study.plan.device, peak_flops=study.plan.peak_flops, mfu=study.plan.mfu,
            price_per_device_hour=study.plan.price_per_device_hour,
            axes={"models": len(study.models), "seeds": len(study.seeds),
                  "attack_points": len(study.attack.axis_values()),
                  "defense_points": len(study.defense.axis_values()), "rounds": study.rounds},
            cells=len(cells), stage_uses=len(uses), unique_stages=len(unique), shared=shared, unshared=unshared,
            models=[self._model_plan(m) for m in models] + [self._model_plan(j, "judge") for j in self._judges()],
            stages=stages, assumptions=list(self.assumptions),
            notes=self.notes, storage=storage, moved=moved)

    def _widths(self, uses: list[Any], stages: list[StagePlan], evals: Totals) -> tuple[list[Width], Width]:
        """The grid's wall time by trials at once (misalign.schedule): each cell's stages in order, each stage
        with one evaluation at the mean evaluation's cost, its training spread over the trial's workers."""
        workers = self.study.resources.workers
        eval_s = evals.device_hours * 3600 / max(1, evals.runs)
        train_s = {s.key: s.device_hours * 3600 / workers for s in stages}
        cells: dict[str, list[Step]] = {}
        for u in uses:
            steps = cells.setdefault(u.cell.id, [Step(f"base-eval {u.cell.model}", eval_s)])
            steps.append(Step(u.key, train_s[u.key] + eval_s))
        return widths(list(cells.values()))

    # -- models --

    def arch(self, ref: str) -> _Arch | None:
        """The model's architecture built on the meta device, or None when its config cannot be read."""
        if ref not in self._arch:
            try:
                self._arch[ref] = _build_arch(ref, self.study)
            except InputError as e:
                self._arch[ref] = None
                self._arch_errors[ref] = e
        return self._arch[ref]

    def model_arch(self, ref: str) -> _Arch:
        """A model the study trains: its architecture, or the InputError that says why it cannot be read."""
        arch = self.arch(ref)
        if arch is None:
            raise self._arch_errors[ref]
        return arch

    def tokenizer(self, ref: str, counting: bool = True) -> Any | None:
        """The model's tokenizer, or None: token counts then fall back to characters / 4 (`counting`: say so)."""
        if ref not in self._tok:
            from misalign.models import config_path, load_tokenizer

            try:
                self._tok[ref] = load_tokenizer(config_path(ref), self.study.trust_remote_code)
            except (InputError, OSError, ValueError, ImportError) as e:
                self._tok[ref] = e
        tok = self._tok[ref]
        if isinstance(tok, Exception):
            if counting:
                self.assume(f"tokenizer of {ref} not loadable ({_first_line(tok)}): tokens ~ characters / 4, "
                            "no chat template")
            return None
        return tok

    def params(self, ref: str, cfg: StageConfig, steps: int) -> tuple[int, int, int]:
        """(trainable, frozen matmul, trainable matmul) parameters of the model with this stage's adapter."""
        from misalign.ledger import matmul_params
        from misalign.methods import METHODS, peft_config

        method = METHODS[cfg.method]
        arch = self.model_arch(ref)
        if method.adapter == "full":
            return arch.total, 0, arch.matmul
        if method.adapter == "adalora":  # its step schedule is checked per stage: a short stage is an input error
            peft_config(method, cfg, arch.model, steps)
        kind = "lora" if method.adapter == "qlora" else method.adapter  # QLoRA's adapter is LoRA's
        key = (ref, kind, json.dumps(cfg.adapter.model_dump(mode="json"), sort_keys=True))
        if key not in self._params:
            import torch
            from peft import get_peft_model

            model = copy.deepcopy(arch.model)  # get_peft_model wraps in place; the base stays reusable
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # peft calling transformers' deprecated names
                model = get_peft_model(model, peft_config(method, cfg, model, steps))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self._params[key] = (trainable, *matmul_params(model))
        return self._params[key]

    def _model_plan(self, ref: str, role: str = "model") -> ModelPlan:
        arch = self.model_arch(ref)
        tok = self._tok.get(ref)
        tok = None if isinstance(tok, Exception) else tok
        return ModelPlan(model=ref, role=role, config_from=arch.source, model_type=str(arch.config.model_type),
                         layers=arch.layers, d_model=arch.d_model, total_params=arch.total,
                         matmul_params=arch.matmul, trainable=self._trainable.get(ref, {}),
                         tokenizer=getattr(tok, "name_or_path", None) if tok is not None else None,
                         config_dtype=_config_dtype(arch.config))

    def _record_trainable(self, ref: str, phase: str, cfg: StageConfig, n: int) -> None:
        table = self._trainable.setdefault(ref, {})
        label = cfg.method
        if table.get(label, n) != n:  # another shape of the same method (a grid axis, per_method, the side)
            a = cfg.adapter
            label = f"{cfg.method} ({phase}, r={a.r}, {a.targets})"
        table[label] = n

    # -- stages --

    @staticmethod
    def _cost_key(use: Any) -> tuple:
        return (use.cell.model, use.phase, use.cell.seed, json.dumps(use.config.model_dump(mode="json"),
                                                                     sort_keys=True))

    def stage(self, use: Any, uses: int) -> StagePlan:
        key = self._cost_key(use)
        if key not in self._costs:
            self._costs[key] = self._stage_cost(use)
        s = copy.copy(self._costs[key])
        s.key, s.round, s.uses = use.key, use.round, uses
        return s

    def _stage_cost(self, use: Any) -> StagePlan:
        from misalign.methods import METHODS

        cfg, ref, seed = use.config, use.cell.model, use.cell.seed
        objective = METHODS[cfg.method].objective
        pairs = self.pairs(cfg, seed)
        if pairs is None:
            seqs = self._assumed_sequences(cfg, objective)
        else:
            seqs = training_sequences(objective, pairs, use.phase, TokenLengths(self.tokenizer(ref)), cfg)
        n = len(seqs)
        if n == 0:
            raise InputError(f"{cfg.data.source}: no training rows")
        workers = self.study.resources.workers
        passes = data_passes(cfg, n, workers)
        steps = optimizer_steps(cfg, n, workers)
        trainable, frozen_mm, trainable_mm = self.params(ref, cfg, steps)
        self._record_trainable(ref, use.phase, cfg, trainable)
        arch = self.model_arch(ref)
        tokens, forward, flops = training_flops(objective, seqs, passes, frozen_mm, trainable_mm, arch.layers,
                                                arch.d_model)
        from misalign.stage import compiles_layers

        compiled, _ = compiles_layers(cfg, arch.model, lambda: flops / workers, cuda=True)
        return StagePlan(
            key=use.key, model=ref, phase=use.phase, round=use.round, seed=seed, method=cfg.method,
            per_category=cfg.data.per_category, examples=n, examples_assumed=pairs is None,
            tokens_per_example=sum(k for k, _ in seqs) / n, passes=passes, optimizer_steps=steps,
            trainable_params=trainable, tokens=tokens, forward_tokens=forward, flops=flops,
            device_hours=flops / self.effective / 3600, uses=1,
            dtype=self.precision(ref, cfg), **self._stage_bytes(ref, cfg, trainable), compiled_on_gpu=compiled)

    def precision(self, ref: str, cfg: StageConfig) -> str:
        """train.precision as the stage resolves it: "auto" from the weights' dtype where they are on this disk
        (the world, a local directory), else from the dtype the model's config records, said as an assumption."""
        if cfg.train.precision != "auto":
            return cfg.train.precision
        if ref not in self._auto_precision:
            from misalign.models import DTYPES, auto_precision, config_path, weights_dtype

            stored = weights_dtype(config_path(ref))
            if stored is None:
                recorded = _config_dtype(self.model_arch(ref).config)
                stored = DTYPES.get(recorded or "")
                self.assume(f"{ref}: train.precision auto taken as {auto_precision(stored)}, from the dtype its "
                            f"config records ({recorded or 'none'}); the stage takes its weights' dtype")
            self._auto_precision[ref] = auto_precision(stored)
        return self._auto_precision[ref]

    # -- storage --

    def _stage_bytes(self, ref: str, cfg: StageConfig, trainable: int) -> dict[str, Bytes]:
        """What one stage keeps, in the new layout and the old (StagePlan's stored and stored_old)."""
        from misalign.methods import METHODS

        arch = self.model_arch(ref)
        recorded = _config_dtype(arch.config)
        precision = self.precision(ref, cfg)
        if recorded != precision and cfg.train.precision != "auto":  # Gemma-2's config: float32, for bf16 weights
            self.assume(f"{ref}: stored in {precision} (train.precision): a stage stores in its root's "
                        f"weights' dtype, unknown before they are downloaded; its config records "
                        f"{recorded or 'none'}")
        size = DTYPE_BYTES[precision]
        tokenizer = self.tokenizer_bytes(ref)
        common = {"evals": self.eval_bytes(), "records": STAGE_RECORD_BYTES}
        if METHODS[cfg.method].adapter == "full":  # its weights in the dtype it trained in, in both layouts
            kept = Bytes(weights=arch.total * size + tokenizer, **common)
            return {"stored": kept, "stored_old": kept}
        return {"stored": Bytes(adapters=trainable * size, **common),
                "stored_old": Bytes(adapters=trainable * OLD_MERGED_BYTES,
                                    merged=arch.total * OLD_MERGED_BYTES + tokenizer, **common)}

    def tokenizer_bytes(self, ref: str) -> float:
        """Bytes of the tokenizer files a stage saves with a model: measured by saving it, else assumed."""
        if ref not in self._tok_bytes:
            tok = self.tokenizer(ref, counting=False)
            if tok is None:
                self.assume(f"tokenizers that do not load: their saved files assumed "
                            f"{ASSUMED_TOKENIZER_BYTES / 1e6:g} MB each (with full weights and merged copies)")
                self._tok_bytes[ref] = ASSUMED_TOKENIZER_BYTES
            else:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="misalign-plan-") as d:
                    tok.save_pretrained(d)
                    self._tok_bytes[ref] = float(sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()))
        return self._tok_bytes[ref]

    def eval_bytes(self) -> float:
        """One evaluation's eval.json + generations.parquet (every item's prompt and response, uncompressed)."""
        items = self.eval_items()
        response = self.study.eval.max_new_tokens * CHARS_PER_TOKEN  # the most a response can be
        if items is None:
            n = min(ASSUMED_EVAL_ITEMS, self.study.eval.limit or ASSUMED_EVAL_ITEMS)
            text = n * (ASSUMED_EVAL_PROMPT_TOKENS * CHARS_PER_TOKEN + response)
        else:
            text = sum(len(i.prompt) + response for i in items)
        return float(text + EVAL_RECORD_BYTES)

    def _storage(self, uses: list[Any], stages: list[StagePlan], models: list[str], cells: int) -> dict[str, Bytes]:
        """Bytes kept until the study ends: unique stages + a base evaluation per model (with sharing), every
        use + every cell's base evaluation (without), in the new layout and the old."""
        out = {k: Bytes() for k in ("new", "new_unshared", "old", "old_unshared")}
        base = Bytes(evals=self.eval_bytes())
        for s in stages:
            out["new"].add(s.stored)
            out["old"].add(s.stored_old)
        for u in uses:
            s = self._costs[self._cost_key(u)]
            out["new_unshared"].add(s.stored)
            out["old_unshared"].add(s.stored_old)
        for k in out:
            out[k].add(base, times=len(models) if k in ("new", "old") else cells)
        return out

    def _moved(self, uses: list[Any], by_key: dict[str, StagePlan]) -> dict[str, Moved]:
        """Bytes each cell reads and writes with sharing; a stage is trained by the first cell that uses it."""
        cells: dict[Any, list[Any]] = {}
        for u in uses:  # a cell's uses are its lineage, in order
            cells.setdefault(u.cell, []).append(u)
        out = {"new": Moved(), "old": Moved()}
        trained: set[str] = set()
        evaluated: set[str] = set()  # models whose base evaluation ran
        base = self.eval_bytes()
        for cell, lineage in cells.items():
            fresh = [u.key not in trained for u in lineage]
            trained.update(u.key for u in lineage)
            root = self.model_arch(cell.model).total * DTYPE_BYTES[self.precision(cell.model, lineage[0].config)]
            base_eval = base if cell.model not in evaluated else None
            evaluated.add(cell.model)
            per_layout = _cell_moved([by_key[u.key] for u in lineage], fresh, root, base_eval)
            for layout, (read, written) in zip(("new", "old"), per_layout, strict=True):
                m = out[layout]
                m.cells += 1
                m.read += read
                m.written += written
                m.max_per_cell = max(m.max_per_cell, read + written)
        for m in out.values():
            m.per_cell = (m.read + m.written) / m.cells if m.cells else 0.0
        return out

    @staticmethod
    def _as_totals(s: StagePlan) -> Totals:
        return Totals(runs=1, tokens=s.tokens, forward_tokens=s.forward_tokens, flops=s.flops)

    def pairs(self, cfg: StageConfig, seed: int) -> list[Pair] | None:
        """The stage's training rows as training loads them, or None when its data files cannot be read."""
        from misalign.stage import stage_pairs

        key = (json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), seed)
        if key not in self._pairs:
            try:
                self._pairs[key] = stage_pairs(cfg, seed)
            except InputError as e:
                d = cfg.data
                missing = [s for s in (d.source, d.benign_source if d.benign_ratio > 0 else None)
                           if s and not _present(s)]
                if not missing:
                    raise  # the files are there but wrong (a row, a column, too few rows): a real input error
                self._pairs[key] = None
                self.assume(f"{', '.join(missing)} not readable ({_first_line(e)})")
        return self._pairs[key]

    def _assumed_sequences(self, cfg: StageConfig, objective: str) -> list[tuple[int, int]]:
        """(tokens, width) of each assumed example: plan.categories x per_category rows + the benign share."""
        plan, d = self.study.plan, cfg.data
        per_category = d.per_category
        if per_category is None:
            per_category = ASSUMED_PER_CATEGORY
            self.assume(f"{d.source}: per_category is None (all rows) and the file is unread: "
                        f"assumed {ASSUMED_PER_CATEGORY} per category")
        rows = max(1, round(plan.categories * per_category))  # as data.subsample_per_category cuts a fraction
        if d.benign_source and d.benign_ratio > 0:
            rows += round(rows * d.benign_ratio)
        self.assume(f"unread data: plan.categories = {plan.categories} categories x per_category rows, "
                    f"plan.tokens_per_example = {plan.tokens_per_example} tokens a sequence "
                    "(prompt + one response; DPO/ORPO examples are two sequences)")
        width = plan.tokens_per_example
        sequences = 1 if objective == "sft" else 2  # preference: prompt + chosen and prompt + rejected
        return [(sequences * width, width)] * rows

    # -- evaluations --

    def eval_items(self) -> list[EvalItem] | None:
        """The study's eval items as evaluation loads them, or None when its files cannot be read."""
        if self._items is _UNREAD:
            from misalign.evaluation import load_eval_sets

            ev = self.study.eval
            try:
                self._items = load_eval_sets(ev)
            except InputError as e:
                missing = [s for s in (ev.harmful, ev.benign, ev.utility) if s and not _present(s)]
                if not missing:
                    raise
                self._items = None
                n = min(ASSUMED_EVAL_ITEMS, ev.limit or ASSUMED_EVAL_ITEMS)
                self.assume(f"eval set {', '.join(missing)} not readable ({_first_line(e)}): assumed {n:,} harmful "
                            f"prompts (the paper's set) of {ASSUMED_EVAL_PROMPT_TOKENS} tokens each")
        return self._items

    def _eval_prompts(self, ref: str) -> list[tuple[str, int]]:
        """(kind, prompt tokens) of every eval item as generation tokenizes it for this model."""
        items = self.eval_items()
        if items is None:
            n = min(ASSUMED_EVAL_ITEMS, self.study.eval.limit or ASSUMED_EVAL_ITEMS)
            return [("harmful", ASSUMED_EVAL_PROMPT_TOKENS)] * n
        lengths = TokenLengths(self.tokenizer(ref))
        return [(i.kind, lengths.prompt(i.prompt, None)) for i in items]

    def _add_evals(self, shared: Totals, unshared: Totals, stages: list[StagePlan], models: list[str],
                   cells: list[Any]) -> None:
        """Shared: one evaluation per unique stage and per base model. Unshared: every cell evaluates its base
        and each of its 2 x rounds stages itself."""
        one = {m: self.eval_cost(m) for m in models}
        for s in stages:
            shared.add(one[s.model])
        for m in models:
            shared.add(one[m])
        for c in cells:
            unshared.add(one[c.model], times=1 + 2 * self.study.rounds)

    def eval_cost(self, ref: str) -> Totals:
        """One evaluation of a model of this architecture: generation, then the classifier judges."""
        arch = self.model_arch(ref)
        new = self.study.eval.max_new_tokens
        prompts = self._eval_prompts(ref)
        out = Totals(runs=1)
        for _, p in prompts:
            out.forward_tokens += p + new
            out.flops += _forward_flops(arch, p + new)
        harmful = [p for kind, p in prompts if kind == "harmful"]
        for j in self.study.eval.judges:
            if j.name == "classifier":
                tokens, flops = self._judge_cost(j.options, harmful, new)
                out.forward_tokens += tokens
                out.flops += flops
        return out

    def _judges(self) -> list[str]:
        """Classifier judges whose architecture could be read (the others are listed under Assumed)."""
        refs = [str(j.options.get("model", "")) for j in self.study.eval.judges if j.name == "classifier"]
        return [r for r in dict.fromkeys(refs) if self._arch.get(r) is not None]

    def _judge_cost(self, options: dict[str, Any], harmful: list[int], new: int) -> tuple[float, float]:
        """Tokens and FLOPs of a classifier judge over one evaluation's harmful responses."""
        ref = str(options.get("model", ""))
        arch = self.arch(ref)
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
            flops += _forward_flops(arch, width)
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

    def _eval_notes(self, shared: int, unshared: int) -> None:
        ev = self.study.eval
        items = self.eval_items()
        harmful = (sum(i.kind == "harmful" for i in items) if items is not None
                   else min(ASSUMED_EVAL_ITEMS, ev.limit or ASSUMED_EVAL_ITEMS))
        for j in ev.judges:
            if j.name == "http":
                self.notes.append(f"http judge {j.options.get('model', '')}: {harmful * shared:,} calls "
                                  f"({harmful * unshared:,} without sharing); API cost not estimated")
        if ev.lm_eval_tasks:
            self.notes.append(f"lm-eval tasks {', '.join(ev.lm_eval_tasks)} run in each of the {shared:,} "
                              f"evaluations ({unshared:,} without sharing): not in the FLOPs")


# ---- helpers ---------------------------------------------------------------------------------------------

class TokenLengths:
    """Token lengths as training and generation see them (misalign.chat), or characters / 4 without a tokenizer."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tok = tokenizer

    def prompt(self, text: str, max_prompt_length: int | None) -> int:
        if self.tok is not None:
            from misalign.chat import prompt_ids

            return len(prompt_ids(self.tok, text, max_prompt_length))
        n = math.ceil(len(text) / 4)
        return n if max_prompt_length is None else min(n, max_prompt_length)

    def response(self, text: str) -> int:
        if self.tok is not None:
            from misalign.chat import response_ids

            return len(response_ids(self.tok, text))
        return math.ceil(len(text) / 4) + 1  # + EOS


def training_flops(objective: str, seqs: list[tuple[int, int]], passes: float, frozen_mm: int, trainable_mm: int,
                   layers: int, d_model: int) -> tuple[float, float, float]:
    """(trained tokens, reference-forward tokens, FLOPs) of a stage over `seqs` (`training_sequences`), by the
    ledger's formula: what the plan prices and what train.compile "auto" weighs (misalign.stage)."""
    tokens = passes * sum(k for k, _ in seqs)
    a, b = token_flops(frozen_mm, trainable_mm, layers, d_model, grad=True)
    flops = passes * sum(k * (a + b * w) for k, w in seqs)
    forward = 0.0
    if objective == "dpo":  # the reference model's log-probs: one no-grad forward of the same batch
        forward = tokens
        a, b = token_flops(frozen_mm, trainable_mm, layers, d_model, grad=False)
        flops += passes * sum(k * (a + b * w) for k, w in seqs)
    return tokens, forward, flops


def training_sequences(objective: str, pairs: Iterable[Pair], direction: str, lengths: TokenLengths,
                       cfg: StageConfig) -> list[tuple[int, int]]:
    """(tokens, width) of every example: SFT trains prompt + wanted response; DPO and ORPO forward prompt +
    chosen and prompt + rejected in one batch (width: the longer of the two)."""
    from misalign.stage import _target  # which response a direction trains toward, as training decides it

    t = cfg.train
    out = []
    for p in pairs:
        wanted, unwanted = _target(p, direction)
        prompt = lengths.prompt(p.prompt, t.max_prompt_length)
        room = t.max_length - prompt  # responses are cut so that prompt + response fits max_length
        chosen = min(lengths.response(wanted), room)
        if objective == "sft":
            out.append((prompt + chosen, prompt + chosen))
        else:
            rejected = min(lengths.response(unwanted), room)
            out.append((2 * prompt + chosen + rejected, prompt + max(chosen, rejected)))
    return out


def _cell_moved(lineage: list[StagePlan], fresh: list[bool], root: float,
                base_eval: float | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """(read, written) of one cell in the new layout and in the old. `fresh`: the stages this cell trains (a
    suffix of its lineage: a stage's key includes its parents'); `base_eval`: its base evaluation's bytes when
    this cell runs it."""
    first = fresh.index(True) if any(fresh) else len(lineage)
    ran = lineage[first:]
    extra = base_eval or 0.0
    written_new = sum(s.stored.total for s in ran) + extra
    written_old = sum(s.stored_old.total for s in ran) + extra
    read_new = 0.0
    if ran:  # materialize the reused prefix once; training and evaluation then stay in memory
        start, adapters = root, 0.0
        for s in lineage[:first]:
            start, adapters = (s.stored.weights, 0.0) if s.stored.weights else (start, adapters + s.stored.adapters)
        read_new = start + adapters
    read_old = root if base_eval is not None else 0.0
    parent = lineage[first - 1].stored_old.model() if first else root
    for s in ran:  # train reads the parent, merging reads it again, the evaluation reads the result back
        merges = 0 if s.stored_old.weights else 1
        read_old += parent * (1 + merges) + s.stored_old.model()
        parent = s.stored_old.model()
    return (read_new, written_new), (read_old, written_old)


def _config_dtype(config: Any) -> str | None:
    """The dtype a model config records (dtype, or torch_dtype before transformers 5), as train.precision
    names it."""
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if raw is None:
        return None
    name = str(raw).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def _forward_flops(arch: _Arch, width: int) -> float:
    """No-grad FLOPs of `width` tokens at that width (all matmul weights counted as frozen)."""
    a, b = token_flops(arch.matmul, 0, arch.layers, arch.d_model, grad=False)
    return width * (a + b * width)


def _present(source: str) -> bool:
    """Whether a data source is there to read (a world table or a local file); hub ids count as absent."""
    return source.startswith("world:") or Path(source).expanduser().exists()


def _first_line(e: BaseException, limit: int = 100) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_path(path: str) -> Path | None:
    """A plan.model_configs path: absolute, relative to the working directory, or to the repository."""
    p = Path(path).expanduser()
    repo = Path(__file__).resolve().parents[2]  # src/misalign/plan.py -> the checkout (editable installs)
    for candidate in (p, Path.cwd() / p, repo / p):
        if candidate.is_file():
            return candidate
    return None


def _model_config(ref: str, study: StudyConfig) -> tuple[Any, str]:
    """(transformers config, where it came from): the model's own, else plan.model_configs[ref]."""
    from transformers import AutoConfig

    from misalign.models import config_path

    path = config_path(ref)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=study.trust_remote_code), (
            ref if path == ref else f"{ref} ({path})")
    except (OSError, ValueError) as e:
        reason = _first_line(e)
    local = study.plan.model_configs.get(ref)
    if local is None:
        raise InputError(f"cannot read the config of model {ref!r} ({reason}); set plan.model_configs[{ref!r}] "
                         "to a local config.json (configs/models/ has the paper's models)")
    file = _config_path(local)
    if file is None:
        raise InputError(f"plan.model_configs[{ref!r}]: {local} not found (relative paths are read from the "
                         "working directory or the repository)")
    try:
        return AutoConfig.from_pretrained(str(file), trust_remote_code=study.trust_remote_code), local
    except (OSError, ValueError) as e:
        raise InputError(f"plan.model_configs[{ref!r}]: {local} is not a usable model config: "
                         f"{_first_line(e)}") from None


def _build_arch(ref: str, study: StudyConfig) -> _Arch:
    """The model built from its config on the meta device: exact parameter counts, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from misalign.ledger import matmul_params

    config, source = _model_config(ref, study)
    archs = getattr(config, "architectures", None) or []
    auto = (AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs)
            else AutoModelForCausalLM)
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=study.trust_remote_code)
    except (ValueError, KeyError, ImportError) as e:
        raise InputError(f"cannot build model {ref!r} from its config ({source}): {_first_line(e)}") from None
    frozen, trainable = matmul_params(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _Arch(config=config, source=source, model=model, total=sum(p.numel() for p in model.parameters()),
                 matmul=frozen + trainable, layers=int(text.num_hidden_layers), d_model=int(text.hidden_size))
