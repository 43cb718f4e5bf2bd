"""What the stage patches in transformers', peft's and Liger's objects to train faster, each undone or scoped to
its stage and each leaving every number as it was (tests/test_stage.py, tests/test_speedups.py):
- `layers_compiled`: train.compile, each decoder layer's forward compiled (and with "graphs" replayed as CUDA
  graphs) for the stage's training;
- `model_module_restored`: what Liger patched in a modeling module, undone after the stage;
- `module_walks_once`: the Trainer's per-step walks of the module tree, on lists made once;
- `quick_adapter_switch`: DPO's reference forward without peft's three walks per adapter switch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from misalign.errors import InputError


@contextlib.contextmanager
def model_module_restored(model: Any | None) -> Iterator[None]:
    """Undo, after training, what Liger patched in the model's modeling module (its RMSNorm and MLP classes,
    its RoPE function, a class's forward). Liger patches the module for every model built after it in the
    process, but a stage asks for its kernels for its own model only: a later stage in the same worker with
    train.liger_kernels false must get transformers' own layers. This model keeps its patched modules."""
    if model is None:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(base).__module__]
    names = dict(vars(module))
    classes = {c: dict(vars(c)) for c in names.values() if isinstance(c, type) and c.__module__ == module.__name__}
    try:
        yield
    finally:
        for name in set(vars(module)) - set(names):
            delattr(module, name)
        vars(module).update(names)
        for cls, attrs in classes.items():
            for name in set(vars(cls)) - set(attrs):
                delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value:
                    setattr(cls, name, value)


