"""Measured MFU per stage shape: the table `misalign study plan` prices stages with (plan.calibration).

One flat MFU misprices a study whose stages differ in shape: at the paper's batch of 1 a GPU may reach a third
of what it reaches at batch 8. A calibration table holds one row per measured shape, each from a bench run
(bench/calibrate.py turns bench_gpu.py's and bench_shared_gpu.py's JSON into rows):

    method                      the stage's method (misalign.methods.METHODS)
    params                      the model's total parameters
    batch, grad_accum           micro-batch rows and accumulated micro-batches per optimizer step
    row_tokens                  mean tokens of a training sequence
    stages_per_gpu              stages sharing the device at once (1/resources.gpus_per_worker)
    compile, cuda_graphs        decoder layers compiled, and replayed as CUDA graphs (train.compile as the stage
                                resolved it: true, or graphs)
    liger, packing,             train.liger_kernels, train.packing and train.gradient_checkpointing
    gradient_checkpointing
    device, peak_flops          the device measured and the peak its MFU is a share of
    mfu                         steady MFU of one stage (its own FLOPs / its steady time / peak_flops)
    overhead_s                  the stage's wall time that steady steps do not explain: loading, compiling,
                                the first steps, saving (stage wall - steps x steady step time)
    source                      where the row was measured (bench JSON, commit)

A stage of the plan uses the nearest row of its exact method, batch, grad_accum, stages_per_gpu, compile,
cuda_graphs, liger, packing and gradient checkpointing, within PARAMS_RATIO of its model's size and ROW_RATIO of
its sequence length; without one it is priced at the flat plan.mfu and the plan says so. Its wall time on one
worker is overhead_s + FLOPs / (peak x mfu).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import astuple, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from misalign.errors import InputError

PARAMS_RATIO = 1.5   # a row speaks for models up to 1.5x larger or smaller (8B for 7-9B, not 1B)
ROW_RATIO = 2.0      # and for mean sequence lengths within 2x of its own


@dataclass(frozen=True)
class StageShape:
    """What a stage's MFU depends on, as the plan knows it before anything runs."""

    method: str
    params: int
    batch: int
    grad_accum: int
    row_tokens: float
    stages_per_gpu: int
    compile: bool
    cuda_graphs: bool
    liger: bool
    packing: str
    gradient_checkpointing: bool

    def exact(self) -> tuple:
        """What a row must equal to speak for this shape (params and row_tokens need only be near)."""
        return (self.method, self.batch, self.grad_accum, self.stages_per_gpu, self.compile, self.cuda_graphs,
                self.liger, self.packing, self.gradient_checkpointing)

    def text(self) -> str:
        return (f"{self.method} {self.params / 1e9:.2g}B, batch {self.batch}x{self.grad_accum}, "
                f"{self.row_tokens:.0f} tok/row, {self.stages_per_gpu}/GPU, "
                f"{'CUDA graphs' if self.cuda_graphs else 'compiled' if self.compile else 'eager'}"
                + "".join(f", {x}" for x, on in (("liger", self.liger), (f"packing {self.packing}",
                                                                          self.packing != "none"),
                                                   ("checkpointing", self.gradient_checkpointing)) if on))


@dataclass(frozen=True)
class CalibrationRow(StageShape):
    """A measured shape: the device, its peak, and what the stage reached there."""

    device: str
    peak_flops: float
    mfu: float
    overhead_s: float
    source: str

    @property
    def shape(self) -> StageShape:
        return StageShape(*(getattr(self, f.name) for f in fields(StageShape)))

    def stage_seconds(self, flops: float, peak_flops: float) -> float:
        """Wall seconds of one worker's stage of `flops` at this row's MFU of `peak_flops`."""
        return self.overhead_s + flops / (peak_flops * self.mfu)


COLUMNS = tuple(f.name for f in fields(CalibrationRow))
_COLUMN_TYPES = {f.name: f.type for f in fields(CalibrationRow)}  # annotations as strings (postponed)


def shipped_tables() -> dict[str, Path]:
    """The tables the package ships (misalign/calibration/NAME.csv), by NAME."""
    folder = resources.files("misalign") / "calibration"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".csv")}


def table_path(ref: str) -> Path:
    """plan.calibration: a shipped table's name, or a path to a CSV file."""
    shipped = shipped_tables()
    if ref in shipped:
        return shipped[ref]
    path = Path(ref)
    if not path.is_file():
        raise InputError(f"plan.calibration: {ref!r} is neither a shipped table ({', '.join(sorted(shipped))}) nor "
                         "a CSV file; write one with bench/calibrate.py")
    return path


