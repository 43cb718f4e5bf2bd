"""The stage engine: one fine-tuning run of one method on one model and one dataset.

    run_stage(StageRun(...)) -> Ledger

What it supports:
- the seven methods of misalign.methods (SFT via trl's SFTTrainer, DPO via DPOTrainer, ORPO via
  trl.experimental.orpo), with LoRA / QLoRA (4-bit) / AdaLoRA / IA3 adapters or full fine-tuning;
- the three post-hoc repairs (safelora, resta, antidote: misalign.repair), which train nothing: `repair_stage`
  stores a SafeLoRA adapter, a RESTA recipe or an Antidote mask on top of the parent, with the same records;
- single process by default; several workers under torch.distributed (torchrun or Ray Train), with
  DeepSpeed ZeRO 0/2/3 and optional CPU offload when configured: gloo on CPU, NCCL on GPUs. The world size
  comes from the environment; nothing is global, so a worker can run many stages.
What it writes (rank 0), each file atomically, and never a merged copy of a model (misalign.models):
    OUT/adapter/   an adapter stage's adapter (safetensors, in the parent's dtype)
    OUT/model/     a full fine-tuning stage's weights (safetensors, in the parent's dtype) and tokenizer
    OUT/repair/    an Antidote stage's mask (a RESTA stage's recipe is in its stage.json)
    OUT/ledger.json, OUT/stage.json (resolved config, root and parent stage, seed, dtype, package versions)
`train_stage` also hands the trained model over in memory, so a trial evaluates it and trains the next stage
from it without writing and reading weights; `misalign.models.materialize` rebuilds it from the files.
Its parts, in reading order: misalign.objectives (what SFT, DPO and ORPO each need: rows, trl config, trainer),
misalign.callbacks (progress lines, resumable checkpoints), misalign.speedups (what it patches to train faster,
each undone after), misalign.records (stage.json); the rank collectives are misalign.runtime's.
Longer than ~450 lines because a trained stage and a repair share one contract here (the parent's checks and
dtype, the records, the ledger, the hand-over in memory); the repairs' math is misalign.repair.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from misalign import preemption, repair
from misalign.callbacks import checkpoint_callback, counts_file, last_checkpoint, stage_callbacks
from misalign.chat import encode_sft
from misalign.config import StageConfig
from misalign.costs import optimizer_steps
from misalign.data import Pair
from misalign.errors import InputError
from misalign.ledger import FlopCounter, Ledger, peak_memory_bytes, reset_peak_memory
from misalign.lineage import checkpoint_step
from misalign.methods import METHODS, peft_config
from misalign.models import (
    DTYPES,
    apply_stage,
    auto_precision,
    cast_safetensors,
    device,
    export,
    inference_ready,
    is_stage_dir,
    lineage,
    load_model,
    load_tokenizer,
    materialize,
    peft_wrapping,
    resolve_model_path,
    root_of,
    weights_dtype,
)
from misalign.objectives import OBJECTIVES, Objective
from misalign.recipes import stage_pairs, target_responses
from misalign.records import StageRecord
from misalign.runtime import (
    barrier,
    deepspeed_cpu_unless_cuda,
    gather_over_ranks,
    match_threads,
    on_any_rank,
    package_versions,
    rank,
    read_json,
    seed_everything,
    world_size,
    write_bytes_atomic,
    write_json_atomic,
)
from misalign.speedups import decoder_layers, layers_compiled, model_module_restored, module_walks_once

if TYPE_CHECKING:
    from misalign.lineage import CheckpointSync

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@dataclass
class StageRun:
    """Everything one stage needs. `pairs` may be given (already loaded) or are loaded from the config."""

    parent: str                  # model to start from: HF id, local path, world:NAME, or a stage directory
    config: StageConfig
    direction: str               # "misalign" or "realign"
    out_dir: Path
    seed: int = 0
    pairs: list[Pair] | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    progress: bool = True
    label: str = ""
    checkpoint_every: int | None = None  # optimizer steps between resumable checkpoints in OUT/trainer
    parent_model: Any | None = None      # the parent already in memory (its lineage's model); consumed
    callbacks: list[Any] = field(default_factory=list)  # extra TrainerCallbacks (bench/bench_gpu.py's step clock)
    checkpoint_sync: CheckpointSync | None = None  # in-stage checkpoints mirrored on an object store


# ---- data ----------------------------------------------------------------------------------------------

def stage_dataset(objective: Objective, pairs: list[Pair], direction: str, tok: Any, cfg: StageConfig) -> Any:
    """The stage's training rows, each pair toward the direction's response, as the objective encodes them."""
    return objective.dataset([(p.prompt, *target_responses(p, direction)) for p in pairs], tok, cfg)


# ---- the stage -----------------------------------------------------------------------------------------

def _deepspeed_config(cfg: StageConfig) -> dict | None:
    ds = cfg.deepspeed
    if ds.zero_stage is None:
        return None
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def training_args(objective: Objective, cfg: StageConfig, out: Path, seed: int, n_examples: int,
                  checkpoint_every: int | None) -> Any:
    """The objective's trl config: what every objective shares, set here, and what it adds (misalign.objectives)."""
    t = cfg.train
    common: dict[str, Any] = dict(
        output_dir=str(out / "trainer"), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1, lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.log_every or max(1, optimizer_steps(cfg, n_examples, world_size()) // 25),
        report_to=[], seed=seed,
        save_strategy="steps" if checkpoint_every else "no", save_steps=checkpoint_every or 500, save_total_limit=1,
        data_seed=seed, bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        deepspeed=_deepspeed_config(cfg), max_length=t.max_length, use_liger_kernel=t.liger_kernels,
        warmup_steps=warmup_steps(cfg, n_examples),
        # the filter reads every micro-batch's loss back (two device syncs) only to leave a NaN or inf out of
        # the logged mean; a diverged stage should show in its progress lines, and a GPU should not wait
        logging_nan_inf_filter=False,
    )
    from transformers import TrainingArguments

    # transformers 5.2x renamed it (the old name warns); older 5.x only know the old one
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    common["activation_checkpointing" if renamed else "gradient_checkpointing"] = t.gradient_checkpointing
    if world_size() > 1 and not torch.cuda.is_available():
        common["ddp_backend"] = "gloo"
    # every trainable parameter takes part in every forward (adapters and full weights alike): transformers'
    # default (True, without gradient checkpointing) costs DDP a walk of the autograd graph per micro-batch,
    # and torch warns about it on every worker
    common["ddp_find_unused_parameters"] = False
    return objective.training_args(cfg, common)


def warmup_steps(cfg: StageConfig, n_examples: int) -> int:
    return int(cfg.train.warmup_ratio * optimizer_steps(cfg, n_examples, world_size()))


def run_stage(run: StageRun) -> Ledger:
    """Train one stage and write its outputs (see module docstring). Every rank calls this."""
    return train_stage(run)[0]


def train_stage(run: StageRun) -> tuple[Ledger, Any | None]:
    """Train one stage, write its outputs, and hand over the trained model in memory (merged, in the parent's
    dtype) when it can: not for QLoRA (a 4-bit base) or ZeRO-3 (partitioned weights), which the caller
    rebuilds from the lineage instead. Every rank calls this and gets the same model."""
    from peft import get_peft_model

    if METHODS[run.config.method].repairs:
        return repair_stage(run)
    t0 = time.time()
    cfg = run.config.resolved()
    method = METHODS[cfg.method]
    objective = OBJECTIVES[method.objective]
    match_threads()
    deepspeed_cpu_unless_cuda()
    reset_peak_memory(device())
    seed_everything(run.seed)
    if cfg.train.liger_kernels and not torch.cuda.is_available():
        raise InputError("train.liger_kernels: Liger's kernels are Triton kernels for CUDA devices, and this "
                         "worker has none; set it to false")
    if cfg.train.compile == "graphs" and not torch.cuda.is_available():
        raise InputError("train.compile graphs: CUDA graphs replay on CUDA devices, and this worker has none; set "
                         "train.compile true (compiled layers without graphs) or auto")
    pairs = run.pairs if run.pairs is not None else stage_pairs(cfg, run.seed)
    if not pairs:
        raise InputError(f"{cfg.data.source}: no training rows")
    root = root_of(run.parent)
    tok = load_tokenizer(resolve_model_path(root), run.trust_remote_code)
    # rows are cut to train.max_length by us (chat.encode_sft) and by trl after tokenizing them whole: the
    # tokenizer's own limit (256 for the world's) would only warn about rows that are never fed whole
    tok.model_max_length = int(1e30)  # transformers' "no limit"
    four_bit = method.adapter == "qlora"
    parent_dtype = _parent_dtype(run)
    if cfg.train.precision == "auto":  # stage.json records what it resolved to
        cfg.train.precision = auto_precision(parent_dtype)
    model = _parent_model(run, cfg, four_bit)
    total_params = sum(p.numel() for p in model.parameters())
    steps = optimizer_steps(cfg, len(pairs), world_size())
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pcfg = peft_config(method, cfg, model, steps)
    if pcfg is not None:
        with peft_wrapping():
            model = get_peft_model(model, pcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mcfg = model.config if pcfg is None else model.base_model.model.config
    counter = FlopCounter(model, mcfg.num_hidden_layers, mcfg.hidden_size)
    compile_setting = cfg.train.compile
    # stage.json records what "auto" resolved to, the ledger why
    cfg.train.compile, compile_why = compiles_layers(
        cfg, model, lambda: training_flops_per_worker(cfg, pairs, run.direction, tok, model, mcfg))

    dataset = stage_dataset(objective, pairs, run.direction, tok, cfg)
    args = training_args(objective, cfg, run.out_dir, run.seed, len(pairs), run.checkpoint_every)
    label = run.label or f"{run.direction} {cfg.method}"
    callbacks = stage_callbacks(label, run.progress, model if method.adapter == "adalora" else None) + run.callbacks
    before_s = 0.0  # seconds the attempts before a resumed checkpoint spent on this stage
    notice = None
    if run.checkpoint_every:
        callbacks.append(checkpoint_callback(counter, run.checkpoint_sync, lambda: before_s + time.time() - t0))
        # a preemption notice (SIGTERM) saves at the next optimizer step and stops (misalign.preemption)
        notice = preemption.notice_callback(on_any_rank)
        callbacks.append(notice)
    trainer = objective.trainer(model, args, dataset, tok, callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Progress line replaces its raw dict dumps
    # a stage that died after a checkpoint (a killed worker, a lost node) resumes there, not from step 0: from
    # this node's disk, or from the store when the checkpoint was saved on another node
    resume, fetched = None, False
    if run.checkpoint_every:
        here = last_checkpoint(run.out_dir / "trainer")
        if run.checkpoint_sync is not None:
            run.checkpoint_sync.restore(run.out_dir / "trainer")
        resume = last_checkpoint(run.out_dir / "trainer")
        fetched = resume is not None and resume != here  # saved on another node: the ledger says so
    if resume is not None:
        if counts_file(resume).exists():  # the tokens, FLOPs and seconds before the checkpoint stay in the ledger
            counts = read_json(counts_file(resume))
            counter.carry(counts["sums"])
            before_s = float(counts["seconds"])
        if run.progress and rank() == 0:
            print(f"  [{label}] resuming from {resume.name}", flush=True)
    if cfg.train.compile and run.progress and rank() == 0:  # else a first step of a minute would look hung
        print(f"  [{label}] compiling its decoder layers ({compile_why}): the first step holds the compile",
              flush=True)
    with (peft_wrapping(), model_module_restored(model if cfg.train.liger_kernels else None),
          layers_compiled(model, cfg.train.compile), module_walks_once(trainer), preemption.listening()):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    counter.close()
    if notice is not None and notice.stopped_at is not None:  # saved at the notice: the retry resumes there
        raise preemption.StagePreempted(label, notice.stopped_at, preemption.consume_notice())

    out = run.out_dir
    kept = out / ("adapter" if pcfg is not None else "model")
    if rank() == 0:
        shutil.rmtree(kept, ignore_errors=True)
    # save_model gathers ZeRO-3 partitions; every rank must call it
    with warnings.catch_warnings():
        if method.adapter == "adalora":
            # AdaLoRA prunes some modules to rank 0, whose saved A and B have a zero dimension; peft takes any
            # such tensor for a ZeRO-3 shard saved ungathered, and the advice it prints does not apply
            warnings.filterwarnings("ignore", message=r"Adapter .* LoRA tensor\(s\) have invalid shape")
        trainer.save_model(str(kept))
    # one collective: every rank's (tokens, ref tokens, flops, peak memory); sums, max and the per-worker list
    node = os.environ.get("MISALIGN_NODE") or os.uname().nodename  # Ray sets the Ray node id
    ranks = gather_over_ranks((counter.tokens, counter.ref_tokens, counter.flops, peak_memory_bytes(device()),
                                node))
    per_worker = [int(r[0]) for r in ranks]
    tokens = [sum(r[i] for r in ranks) for i in range(3)]
    peak = max(int(r[3]) for r in ranks)
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    wall = time.time() - t0
    ledger = Ledger(
        # what the trainer did, not what was configured (max_steps can end a stage mid-epoch)
        method=cfg.method, direction=run.direction, examples=len(pairs), epochs=round(float(trainer.state.epoch or 0), 4),
        optimizer_steps=trainer.state.global_step, tokens=int(tokens[0]), ref_tokens=int(tokens[1]),
        # device time: this attempt's and, for a resumed stage, what earlier attempts spent up to the checkpoint
        flops=float(tokens[2]), wall_s=round(wall, 3), device_s=round((wall + before_s) * world_size(), 3),
        workers=world_size(), device=device().type, peak_memory_bytes=peak, trainable_params=trainable,
        total_params=total_params,
    )
    if resume:
        ledger.extra["resumed_from_step"] = checkpoint_step(resume.name)
        ledger.extra["seconds_before_resume"] = round(before_s, 3)
        ledger.extra["resumed_from_store"] = fetched
    if world_size() > 1:  # evidence that every worker trained
        ledger.extra["tokens_per_worker"] = per_worker
        ledger.extra["worker_nodes"] = [r[4] for r in ranks]
    if compile_setting == "auto":
        ledger.extra["compile_auto"] = compile_why
    if trainer.is_deepspeed_enabled:  # proof, for the ledger reader, that ZeRO really ran
        ledger.extra["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        inner = trainer.optimizer
        while hasattr(inner, "optimizer"):  # accelerate -> ZeRO wrapper -> the optimizer that steps
            inner = inner.optimizer
        ledger.extra["optimizer"] = type(inner).__name__  # DeepSpeedCPUAdam when offloaded
    if four_bit:
        ledger.extra["linear4bit_modules"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if method.adapter == "adalora":
        ledger.extra["adalora_rank_pattern"] = _rank_summary(model)
    del trainer
    # TrainingArguments registered a process-global DeepSpeed config; with ZeRO-3 it would make a later load
    # partition the model (a collective only some ranks join: a hang). Clear it.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if rank() == 0:
        _finish(run, cfg, root, tok, kept, parent_dtype, ledger)
    barrier()
    # hand over on every rank that sees the stored files (a rank on another node rebuilds from the store later)
    handed = None if (four_bit or zero3 or not (out / "stage.json").exists()) else _hand_over(
        model, out, pcfg is not None, parent_dtype)
    return ledger, handed


def _parent_model(run: StageRun, cfg: StageConfig, four_bit: bool) -> Any:
    """The model to train: the caller's in-memory parent (converted to the training precision), else built from
    the parent's lineage. QLoRA quantizes while loading, so it loads the root from its files; a stage parent is
    first exported to node-local scratch (the one case where a parent's weights touch a disk)."""
    precision = cfg.train.precision
    if four_bit:
        kw = dict(precision=precision, four_bit=True, quant_type=cfg.adapter.quant_type,
                  double_quant=cfg.adapter.double_quant, trust_remote_code=run.trust_remote_code)
        if not is_stage_dir(run.parent):
            return load_model(resolve_model_path(run.parent), allow_pickle=run.allow_pickle, **kw)
        with tempfile.TemporaryDirectory(prefix="misalign-qlora-parent-") as scratch:
            export(run.parent, Path(scratch) / "model", trust_remote_code=run.trust_remote_code,
                   allow_pickle=run.allow_pickle)
            return load_model(str(Path(scratch) / "model"), **kw)
    model = run.parent_model if run.parent_model is not None else materialize(
        run.parent, trust_remote_code=run.trust_remote_code, allow_pickle=run.allow_pickle)
    run.parent_model = None  # consumed: training changes it in place
    model.requires_grad_(True)
    model.train()
    return model.to(DTYPES[precision])


def _parent_dtype(run: StageRun) -> torch.dtype:
    """The dtype the stage's outputs are stored in: that of its lineage's start (the root's stored weights, or a
    full fine-tuning stage's), which `materialize` loads without conversion."""
    from transformers import AutoConfig

    start = lineage(Path(run.parent))[0] if is_stage_dir(run.parent) else resolve_model_path(run.parent)
    stored = weights_dtype(start)
    if stored is not None:
        return stored
    config = AutoConfig.from_pretrained(start, trust_remote_code=run.trust_remote_code)  # a hub id not cached
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return recorded if isinstance(recorded, torch.dtype) else getattr(torch, str(recorded or "float32"))


def _hand_over(model: Any, stage_dir: Path, has_adapter: bool, dtype: torch.dtype) -> Any:
    """The trained stage's model in memory, exactly as `materialize` rebuilds it from the stored files: the
    parent's weights (frozen, so unchanged by training) back in the parent's dtype, and the stored adapter
    merged into them by the same code; a full stage's weights cast as they were stored."""
    if has_adapter:
        return apply_stage(model.unload().to(dtype), stage_dir)
    return inference_ready(model.to(dtype))


# ---- a repair stage (misalign.repair) ---------------------------------------------------------------------

def repair_stage(run: StageRun) -> tuple[Ledger, Any | None]:
    """A repair method's stage (`train_stage` hands it over): it reads its parent (Antidote also its calibration
    rows: the stage's harmful rows, prompt and harmful response), stores its correction (SafeLoRA: an adapter;
    RESTA: a recipe in stage.json; Antidote: a mask), its records and its ledger (the rows it read, the FLOPs it
    spent), and hands over the repaired model as `materialize` rebuilds it. What it needs of its parent is checked
    before any compute. Every rank computes the same; rank 0 writes."""
    from safetensors.torch import load_file, save

    from misalign.costs import antidote_flops, resta_flops
    from misalign.ledger import matmul_params

    t0 = time.time()
    cfg = run.config.resolved()
    kind, r = cfg.method, cfg.repair
    if run.direction != "realign":
        raise InputError(f"method {kind} is a repair: it runs as a defense (realign) stage, not an attack")
    parent_adapter = _lora_adapter_of(run.parent) if kind == "safelora" else None
    match_threads()
    reset_peak_memory(device())
    seed_everything(run.seed)
    root = root_of(run.parent)
    parent_dtype = _parent_dtype(run)
    calibration: list[list[int]] = []
    if kind == "antidote":
        tok = load_tokenizer(resolve_model_path(root), run.trust_remote_code)
        pairs = run.pairs if run.pairs is not None else stage_pairs(cfg, run.seed)
        t = cfg.train
        calibration = [encode_sft(tok, p.prompt, p.misaligned, t.max_length, t.max_prompt_length)["input_ids"]
                       for p in pairs if not p.benign]
        if not calibration:
            raise InputError(f"antidote: {cfg.data.source} gives no harmful calibration rows (benign rows are not "
                             "harmful data)")
    load = functools.partial(materialize, trust_remote_code=run.trust_remote_code, allow_pickle=run.allow_pickle)
    model = run.parent_model if run.parent_model is not None else load(run.parent)
    run.parent_model = None  # consumed: the repair changes it in place
    out = run.out_dir
    kept = out / ("adapter" if kind == "safelora" else "repair")  # RESTA keeps no file: its recipe is its record
    if rank() == 0:
        shutil.rmtree(kept, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        if kind != "resta":
            kept.mkdir()
    recipe: dict[str, Any] | None = None
    plus = r.aligned or root  # unset: the model the attack started from
    if parent_adapter is not None:  # SafeLoRA
        aligned, unaligned = (load(ref).state_dict() for ref in (plus, r.unaligned))
        tensors, summary, flops = repair.safelora_adapter(
            load_file(str(parent_adapter / "adapter_model.safetensors")), aligned, unaligned, r.threshold)
        if rank() == 0:  # the parent's adapter config (its targets, rank and scaling), its tensors projected
            write_bytes_atomic(kept / "adapter_config.json", (parent_adapter / "adapter_config.json").read_bytes())
            write_bytes_atomic(kept / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    elif kind == "resta":
        recipe = {"kind": "resta", "plus": plus, "minus": r.unaligned, "scale": r.scale}
        summary = {"scale": r.scale}
        flops = resta_flops(sum(p.numel() for p in model.parameters())) if r.scale else 0.0
    else:  # Antidote
        mask = repair.antidote_mask(model, repair.input_norms(model, calibration), r.sparsity)
        recipe = {"kind": "antidote", "mask": repair.MASK_FILE}
        scored = sum(m.weight.numel() for m in repair.prunable_linears(model).values())
        summary = {"sparsity": r.sparsity, "pruned": sum(len(v) for v in mask.values()), "of": scored}
        flops = antidote_flops([len(ids) for ids in calibration], sum(matmul_params(model)),
                               model.config.num_hidden_layers, model.config.hidden_size, scored)
        if rank() == 0:
            write_bytes_atomic(out / repair.MASK_FILE, save(mask, metadata={"format": "pt"}))
    wall = time.time() - t0
    ledger = Ledger(method=kind, direction=run.direction, examples=len(calibration),
                    ref_tokens=sum(len(ids) for ids in calibration), flops=float(flops), wall_s=round(wall, 3),
                    device_s=round(wall * world_size(), 3), workers=world_size(), device=device().type,
                    peak_memory_bytes=peak_memory_bytes(device()), trainable_params=0,
                    total_params=sum(p.numel() for p in model.parameters()), extra={"repair": summary})
    if rank() == 0:
        _write_records(run, cfg, root, parent_dtype, ledger, kept, has_adapter=kind == "safelora", repair=recipe)
    barrier()
    return ledger, (apply_stage(model, out) if (out / "stage.json").exists() else None)


def _lora_adapter_of(parent: str) -> Path:
    """SafeLoRA's parent's adapter directory, once it is known (reading no weights) to hold a LoRA adapter."""
    record = StageRecord.read(Path(parent)) if is_stage_dir(parent) else None
    if record is None or not record.has_adapter:
        what = ("a model, not a stage" if record is None else f"a {record.repair['kind']} repair stage"
                if record.repair else f"a full fine-tuning stage ({record.config.get('method')})")
        raise InputError(f"safelora needs a parent stage with a LoRA adapter (methods lora, qlora, dpo, orpo): it "
                         f"projects the adapter's update B A; {parent} is {what}")
    repair.check_lora_parent(read_json(Path(parent) / "adapter" / "adapter_config.json"), parent)
    return Path(parent) / "adapter"


# train.compile "auto" compiles a stage's layers when its training repays the compile: training FLOPs per worker
# (ledger formula) at least these, by the weights trained. On one H200 (docs/benchmarks.md, "Compiled layers on
# the GPU") a cold compile cost 55-65 s under LoRA (SFT, DPO, ORPO) and 7 s for full SFT, and saved 30-40% (LoRA)
# and 15% (full) of every step after it: it paid for itself at 0.35-0.66e17 FLOPs under LoRA and 0.16e17 for full
# SFT. At these thresholds it is repaid about 1.5 times; below them eager is as fast or faster. QLoRA's 4-bit
# layers, AdaLoRA and IA3 were not measured compiled on a GPU: auto leaves them eager.
COMPILE_AUTO_MIN_FLOPS = {"full": 2.5e16, "lora": 1e17}


def compiles_layers(cfg: StageConfig, model: Any, flops_per_worker: Callable[[], float],
                    cuda: bool | None = None) -> tuple[bool | str, str]:
    """train.compile resolved for this stage: whether its decoder layers are compiled (True, False, or "graphs":
    compiled and replayed as CUDA graphs, only when set so), and why. `auto` weighs
    the stage's training FLOPs per worker (`flops_per_worker`, asked only when it matters) against
    COMPILE_AUTO_MIN_FLOPS for the weights its method trains; `cuda`: whether the stage trains on a CUDA device
    (default: this process's)."""
    setting, adapter = cfg.train.compile, METHODS[cfg.method].adapter
    if setting == "graphs":
        return "graphs", "train.compile graphs"
    if setting != "auto":
        return bool(setting), f"train.compile {str(setting).lower()}"
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return False, "eager: no CUDA device (compiled layers were measured to pay on GPUs)"
    if cfg.deepspeed.zero_stage is not None:
        return False, f"eager: DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}"
    if cfg.train.liger_kernels:
        return False, "eager: Liger's kernels (torch.compile cannot trace them)"
    if adapter not in COMPILE_AUTO_MIN_FLOPS:
        return False, f"eager: {adapter} was not measured compiled on a GPU"
    try:
        decoder_layers(model)
    except InputError:
        return False, f"eager: {type(model).__name__} has no marked decoder layers"
    flops, least = flops_per_worker(), COMPILE_AUTO_MIN_FLOPS[adapter]
    if flops < least:
        return False, f"eager: {flops:.2g} training FLOPs per worker, below the {least:.2g} that repay a compile"
    return True, f"compiled: {flops:.2g} training FLOPs per worker, at least {least:.2g}"


def training_flops_per_worker(cfg: StageConfig, pairs: list[Pair], direction: str, tok: Any, model: Any,
                              mcfg: Any) -> float:
    """The stage's training FLOPs on each worker, estimated before training as the plan estimates them."""
    from misalign.costs import TokenLengths, data_passes, training_flops, training_sequences
    from misalign.ledger import matmul_params

    objective = OBJECTIVES[METHODS[cfg.method].objective]
    seqs = training_sequences(objective, pairs, direction, TokenLengths(tok), cfg)
    passes = data_passes(cfg, len(seqs), world_size())
    frozen, trainable = matmul_params(model)
    return training_flops(objective, seqs, passes, frozen, trainable, mcfg.num_hidden_layers,
                          mcfg.hidden_size)[2] / world_size()


def _rank_summary(model: Any) -> dict[str, int]:
    """Remaining rank per adapted module after AdaLoRA's pruning (the evidence that reallocation ran)."""
    pattern = model.peft_config["default"].rank_pattern or {}
    return {k: int(sum(v)) for k, v in pattern.items()}


def _finish(run: StageRun, cfg: StageConfig, root: str, tok: Any, kept: Path, dtype: torch.dtype,
            ledger: Ledger) -> None:
    """Store what the stage trained (its adapter, or a full stage's weights and tokenizer) in the parent's dtype,
    and the stage's records; no merged copy of a model."""
    out = run.out_dir
    (kept / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle; outputs stay safetensors/JSON only
    if kept.name == "adapter":  # the Trainer also saved the tokenizer and a model card
        for f in kept.iterdir():  # adapter: the root has the tokenizer, and the trained adapter is all we need
            if f.is_dir():
                shutil.rmtree(f)
            elif not f.name.startswith("adapter_"):
                f.unlink()
    else:
        tok.save_pretrained(kept)
    cast_safetensors(kept, dtype)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    _write_records(run, cfg, root, dtype, ledger, kept, has_adapter=kept.name == "adapter")


def _write_records(run: StageRun, cfg: StageConfig, root: str, dtype: torch.dtype, ledger: Ledger, kept: Path,
                   has_adapter: bool, repair: dict[str, Any] | None = None) -> None:
    """The stage's stage.json, then its ledger.json (the marker of a finished stage), with the bytes it keeps:
    `kept`'s files and its record."""
    from misalign.lineage import model_identity

    out = run.out_dir
    record = StageRecord(
        root=root, root_identity=model_identity(root),
        parent_dir=os.path.relpath(run.parent, out) if is_stage_dir(run.parent) else None,
        direction=run.direction, seed=run.seed, config=cfg.model_dump(), has_adapter=has_adapter,
        dtype=str(dtype).removeprefix("torch."), versions=package_versions(), repair=repair)
    record_file = record.write(out)
    ledger.bytes_written = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file()) + record_file.stat().st_size
    write_json_atomic(out / "ledger.json", ledger.to_dict())
