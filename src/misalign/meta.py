"""Models built from their configs on the meta device: exact parameter counts with no memory and no weights.

    models = MetaModels(trust_remote_code=False, model_configs={})
    arch = models.model_arch("world:base")        # Arch: the meta model, its counts, layers, d_model
    trainable, frozen_mm, trainable_mm = models.params("world:base", stage_cfg, steps)  # with the stage's adapter

The plan prices stages with these counts (misalign.plan) and the preflight checks that every stage's adapter
builds on its model (misalign.preflight), both without downloading weights. A config is the model's own, else
plan.model_configs[ref] (a local config.json: configs/models/ has the paper's models).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misalign.config import StageConfig
from misalign.errors import InputError


@dataclass
class Arch:
    """One model's architecture, built on the meta device."""

    config: Any                 # its transformers config
    source: str                 # where the config came from
    model: Any                  # the model on the meta device
    total: int                  # every parameter
    matmul: int                 # matmul weights (no embeddings, a tied head once): N of the FLOP formula
    layers: int
    d_model: int


class MetaModels:
    """Architectures by model reference, and parameter counts with a stage's adapter, each built once."""

    def __init__(self, trust_remote_code: bool, model_configs: dict[str, str]) -> None:
        self.trust_remote_code = trust_remote_code
        self.model_configs = model_configs
        self._arch: dict[str, Arch | None] = {}
        self._errors: dict[str, InputError] = {}
        self._params: dict[tuple, tuple[int, int, int]] = {}

    def arch(self, ref: str) -> Arch | None:
        """The model's architecture built on the meta device, or None when its config cannot be read."""
        if ref not in self._arch:
            try:
                self._arch[ref] = build_arch(ref, self.trust_remote_code, self.model_configs)
            except InputError as e:
                self._arch[ref] = None
                self._errors[ref] = e
        return self._arch[ref]

    def model_arch(self, ref: str) -> Arch:
        """A model that must be readable: its architecture, or the InputError that says why it cannot be read."""
        arch = self.arch(ref)
        if arch is None:
            raise self._errors[ref]
        return arch

    def params(self, ref: str, cfg: StageConfig, steps: int) -> tuple[int, int, int]:
        """(trainable, frozen matmul, trainable matmul) parameters of the model with this stage's adapter."""
        from misalign.ledger import matmul_params
        from misalign.methods import METHODS, peft_config

        method = METHODS[cfg.method]
        arch = self.model_arch(ref)
        if method.adapter == "full":
            return arch.total, 0, arch.matmul
        if method.repairs:  # trains nothing (misalign.repair)
            return 0, arch.matmul, 0
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


def build_arch(ref: str, trust_remote_code: bool, model_configs: dict[str, str]) -> Arch:
    """The model built from its config on the meta device: exact parameter counts, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from misalign.ledger import matmul_params

    config, source = model_config(ref, trust_remote_code, model_configs)
    archs = getattr(config, "architectures", None) or []
    auto = (AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs)
            else AutoModelForCausalLM)
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as e:
        raise InputError(f"cannot build model {ref!r} from its config ({source}): {first_line(e)}") from None
    frozen, trainable = matmul_params(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Arch(config=config, source=source, model=model, total=sum(p.numel() for p in model.parameters()),
                matmul=frozen + trainable, layers=int(text.num_hidden_layers), d_model=int(text.hidden_size))


def model_config(ref: str, trust_remote_code: bool, model_configs: dict[str, str]) -> tuple[Any, str]:
    """(transformers config, where it came from): the model's own, else model_configs[ref]."""
    from transformers import AutoConfig

    from misalign.models import config_path

    path = config_path(ref)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), (
            ref if path == ref else f"{ref} ({path})")
    except (OSError, ValueError) as e:
        reason = first_line(e)
    local = model_configs.get(ref)
    if local is None:
        raise InputError(f"cannot read the config of model {ref!r} ({reason}); set plan.model_configs[{ref!r}] "
                         "to a local config.json (configs/models/ has the paper's models)")
    file = _config_file(local)
    if file is None:
        raise InputError(f"plan.model_configs[{ref!r}]: {local} not found (relative paths are read from the "
                         "working directory or the repository)")
    try:
        return AutoConfig.from_pretrained(str(file), trust_remote_code=trust_remote_code), local
    except (OSError, ValueError) as e:
        raise InputError(f"plan.model_configs[{ref!r}]: {local} is not a usable model config: "
                         f"{first_line(e)}") from None


def config_dtype(config: Any) -> str | None:
    """The dtype a model config records (dtype, or torch_dtype before transformers 5), as train.precision
    names it."""
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if raw is None:
        return None
    name = str(raw).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def first_line(e: BaseException, limit: int = 100) -> str:
    """An error's first line, cut to `limit` characters: the reason a plan assumption or message quotes."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_file(path: str) -> Path | None:
    """A plan.model_configs path: absolute, relative to the working directory, or to the repository."""
    p = Path(path).expanduser()
    repo = Path(__file__).resolve().parents[2]  # src/misalign/meta.py -> the checkout (editable installs)
    for candidate in (p, Path.cwd() / p, repo / p):
        if candidate.is_file():
            return candidate
    return None