def _cell(value: str, column: str, where: str) -> Any:
    kind = _COLUMN_TYPES[column]
    try:
        if kind == "bool":
            if value.strip().lower() not in ("true", "false"):
                raise ValueError("not true or false")
            return value.strip().lower() == "true"
        out = {"int": int, "float": float, "str": str}[kind](value)
    except ValueError as e:
        raise InputError(f"{where}, column {column}: {value!r} is not a {kind} ({e})") from None
    if kind in ("int", "float") and not (math.isfinite(out) and out >= 0):
        raise InputError(f"{where}, column {column}: {value!r} must be a finite number >= 0")
    return out


def load_table(ref: str) -> list[CalibrationRow]:
    """The rows of plan.calibration; an input error names the file, its row and the column."""
    path = table_path(ref)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"plan.calibration: {path}: missing columns {', '.join(missing)} (needs: "
                             f"{', '.join(COLUMNS)})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            where = f"plan.calibration: {path}, row {line}"
            row = CalibrationRow(**{c: _cell(raw[c] or "", c, where) for c in COLUMNS})
            for column in ("mfu", "peak_flops", "params", "batch", "grad_accum", "row_tokens", "stages_per_gpu"):
                if not getattr(row, column) > 0:
                    raise InputError(f"{where}, column {column}: must be above 0")
            if row.mfu > 1:
                raise InputError(f"{where}, column mfu: {row.mfu} is above 1 (a share of peak_flops)")
            rows.append(row)
    if not rows:
        raise InputError(f"plan.calibration: {path} has no rows")
    return rows


def match(rows: list[CalibrationRow], shape: StageShape) -> CalibrationRow | None:
    """The row measured nearest to `shape` (see the module docstring), or None when none speaks for it."""
    def distance(r: CalibrationRow) -> float:
        return abs(math.log(r.params / shape.params)) + abs(math.log(r.row_tokens / shape.row_tokens))

    same = [r for r in rows
            if r.shape.exact() == shape.exact()
            and abs(math.log(r.params / shape.params)) <= math.log(PARAMS_RATIO) + 1e-12
            and abs(math.log(r.row_tokens / shape.row_tokens)) <= math.log(ROW_RATIO) + 1e-12]
    return min(same, key=distance) if same else None


def row_from_bench(record: dict[str, Any], args: dict[str, Any], device: str,
                   source: str) -> CalibrationRow | str:
    """One training record of bench/bench_gpu.py (or bench_shared_gpu.py) as a table row, or why it is none.
    The mean row length is measured: the record's row_tokens_mean, else its training tokens (padding not
    counted) per sequence of its full batches."""
    from misalign.methods import METHODS
    from misalign.objectives import OBJECTIVES

    if record.get("error") or record.get("steady_mfu") is None:
        return f"failed: {record.get('error') or 'no steady figures'}"
    if record.get("adapter_upcast") is False:
        return "peft's input up-cast off: a bench lever no stage setting turns off"
    method = record["method"]
    steps, step_s, batch = record["steps"], record["steady_step_s"], int(record["batch_size"])
    accum = int(record.get("grad_accum", 1))
    sequences = steps * batch * accum * OBJECTIVES[METHODS[method].objective].sequences_per_example
    return CalibrationRow(
        device=device, peak_flops=float(args["peak_flops"]), method=method, params=int(record["total_params"]),
        batch=batch, grad_accum=accum, row_tokens=record.get("row_tokens_mean") or record["tokens"] / sequences,
        stages_per_gpu=int(record.get("stages_per_gpu", 1)), compile=bool(record.get("compile") or False),
        cuda_graphs=record.get("compile") == "graphs",
        liger=bool(record.get("liger") or False), packing=str(record.get("packing") or "none"),
        gradient_checkpointing=str(args.get("gradient_checkpointing")) == "True",  # the bench stores str(args)
        mfu=float(record["steady_mfu"]), overhead_s=max(0.0, float(record["stage_wall_s"]) - steps * step_s),
        source=source)


def table_text(rows: list[CalibrationRow]) -> str:
    """The rows as CSV text, in the column order load_table reads."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        cells = astuple(r)
        writer.writerow([str(c).lower() if isinstance(c, bool) else (f"{c:.6g}" if isinstance(c, float) else c)
                         for c in cells])
    return out.getvalue()


def write_table(rows: list[CalibrationRow], path: Path) -> None:
    """Write the table atomically (a reader never sees half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(table_text(rows))
    tmp.replace(path)