def decoder_layers(model: Any, setting: str = "train.compile") -> list[Any]:
    """The model's repeated decoder layers, which `setting` (train.compile, eval.compile) compiles; an input
    error naming it when there are none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise InputError(f"{setting}: {type(model).__name__} has no decoder layers that transformers marks "
                         f"as such (GradientCheckpointingLayer) to compile; set {setting} false")
    return layers


@contextlib.contextmanager
def layers_compiled(model: Any, on: bool | str) -> Iterator[None]:
    """train.compile: each decoder layer's forward compiled for the stage's training, as torchtune compiles its
    layers. All layers share one compiled graph per variant (with and without gradients, the first layer's
    input needing none under an adapter, a padding mask or none), so the compile costs about one layer's,
    whatever the depth; `dynamic` keeps one graph for every row length. Gradient checkpointing and hooks stay
    outside the compiled forward. The compiled forwards are instance attributes, removed when training ends:
    the model handed over for evaluation runs eager (generation's shapes would only compile again). Dynamo's
    in-memory graphs are dropped then too: a worker's later stages (other methods, other dropout) would add
    variants of the same layer code up to dynamo's recompile limit, past which it runs eager; the compiled
    kernels stay in inductor's on-disk cache for the next stage.

    `on` "graphs" (train.compile graphs, CUDA only): the compiled layers are also replayed as CUDA graphs
    (torch.compile's "reduce-overhead" mode): one launch per layer and step instead of one per kernel, for steps
    that launches bound (batch 1). The kernels stay dynamic; torch's cudagraph trees record a graph per row
    length, which train.pad_to_multiple_of keeps to a few. A layer's backward graph hands its parameters'
    gradients out in the graph's own memory, and autograd keeps the first micro-batch's as the parameter's .grad,
    which the next replay overwrites: accumulated micro-batches summed wrongly, silently, in older torch
    (pytorch#169545, #96693), and torch 2.13 raises an error instead. A hook hands autograd a copy, allocated
    outside the graphs."""
    if not on:
        yield
        return
    layers = decoder_layers(model)
    copies = [p.register_hook(torch.clone) for layer in layers for p in layer.parameters()
              if p.requires_grad] if on == "graphs" else []
    try:
        with forwards_compiled(layers, "reduce-overhead" if on == "graphs" else None):
            yield
    finally:
        for hook in copies:
            hook.remove()


@contextlib.contextmanager
def layer_parts_compiled(model: Any, on: bool) -> Iterator[None]:
    """generate(compile=True): every part of each decoder layer but its attention (the norms and the MLP)
    compiled for the call: a norm's elementwise kernels (power, mean, scale, casts) fuse into one, the MLP's
    activation and product into one; RoPE's stay apart, in the attention. The attention stays eager: it
    writes the KV cache under the layer's index, which compiled would be a constant of the graph, one recompile per layer until dynamo gives up,
    and the cache kinds (dynamic, static, bucketed) would each trace differently. All layers share each part's
    graphs; prefill and decode get one each. Undone, and dynamo's in-memory graphs dropped, after the call."""
    if not on:
        yield
        return
    parts = [child for layer in decoder_layers(model, "eval.compile") for child in layer.children()
             if "Attention" not in type(child).__name__]
    with forwards_compiled(parts):
        yield


@contextlib.contextmanager
def forwards_compiled(modules: list[Any], mode: str | None = None) -> Iterator[None]:
    """Each module's forward compiled (dynamic shapes) as an instance attribute, removed on exit, and dynamo's
    in-memory graphs dropped then (layers_compiled and layer_parts_compiled say why)."""
    for module in modules:
        module.forward = torch.compile(module.forward, dynamic=True, mode=mode)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
        torch.compiler.reset()


@contextlib.contextmanager
def module_walks_once(trainer: Any) -> Iterator[None]:
    """transformers' Trainer walks the whole module tree three times per step: `model.train()` on every
    micro-batch, `model.zero_grad()` after every optimizer step, and `floating_point_ops` on every micro-batch,
    which recounts the parameters for its own FLOP log. Under an adapter that is thousands of modules (2,665
    for a 32-layer model with LoRA on every linear layer: 7.9 CPU ms per micro-batch and 1.9 per optimizer step
    here, `bench_host.py --walks`), and at the paper's batch of 1 the host bounds a step. The stage's model
    keeps the same modules and parameters while it trains, so the three do the same work on lists made once
    (0.2 ms). Undone after training."""
    model = trainer.model
    modules, params = list(model.modules()), list(model.parameters())
    main_input = getattr(model, "main_input_name", "input_ids")
    non_embedding = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0

    def train(mode: bool = True) -> Any:
        for m in modules:
            vars(m)["training"] = mode  # a plain attribute: Module.__setattr__'s checks are most of the cost
        return model

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:  # the Trainer always sets to None; zeroing in place is Module's own
            return type(model).zero_grad(model, set_to_none)
        for p in params:
            p.grad = None

    def floating_point_ops(inputs: dict[str, Any]) -> int:  # transformers' own formula
        return 6 * inputs[main_input].numel() * non_embedding if main_input in inputs else 0

    model.train, model.zero_grad, trainer.floating_point_ops = train, zero_grad, floating_point_ops
    try:
        yield
    finally:
        del model.train, model.zero_grad, trainer.floating_point_ops


def quick_adapter_switch(model: Any) -> None:
    """DPO disables the adapter for every reference forward. peft's `disable_adapter` walks the whole model
    three times per call (a status report that formats every adapter layer, then off, then on again): 25 of
    172 CPU ms of a DPO step in bench/bench_host.py, and DPO steps are host-bound on a GPU. The stage's
    adapter layers never change, so the same switch is their flags, flipped on a list made once. peft's own
    switch also freezes the adapter's weights while it is off, which a reference forward under no_grad never
    needs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if any(m.disable_adapters for m in layers) or getattr(model, "modules_to_save", None):
        return  # not the plain all-enabled adapter this switch is exact for: keep peft's

    @contextlib.contextmanager
    def disable_adapter() -> Iterator[None]:
        for m in layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m in layers:
                m._disable_adapters = False

    model.disable_adapter = disable_adapter
