"""Models: load with safe defaults, check before any compute, and materialize a stage's model from its lineage.

A stage directory (misalign.stage) keeps what the stage trained, never a merged copy of a model:
    adapter/     an adapter stage's adapter (safetensors, in the parent's dtype)
    model/       a full fine-tuning stage's weights (safetensors, in the parent's dtype) and tokenizer
    repair/      a repair stage's files (Antidote's pruning mask; misalign.repair); RESTA's recipe is all in
                 stage.json
    stage.json   its record (misalign.records.StageRecord): `root` (the model reference the lineage starts from)
                 and `parent_dir` (the parent stage's directory relative to this one; None when the parent is the root)
A stage's model is its root, loaded once in the root's own dtype, with the lineage's adapters merged and repair
recipes applied in order; a full fine-tuning stage on the way replaces everything before it. `materialize` builds
it in memory; `export` writes it as a standalone HF model for people who want to ship or inspect one. What a
model reference is (world:NAME, a path, a URL, a hub id pinned or not) and where its files are: misalign.modelref.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from misalign.errors import InputError
from misalign.modelref import config_path, has_safetensors, resolve_model_path

# re-exported for plan.py, which imports them from here until it is split (issue 23): import from modelref
from misalign.modelref import is_hub_id as is_hub_id
from misalign.modelref import pinned_revision as pinned_revision
from misalign.records import FILE as RECORD_FILE
from misalign.records import StageRecord
from misalign.runtime import local_rank, write_bytes_atomic, write_json_atomic
from misalign.storage import redacted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_precision(weights: torch.dtype | None) -> str:
    """train.precision "auto" for a model whose weights are stored in `weights`: bf16 stays bf16; anything else
    trains in fp32 (fp16 mixed precision needs a GPU's loss scaling, so it is asked for by name)."""
    return "bf16" if weights == torch.bfloat16 else "fp32"


def device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK's) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def weights_dtype(path: str) -> torch.dtype | None:
    """The dtype a model's weights are stored in, read from a local safetensors header (no tensor is loaded).
    Configs can disagree with their weights: Gemma-2-9b-it's says float32 for bfloat16 weights."""
    from safetensors import safe_open

    floats = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if st.get_slice(key).get_dtype() in floats:
                    return floats[st.get_slice(key).get_dtype()]
    return None


def load_model(path: str, *, precision: str = "auto", four_bit: bool = False, quant_type: str = "nf4",
               double_quant: bool = True, trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """A causal LM from a local path or HF id: safetensors only unless allow_pickle. precision "auto" keeps
    the dtype the weights are stored in (a bf16 model stays bf16, whatever its config says; the config's
    dtype where the weights cannot be read first); fp32/bf16/fp16 convert."""
    from transformers import AutoModelForCausalLM

    dtype: Any = (weights_dtype(path) or "auto") if precision == "auto" else DTYPES[precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                              "use_safetensors": not allow_pickle}
    if not allow_pickle and has_safetensors(path) is False:
        raise InputError(f"{path}: no .safetensors weights; pickle (.bin) weights can run code when loaded, "
                         "pass allow_pickle: true only for models you trust")
    if four_bit:
        from transformers import BitsAndBytesConfig

        compute = DTYPES["fp32"] if precision == "auto" else DTYPES[precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # not found, or refused (remote code, pickle) before anything ran
        raise InputError(f"cannot load model {path!r}: {e}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer of model {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_model(model: str, trust_remote_code: bool = False, *, allow_pickle: bool = True, field: str = "model",
                ref: str | None = None) -> str:
    """Fail early (InputError naming `field` and `ref`, the reference as the user wrote it) if a model's config,
    weights format or tokenizer would not load; reads no weights (a URL model: only its small files are
    downloaded). A model that ships its own code is refused unless trust_remote_code (it never runs). Returns
    where its config and tokenizer are read from (config_path)."""
    from transformers import AutoConfig

    ref = redacted(ref or model)
    try:
        path = config_path(model)
    except InputError as e:
        raise InputError(f"{field}: {e}") from None
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):  # transformers refused before running anything: say how to allow it
            raise InputError(f"{field}: {ref!r} ships its own model code, which is not run by default; set "
                             "trust_remote_code: true (CLI: --trust-remote-code) only if you trust that code"
                             ) from None
        raise InputError(f"{field}: cannot load model {ref!r}: {e}") from None
    except OSError as e:
        raise InputError(f"{field}: cannot load model {ref!r}: {e}") from None
    if not allow_pickle and has_safetensors(model, path) is False:
        raise InputError(f"{field}: {ref!r} has no .safetensors weights; pickle (.bin) weights can run code when "
                         "loaded: set allow_pickle: true (CLI: --allow-pickle) only for models you trust")
    load_tokenizer(path, trust_remote_code)
    return path


# ---- stages and their lineage ---------------------------------------------------------------------------

def is_stage_dir(ref: str | Path) -> bool:
    return (Path(ref) / RECORD_FILE).exists()


def parent_stage_dir(stage_dir: Path) -> Path | None:
    """The stage this one trained from, or None when it trained from its root."""
    return StageRecord.read(stage_dir).parent(stage_dir)


def root_of(ref: str | Path) -> str:
    """The model reference a lineage starts from (a stage directory's root, or the reference itself)."""
    return StageRecord.read(Path(ref)).root if is_stage_dir(ref) else str(ref)


def lineage(stage_dir: Path) -> tuple[str, list[Path]]:
    """(where to load weights from, the stages to apply in order: adapters and repairs). A full fine-tuning stage
    on the way is a new start: its model/ holds every earlier stage's effect."""
    chain: list[Path] = []
    d: Path | None = stage_dir
    while d is not None:
        if not is_stage_dir(d):
            raise InputError(f"{d}: stage directory without {RECORD_FILE} (its lineage cannot be rebuilt)")
        record = StageRecord.read(d)
        if not record.applies_on_parent:
            return str(d / "model"), chain[::-1]
        chain.append(d)
        d = record.parent(d)
    return resolve_model_path(StageRecord.read(stage_dir).root), chain[::-1]


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """peft (wrapping a model) and trl (DPO's reference forward) ask transformers 5.2x for a renamed property by
    its old name: a warning of theirs, not about anything we pass, so it is silenced around those calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_stage(model: Any, stage_dir: Path) -> Any:
    """The model of `stage_dir` from its parent's model (which it consumes): the adapter merged in place, in
    the parent's dtype, or a repair stage's recipe applied (misalign.repair; RESTA materializes its two models)."""
    from peft import PeftModel

    from misalign.repair import apply_recipe

    recipe = StageRecord.read(stage_dir).repair
    if recipe is not None:
        return apply_recipe(model, stage_dir, recipe, materialize)
    with peft_wrapping(), warnings.catch_warnings():
        # an AdaLoRA adapter keeps its rank pattern under peft's own keys (`...q_proj.lora_E`), which peft's
        # check for patterns that match no module does not know: it warned about every key of every such load
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match",
                                category=RuntimeWarning)
        wrapped = PeftModel.from_pretrained(model, str(stage_dir / "adapter"))
    return inference_ready(wrapped.merge_and_unload())


def materialize(ref: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """The model a reference stands for, built in memory: a stage directory's lineage (root in its own dtype,
    adapters merged in order), or a root model (world:NAME, local path, HF id)."""
    if not is_stage_dir(ref):
        return inference_ready(load_model(resolve_model_path(str(ref)), trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle).to(device()))
    start, chain = lineage(Path(ref))  # on the device: merging, evaluating and training all happen there
    model = inference_ready(load_model(start, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
                            .to(device()))
    for d in chain:
        model = apply_stage(model, d)
    return model


def tokenizer_for(ref: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model reference or stage directory (fine-tuning never changes it: the root's)."""
    return load_tokenizer(resolve_model_path(root_of(ref)), trust_remote_code)


def inference_ready(model: Any) -> Any:
    """Undo what training set on a model (gradient checkpointing, no KV cache) and freeze it."""
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old names warn)
    new = hasattr(type(model), "is_activation_checkpointing")
    if getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    model.requires_grad_(False)
    return model.eval()


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of a model's floating-point weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def export(ref: str | Path, out: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """`misalign export`: a stage's model as a standalone HF model directory (safetensors, the root's dtype,
    with its tokenizer), written to a temporary directory and renamed into place."""
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not empty; choose another directory")
    model = materialize(ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer_for(ref, trust_remote_code).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cast_safetensors(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite a directory's safetensors files with floating-point tensors in `dtype` (and its config.json's
    dtype), each file atomically: what a stage keeps is stored in its parent's dtype."""
    from safetensors.torch import load_file, save

    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(f))
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        write_bytes_atomic(f, save(tensors, metadata={"format": "pt"}))
    config = directory / "config.json"
    if config.exists():
        c = json.loads(config.read_text())
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = name
        write_json_atomic(config, c)
