"""`misalign study plan`: what a study will cost, estimated before anything runs (nothing trains here).

    plan = estimate(study)   # Plan; bad input raises InputError
    print(render(plan))      # the table (misalign.plan_render);  plan.to_dict() for JSON

The estimate adds up four parts, each in its own module:
  misalign.meta          every model built from its config on the meta device (no weights), with each stage's
                         peft config applied (misalign.methods.peft_config): N_frozen and N_trainable are the
                         matmul weights (no embeddings, a tied head once), exactly as the ledger counts them.
                         QLoRA counts like LoRA.
  misalign.costs         the formulas: tokens, FLOPs, optimizer steps, passes, as the stage's ledger counts them.
  misalign.plan_eval     one evaluation's cost per model, and its files.
  misalign.plan_storage  the bytes the study keeps and the bytes its cells move.
This module reads the study's data and tokenizers once, prices each unique stage, and adds up.

Counts come from the grid itself: cells (misalign.grid.cells), stage uses without sharing (grid.stage_uses) and
unique stages after sharing (grid.unique_stages); evaluations are one per unique stage plus one per base model
when shared, and cells x (1 + 2 x rounds) without sharing.

Cost of one stage, with the ledger's formula so an estimate and a measured ledger compare:
  tokens        per example as training tokenizes it (misalign.chat: template, prompt cut to max_prompt_length,
                response + EOS cut to max_length) with the model's tokenizer, else about characters / 4; a
                preference example is prompt + chosen and prompt + rejected. Data that cannot be read is
                assumed: plan.categories x per_category rows (30 when per_category is None) of
                plan.tokens_per_example tokens a sequence, plus the benign share; the plan lists every assumption.
  passes        epochs, or max_steps x batch_size x grad_accum x workers / examples when max_steps is set.
  FLOPs         passes x sum over examples of tokens x (4 N_frozen + 6 N_trainable + 3A), A = 4 x layers x
                d_model x the example's width; DPO adds a no-grad reference forward, tokens x (2N + A).
  device-hours  with plan.calibration, a stage whose shape was measured (misalign.calibration): its worker's wall
                is the row's overhead_s + FLOPs per worker / (plan.peak_flops x the row's MFU), held on
                workers x gpus_per_worker devices; every other stage and the evaluations:
                FLOPs / (plan.peak_flops x plan.mfu) / 3600. money = device-hours x plan.price_per_device_hour.
These are model FLOPs: gradient checkpointing's recomputation and padding are not in them (as in the ledger).
About 520 lines: each kind of stage (trained, repair, assumed data) is priced here, where it meets the
grid; the formulas themselves are misalign.costs'.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from misalign.calibration import PARAMS_RATIO, ROW_RATIO, StageShape, load_table, match
from misalign.config import StageConfig, StudyConfig
from misalign.costs import (
    DTYPE_BYTES,
    ObjectiveShape,
    TokenLengths,
    Totals,
    data_passes,
    optimizer_steps,
    training_flops,
    training_sequences,
)
from misalign.data import Pair, source_present
from misalign.errors import InputError
from misalign.meta import MetaModels, config_dtype, first_line
from misalign.plan_eval import EvalCosts
from misalign.plan_storage import ASSUMED_TOKENIZER_BYTES, Bytes, Moved, cell_moved, kept, stage_bytes
from misalign.recipes import stage_pairs
from misalign.schedule import Step, Width, widths

ASSUMED_PER_CATEGORY = 30         # the paper's MisQA size, used when per_category is None and the data is unread
PHASES = ("misalign", "realign")


# ---- the plan --------------------------------------------------------------------------------------------


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
    stored: Bytes               # what it keeps, its evaluation included (misalign.plan_storage)
    compiled_on_gpu: bool = False  # train.compile as a CUDA worker resolves it (misalign.stage.compiles_layers)
    wall_hours: float = 0.0     # one trial's wall time for it (its workers train at once)
    mfu: float = 0.0            # the MFU it is priced at: a calibration row's (per stage) or plan.mfu
    measured_by: str | None = None  # the calibration row that priced it (its shape and source); None: assumed
    shape: str = ""             # its shape as a calibration row would name it (training stages)

    def totals(self) -> Totals:
        return Totals(runs=1, tokens=self.tokens, forward_tokens=self.forward_tokens, flops=self.flops,
                      device_hours=self.device_hours)


@dataclass
class Plan:
    study: str
    device: str
    peak_flops: float
    mfu: float
    price_per_device_hour: float | None
    calibration: str | None     # plan.calibration: the table stages were priced from, if any
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
    storage: dict[str, Bytes]   # shared, unshared: kept until the study ends (misalign.plan_storage.kept)
    moved: Moved                # read and written by the cells, with sharing
    workers_per_trial: int = 1
    device_share: float = 1.0   # of one device each worker holds (1 / stages per GPU when they share one)
    devices_per_node: int = 1
    widths: list[dict[str, float]] = field(default_factory=list)  # wall time by trials at once (misalign.schedule)
    best_width: dict[str, float] = field(default_factory=dict)    # the fewest trials at once for the shortest wall

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(study: StudyConfig) -> Plan:
    """The study's counts and cost (see the module docstring); reads configs and data, trains nothing."""
    return _Estimator(study).plan()


