"""The cost ledger of a stage: what was trained, on how many tokens, at what analytic FLOP cost.

FLOPs per token come from misalign.costs.token_flops (the formula is in that module's docstring): matmul
parameters only, a training token 4 * N_frozen + 6 * N_trainable + 3A, a no-grad token 2N + A.
Tokens are counted as they pass through the model (attention mask), so padding is not billed, and
reference-model forwards are counted apart from training forwards.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from misalign.costs import token_flops


@dataclass
class Ledger:
    method: str
    direction: str
    examples: int = 0
    epochs: float = 0.0
    optimizer_steps: int = 0
    tokens: int = 0            # training tokens (forward + backward)
    ref_tokens: int = 0        # no-grad forward tokens (reference model)
    flops: float = 0.0
    wall_s: float = 0.0
    device_s: float = 0.0      # wall seconds x workers (each worker holds one device)
    workers: int = 1
    device: str = "cpu"
    peak_memory_bytes: int = 0  # this stage's own peak (reset when it starts), the largest over workers
    bytes_written: int = 0      # what the stage stored: its adapter or weights and its records
    trainable_params: int = 0
    total_params: int = 0
    reused: bool = False       # the stage was not trained here: its result was found in the lineage cache
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) parameter counts of weights used in matmuls (all but embeddings and norms)."""
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    frozen = trainable = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions a parameter: use its full shape
            if id(p) in seen or len(shape) < 2:
                continue
            seen.add(id(p))
            n = int(torch.Size(shape).numel())
            if id(p) in emb_ids and not _is_output_head(model, p):
                continue
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
    return frozen, trainable


def _is_output_head(model: torch.nn.Module, p: torch.nn.Parameter) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head is not None and head.weight is p


class FlopCounter:
    """Counts tokens entering a model's forward and turns them into FLOPs (see module docstring).

    The hook never reads a device value: reading `mask.sum()` on every forward is a device->host sync that
    stalls the GPU's queue once per micro-batch (twice for DPO). It adds device tensors instead, and the totals
    are read once, when `tokens`, `ref_tokens` or `flops` is first asked for. FLOPs are linear in what is
    summed (tokens, and tokens x attention width), so the totals equal the per-forward sum exactly.

    A padding-free batch (trl `padding_free`/`packing`: one flattened row, `position_ids` restarting at 0 for
    each sequence, no attention mask) attends within each sequence only, so its attention width is each
    sequence's own length, not the packed row's: sum over sequences of len^2 = sum over tokens of (2 * pos + 1).
    For a single unpadded sequence both rules give len^2. Pad tokens are never billed: a padded batch's by its
    mask, a padding-free row's (train.pad_to_multiple_of) by their positions.
    """

    def __init__(self, model: torch.nn.Module, layers: int, d_model: int) -> None:
        self.model = model
        self.layers, self.d_model = layers, d_model
        self._params: tuple[int, int] | None = None
        # [grad tokens, grad token x width, no-grad tokens, no-grad token x width], on the inputs' device
        self._sums: torch.Tensor | None = None
        self._read: tuple[int, int, int, int] | None = None
        self._carried = (0, 0, 0, 0)  # the sums of the steps before a resumed checkpoint
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if self._params is None:  # after the adapter is attached, before training changes nothing
            self._params = matmul_params(self.model)
        if self._sums is None:
            self._sums = torch.zeros(4, dtype=torch.int64, device=ids.device)
        # n and width_sum are device tensors or Python ints; a Python int added to a device tensor is a kernel
        # argument, whereas torch.tensor(int, device="cuda") would copy from host memory and sync the stream
        n: torch.Tensor | int
        width_sum: torch.Tensor | int
        if mask is None and positions is not None and ids.shape[0] == 1:  # padding-free: sequences restart at 0
            pos = positions[0].to(torch.int64)
            # train.pad_to_multiple_of pads the flattened row with position 0 tokens, each a "sequence" of one
            # (trl's collator): a position 0 followed by another or ending the row. No real row is one token.
            starts = pos == 0
            pads = (starts & torch.cat([starts[1:], starts.new_ones(1)])).sum()
            n = ids.numel() - pads
            width_sum = (2 * pos + 1).sum() - pads
        elif mask is not None:
            n = mask.sum(dtype=torch.int64)
            width_sum = n * ids.shape[-1]
        else:
            n, width_sum = ids.numel(), ids.numel() * ids.shape[-1]
        at = 0 if torch.is_grad_enabled() else 2
        self._sums[at] += n if isinstance(n, int) else n.to(self._sums.device)
        self._sums[at + 1] += width_sum if isinstance(width_sum, int) else width_sum.to(self._sums.device)
        self._read = None

    def _totals(self) -> tuple[int, int, int, int]:
        if self._read is None:
            counted = (0, 0, 0, 0) if self._sums is None else tuple(int(v) for v in self._sums.tolist())
            self._read = tuple(a + b for a, b in zip(counted, self._carried, strict=True))
        return self._read

    def state(self) -> list[int]:
        """The sums so far, as a checkpoint keeps them: a stage resumed from it counts the steps before it too."""
        return list(self._totals())

    def carry(self, state: list[int]) -> None:
        """Start from a checkpoint's sums (`state()` of the run that saved it)."""
        self._carried, self._read = tuple(int(v) for v in state), None

    @property
    def tokens(self) -> int:
        return self._totals()[0]

    @property
    def ref_tokens(self) -> int:
        return self._totals()[2]

    @property
    def flops(self) -> float:
        tokens, widths, ref_tokens, ref_widths = self._totals()
        frozen, trainable = self._params or (0, 0)
        a, b = token_flops(frozen, trainable, self.layers, self.d_model, grad=True)
        ref_a, ref_b = token_flops(frozen, trainable, self.layers, self.d_model, grad=False)
        return tokens * a + b * widths + ref_tokens * ref_a + ref_b * ref_widths

    def close(self) -> None:
        self._handle.remove()


_CLEAR_REFS = "/proc/self/clear_refs"


def reset_peak_memory(device: torch.device) -> None:
    """Start a stage's peak-memory window: a process (a reused Tune actor) runs many stages, and each reports
    its own peak, not the largest of any stage before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(_CLEAR_REFS):
        with contextlib.suppress(OSError), open(_CLEAR_REFS, "w") as f:
            f.write("5")  # Linux: resets the peak resident set size (VmHWM) to the current one


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since `reset_peak_memory`: allocated device memory, or the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS (lifetime peak)
    return int(rss if sys.platform == "darwin" else rss * 1024)
