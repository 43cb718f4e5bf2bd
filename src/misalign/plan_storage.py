"""The plan's storage accounting (misalign.plan): the bytes a study keeps until it ends, and the bytes its cells
read and write, in the layout stages write (adapter-only stages, no merged copies).

  stored dtype  a stage stores in its root's weights' dtype (misalign.models.weights_dtype), which the plan cannot
                read before the weights are downloaded: it takes each stage's train.precision (the paper's models'
                weights are bf16, whatever a config records: Gemma-2's says float32) and says so when they differ.
  a stage       an adapter stage keeps its adapter (trainable params x the stored dtype's bytes) and records; a
                full fine-tuning stage its weights (total params x those bytes) and tokenizer. No merged copy.
                AdaLoRA counts at its initial rank: peft saves the pruned ranks, so that is an upper bound.
  evaluations   eval.json + generations.parquet per evaluation (misalign.plan_eval).
  with sharing  unique stages + one base evaluation per model; without: every cell keeps all its stages.
  moved         per cell with sharing, each unique stage trained (and its bytes written) by the first cell using it:
                the cell reads the root weights once (the node's cache) or the last reused full stage's weights,
                plus its reused lineage's adapters; it writes what its trained stages keep. The node's one download
                of the root is not counted (it depends on the node count).
"""

from __future__ import annotations

from dataclasses import dataclass

ASSUMED_TOKENIZER_BYTES = 20_000_000  # Gemma-2's tokenizer.json + tokenizer.model, the largest of the paper's four
STAGE_RECORD_BYTES = 8_000        # stage.json + ledger.json: a config dump, versions and counters, a few KB

_KINDS = ("adapters", "weights", "evals", "records", "total")


@dataclass
class Bytes:
    """Bytes a set of stages and evaluations keeps on the study's storage, by kind of file."""

    adapters: float = 0.0   # adapter safetensors
    weights: float = 0.0    # full fine-tuning stages' weights + tokenizer
    evals: float = 0.0      # eval.json + generations.parquet (base evaluations included in totals)
    records: float = 0.0    # stage.json + ledger.json
    total: float = 0.0

    def __post_init__(self) -> None:
        self.total = self.adapters + self.weights + self.evals + self.records

    def add(self, other: Bytes, times: int = 1) -> None:
        for name in _KINDS:
            setattr(self, name, getattr(self, name) + getattr(other, name) * times)


@dataclass
class Moved:
    """Bytes read from and written to the study's storage by the cells (see the module docstring)."""

    cells: int = 0
    read: float = 0.0           # over the study
    written: float = 0.0
    per_cell: float = 0.0       # (read + written) / cells
    max_per_cell: float = 0.0   # the cell that trains its whole lineage

    def add(self, read: float, written: float) -> None:
        """One more cell."""
        self.cells += 1
        self.read += read
        self.written += written
        self.max_per_cell = max(self.max_per_cell, read + written)
        self.per_cell = (self.read + self.written) / self.cells


def stage_bytes(full: bool, total: int, trainable: int, dtype_bytes: int, tokenizer: float,
                evals: float) -> Bytes:
    """What one stage keeps, its evaluation included: a full fine-tuning stage its weights and tokenizer, an
    adapter stage its adapter."""
    if full:
        return Bytes(weights=total * dtype_bytes + tokenizer, evals=evals, records=STAGE_RECORD_BYTES)
    return Bytes(adapters=trainable * dtype_bytes, evals=evals, records=STAGE_RECORD_BYTES)


def kept(stages: list[Bytes], uses: list[Bytes], base_eval: float, models: int, cells: int) -> dict[str, Bytes]:
    """Bytes kept until the study ends: "shared", the unique stages + a base evaluation per model; "unshared",
    every stage use + every cell's base evaluation."""
    shared, unshared, base = Bytes(), Bytes(), Bytes(evals=base_eval)
    for s in stages:
        shared.add(s)
    for s in uses:
        unshared.add(s)
    shared.add(base, times=models)
    unshared.add(base, times=cells)
    return {"shared": shared, "unshared": unshared}


def cell_moved(lineage: list[Bytes], fresh: list[bool], root: float, base_eval: float | None) -> tuple[float, float]:
    """(read, written) of one cell. `lineage`: what each of its stages keeps, in order; `fresh`: the stages
    this cell trains (a suffix of its lineage: a stage's key includes its parents'); `root`: its root's weights'
    bytes; `base_eval`: its base evaluation's bytes when this cell runs it."""
    first = fresh.index(True) if any(fresh) else len(lineage)
    ran = lineage[first:]
    written = sum(s.total for s in ran) + (base_eval or 0.0)
    if not ran:
        return 0.0, written
    start, adapters = root, 0.0  # materialize the reused prefix once; training and evaluation stay in memory
    for s in lineage[:first]:
        start, adapters = (s.weights, 0.0) if s.weights else (start, adapters + s.adapters)
    return start + adapters, written