# ---- adding up ---------------------------------------------------------------------------------------------


class _Estimator:
    """One estimate; caches what many stages share (architectures, tokenizers, data, costs)."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.effective = study.plan.peak_flops * study.plan.mfu
        self.calibration = load_table(study.plan.calibration) if study.plan.calibration else None
        g = study.resources.gpus_per_worker
        self.stages_per_gpu = max(1, math.floor(1 / g + 1e-9)) if 0 < g < 1 else 1
        self.device_share = 1 / self.stages_per_gpu  # of one device, each worker of a trial holds
        self.assumptions: dict[str, None] = {}  # ordered set: each assumption once
        self.notes: list[str] = []
        self.meta = MetaModels(study.trust_remote_code, study.plan.model_configs)
        self.evals = EvalCosts(study.eval, self.meta, self.tokenizer, self.assume)
        self._tok: dict[str, Any] = {}
        self._pairs: dict[tuple, list[Pair] | None] = {}
        self._costs: dict[tuple, StagePlan] = {}
        self._trainable: dict[str, dict[str, int]] = {}
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
            self.meta.model_arch(m)
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
            unshared[u.phase].add(self._costs[self._cost_key(u)].totals())
        for s in stages:
            shared[s.phase].add(s.totals())
        self.evals.add(shared["eval"], unshared["eval"], [s.model for s in stages], models,
                       [c.model for c in cells], study.rounds)
        for rows in (shared, unshared):
            rows["eval"].device_hours = rows["eval"].flops / self.effective / 3600  # evaluations: plan.mfu
            for p in (*PHASES, "eval"):
                rows["total"].add(rows[p])
            for t in rows.values():
                t.price(study.plan.price_per_device_hour)
        self.notes += self.evals.notes(shared["eval"].runs, unshared["eval"].runs)
        storage = kept([s.stored for s in stages], [self._costs[self._cost_key(u)].stored for u in uses],
                       self.evals.bytes(), len(models), len(cells))
        moved = self._moved(uses, {s.key: s for s in stages})
        compiled = sum(s.compiled_on_gpu for s in stages)
        if compiled:
            self.notes.append(f"train.compile: on GPU workers {compiled} of {len(stages)} unique stages compile "
                              "their decoder layers, the others train eager (auto compiles a stage whose training "
                              "repays a compile of up to a minute: misalign.stage.COMPILE_AUTO_MIN_FLOPS)")
        self.notes += self._calibration_notes(stages)
        self.notes += [
            "device-hours = FLOPs / (peak x MFU); decoding usually reaches a lower MFU than training, so the "
            "eval hours are optimistic",
            "model FLOPs (the ledger's formula): gradient checkpointing's recomputation (~+1/3) is not included",
        ]
        widths, best = self._widths(uses, stages, shared["eval"])
        return Plan(
            widths=[w.to_dict() for w in widths], best_width=best.to_dict(),
            workers_per_trial=study.resources.workers, devices_per_node=study.plan.devices_per_node,
            device_share=self.device_share,
            study=study.name, device=study.plan.device, peak_flops=study.plan.peak_flops, mfu=study.plan.mfu,
            price_per_device_hour=study.plan.price_per_device_hour, calibration=study.plan.calibration,
            axes={"models": len(study.models), "seeds": len(study.seeds),
                  "attack_points": len(study.attack.axis_values()),
                  "defense_points": len(study.defense.axis_values()), "rounds": study.rounds},
            cells=len(cells), stage_uses=len(uses), unique_stages=len(unique), shared=shared, unshared=unshared,
            models=[self._model_plan(m) for m in models] + [self._model_plan(j, "judge")
                                                             for j in self.evals.judges()],
            stages=stages, assumptions=list(self.assumptions),
            notes=self.notes, storage=storage, moved=moved)

    def _widths(self, uses: list[Any], stages: list[StagePlan], evals: Totals) -> tuple[list[Width], Width]:
        """The grid's wall time by trials at once (misalign.schedule): each cell's stages in order, each stage
        with one evaluation at the mean evaluation's cost, its training spread over the trial's workers."""
        eval_s = evals.device_hours * 3600 / max(1, evals.runs)
        train_s = {s.key: s.wall_hours * 3600 for s in stages}
        cells: dict[str, list[Step]] = {}
        for u in uses:
            steps = cells.setdefault(u.cell.id, [Step(f"base-eval {u.cell.model}", eval_s)])
            steps.append(Step(u.key, train_s[u.key] + eval_s))
        return widths(list(cells.values()))

    def _moved(self, uses: list[Any], by_key: dict[str, StagePlan]) -> Moved:
        """Bytes each cell reads and writes with sharing; a stage is trained by the first cell that uses it."""
        cells: dict[Any, list[Any]] = {}
        for u in uses:  # a cell's uses are its lineage, in order
            cells.setdefault(u.cell, []).append(u)
        out = Moved()
        trained: set[str] = set()
        evaluated: set[str] = set()  # models whose base evaluation ran
        base = self.evals.bytes()
        for cell, lineage in cells.items():
            fresh = [u.key not in trained for u in lineage]
            trained.update(u.key for u in lineage)
            root = self.meta.model_arch(cell.model).total * DTYPE_BYTES[self.precision(cell.model,
                                                                                       lineage[0].config)]
            base_eval = base if cell.model not in evaluated else None
            evaluated.add(cell.model)
            out.add(*cell_moved([by_key[u.key].stored for u in lineage], fresh, root, base_eval))
        return out

    # -- models --

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
                self.assume(f"tokenizer of {ref} not loadable ({first_line(tok)}): tokens ~ characters / 4, "
                            "no chat template")
            return None
        return tok

    def _model_plan(self, ref: str, role: str = "model") -> ModelPlan:
        arch = self.meta.model_arch(ref)
        tok = self._tok.get(ref)
        tok = None if isinstance(tok, Exception) else tok
        return ModelPlan(model=ref, role=role, config_from=arch.source, model_type=str(arch.config.model_type),
                         layers=arch.layers, d_model=arch.d_model, total_params=arch.total,
                         matmul_params=arch.matmul, trainable=self._trainable.get(ref, {}),
                         tokenizer=getattr(tok, "name_or_path", None) if tok is not None else None,
                         config_dtype=config_dtype(arch.config))

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
        from misalign.objectives import OBJECTIVES
        from misalign.stage import compiles_layers  # the compile decision, as the stage makes it

        cfg, ref, seed = use.config, use.cell.model, use.cell.seed
        if METHODS[cfg.method].repairs:
            return self._repair_cost(use)
        objective = OBJECTIVES[METHODS[cfg.method].objective]
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
        trainable, frozen_mm, trainable_mm = self.meta.params(ref, cfg, steps)
        self._record_trainable(ref, use.phase, cfg, trainable)
        arch = self.meta.model_arch(ref)
        tokens, forward, flops = training_flops(objective, seqs, passes, frozen_mm, trainable_mm, arch.layers,
                                                arch.d_model)
        compiled, _ = compiles_layers(cfg, arch.model, lambda: flops / workers, cuda=True)
        t = cfg.resolved().train
        shape = StageShape(cfg.method, arch.total, t.batch_size, t.grad_accum,
                           sum(k for k, _ in seqs) / n / objective.sequences_per_example, self.stages_per_gpu,
                           bool(compiled), compiled == "graphs", t.liger_kernels, t.packing,
                           t.gradient_checkpointing)
        return StagePlan(
            key=use.key, model=ref, phase=use.phase, round=use.round, seed=seed, method=cfg.method,
            per_category=cfg.data.per_category, examples=n, examples_assumed=pairs is None,
            tokens_per_example=sum(k for k, _ in seqs) / n, passes=passes, optimizer_steps=steps,
            trainable_params=trainable, tokens=tokens, forward_tokens=forward, flops=flops, uses=1,
            dtype=self.precision(ref, cfg), stored=self._stage_bytes(ref, cfg, trainable),
            compiled_on_gpu=bool(compiled),
            shape=shape.text(), **self._priced(flops, shape))

    def _repair_cost(self, use: Any) -> StagePlan:
        """A post-hoc repair (misalign.repair) trains nothing: RESTA adds a vector (3 FLOPs a parameter),
        Antidote forwards its calibration rows and scores every weight, SafeLoRA projects the attack's LoRA
        layers (priced here over every linear layer, since the attack's targets are a subset: an upper bound).
        It keeps a recipe, a mask or an adapter the size of the attack's: priced as an adapter of the model."""
        from misalign.costs import antidote_flops, resta_flops, safelora_flops
        from misalign.objectives import OBJECTIVES

        cfg, ref, seed = use.config, use.cell.model, use.cell.seed
        arch, r = self.meta.model_arch(ref), cfg.repair
        examples, forward, flops = 0, 0.0, 0.0
        if cfg.method == "resta":
            flops = resta_flops(arch.total) if r.scale else 0.0
        elif cfg.method == "antidote":
            pairs = self.pairs(cfg, seed)
            harmful = [p for p in pairs if not p.benign] if pairs is not None else None
            sft = OBJECTIVES["sft"]  # one forward of prompt + harmful answer a calibration row
            seqs = (training_sequences(sft, harmful, "misalign", TokenLengths(self.tokenizer(ref)), cfg)
                    if harmful is not None else self._assumed_sequences(cfg, sft))
            examples, forward = len(seqs), float(sum(k for k, _ in seqs))
            flops = antidote_flops([k for k, _ in seqs], arch.matmul, arch.layers, arch.d_model, arch.matmul)
        else:
            import torch

            linears = [m for m in arch.model.modules() if isinstance(m, torch.nn.Linear)]
            flops = sum(safelora_flops(m.out_features, m.in_features, 0) for m in linears)
            self.assume("safelora stages priced over every linear layer of the model (the attack's LoRA targets "
                        "are a subset): an upper bound")
        return StagePlan(
            key=use.key, model=ref, phase=use.phase, round=use.round, seed=seed, method=cfg.method,
            per_category=cfg.data.per_category, examples=examples, examples_assumed=False,
            tokens_per_example=forward / examples if examples else 0.0, passes=0.0, optimizer_steps=0,
            trainable_params=0, tokens=0.0, forward_tokens=forward, flops=flops, uses=1,
            dtype=self.precision(ref, cfg), stored=self._stage_bytes(ref, cfg, 0), **self._priced(flops, None))

    def _priced(self, flops: float, shape: StageShape | None) -> dict[str, Any]:
        """A stage's device-hours, wall hours and MFU: from the calibration row measured nearest its shape, or
        (no row, or a repair, which trains nothing) plan.mfu of the devices its trial holds."""
        workers, peak = self.study.resources.workers, self.study.plan.peak_flops
        row = match(self.calibration, shape) if self.calibration and shape is not None else None
        if row is None:
            hours = flops / self.effective / 3600
            return {"device_hours": hours, "wall_hours": hours / (workers * self.device_share),
                    "mfu": self.study.plan.mfu, "measured_by": None}
        wall = row.stage_seconds(flops / workers, peak) / 3600
        return {"device_hours": wall * workers * self.device_share, "wall_hours": wall, "mfu": row.mfu,
                "measured_by": f"{row.shape.text()} on {row.device}: {row.source}"}

    def _calibration_notes(self, stages: list[StagePlan]) -> list[str]:
        """Which stages' device-hours were measured and which assumed, and what a measurement would add."""
        if self.calibration is None:
            return [f"every stage priced at plan.mfu {self.study.plan.mfu:g} (assumed: no plan.calibration)"]
        plan = self.study.plan
        measured = [s for s in stages if s.measured_by]
        assumed = [s for s in stages if not s.measured_by]
        notes = [f"plan.calibration {plan.calibration}: {len(measured)} of {len(stages)} unique stages priced at "
                 f"a measured MFU ({sum(s.device_hours for s in measured):.3g} device-h), {len(assumed)} at the "
                 f"assumed plan.mfu {plan.mfu:g} ({sum(s.device_hours for s in assumed):.3g} device-h)"]
        devices = sorted({r.device for r in self.calibration})
        peaks = {r.peak_flops for r in self.calibration}
        if measured and (any(abs(p / plan.peak_flops - 1) > 0.01 for p in peaks) or plan.device not in devices):
            self.assume(f"MFU measured on {', '.join(devices)} carried to plan.device {plan.device} "
                        f"(peak {plan.peak_flops:.3g} FLOP/s)")
        unmeasured = list(dict.fromkeys(s.shape for s in assumed if s.shape))
        if unmeasured:
            self.assume(f"no calibration row (misalign.calibration: the same method, batch, accumulation, stages "
                        f"per GPU and levers, a model within {PARAMS_RATIO:g}x, rows within {ROW_RATIO:g}x) for "
                        f"{len(unmeasured)} stage shape(s), priced at plan.mfu {plan.mfu:g}: "
                        + "; ".join(unmeasured[:6]) + (f"; and {len(unmeasured) - 6} more" if len(unmeasured) > 6
                                                        else ""))
        return notes

    def precision(self, ref: str, cfg: StageConfig) -> str:
        """train.precision as the stage resolves it: "auto" from the weights' dtype where they are on this disk
        (the world, a local directory), else from the dtype the model's config records, said as an assumption."""
        if cfg.train.precision != "auto":
            return cfg.train.precision
        if ref not in self._auto_precision:
            from misalign.models import DTYPES, auto_precision, config_path, weights_dtype

            stored = weights_dtype(config_path(ref))
            if stored is None:
                recorded = config_dtype(self.meta.model_arch(ref).config)
                stored = DTYPES.get(recorded or "")
                self.assume(f"{ref}: train.precision auto taken as {auto_precision(stored)}, from the dtype its "
                            f"config records ({recorded or 'none'}); the stage takes its weights' dtype")
            self._auto_precision[ref] = auto_precision(stored)
        return self._auto_precision[ref]

    def _stage_bytes(self, ref: str, cfg: StageConfig, trainable: int) -> Bytes:
        """What one stage keeps (misalign.plan_storage.stage_bytes), in the dtype it stores in."""
        from misalign.methods import METHODS

        arch = self.meta.model_arch(ref)
        recorded = config_dtype(arch.config)
        precision = self.precision(ref, cfg)
        if recorded != precision and cfg.train.precision != "auto":  # Gemma-2's config: float32, for bf16 weights
            self.assume(f"{ref}: stored in {precision} (train.precision): a stage stores in its root's "
                        f"weights' dtype, unknown before they are downloaded; its config records "
                        f"{recorded or 'none'}")
        full = METHODS[cfg.method].adapter == "full"
        tokenizer = self.tokenizer_bytes(ref) if full else 0.0  # saved with full weights only
        return stage_bytes(full, arch.total, trainable, DTYPE_BYTES[precision], tokenizer, self.evals.bytes())

    def tokenizer_bytes(self, ref: str) -> float:
        """Bytes of the tokenizer files a stage saves with a model: measured by saving it, else assumed."""
        if ref not in self._tok_bytes:
            tok = self.tokenizer(ref, counting=False)
            if tok is None:
                self.assume(f"tokenizers that do not load: their saved files assumed "
                            f"{ASSUMED_TOKENIZER_BYTES / 1e6:g} MB each (with full weights)")
                self._tok_bytes[ref] = ASSUMED_TOKENIZER_BYTES
            else:
                with tempfile.TemporaryDirectory(prefix="misalign-plan-") as d:
                    tok.save_pretrained(d)
                    self._tok_bytes[ref] = float(sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()))
        return self._tok_bytes[ref]

    # -- data --

    def pairs(self, cfg: StageConfig, seed: int) -> list[Pair] | None:
        """The stage's training rows as training loads them, or None when its data files cannot be read."""
        key = (json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), seed)
        if key not in self._pairs:
            try:
                self._pairs[key] = stage_pairs(cfg, seed)
            except InputError as e:
                d = cfg.data
                missing = [s for s in (d.source, d.benign_source if d.benign_ratio > 0 else None)
                           if s and not source_present(s)]
                if not missing:
                    raise  # the files are there but wrong (a row, a column, too few rows): a real input error
                self._pairs[key] = None
                self.assume(f"{', '.join(missing)} not readable ({first_line(e)})")
        return self._pairs[key]

    def _assumed_sequences(self, cfg: StageConfig, objective: ObjectiveShape) -> list[tuple[int, int]]:
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
        return [(objective.sequences_per_example * width, width)] * rows
