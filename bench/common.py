"""What both benchmarks share: a contention gauge and the JSON record of a run (machine, versions, date)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from misalign.runtime import cpus_held, package_versions

# what every training record of bench_gpu.py and bench_shared_gpu.py holds, a failed one as None (with an
# `error`): bench/calibrate.py reads these
RECORD_KEYS = ("method", "model", "total_params", "batch_size", "grad_accum", "row_tokens_mean", "row_tokens_max",
               "compile", "steady_mfu", "first_step_s", "steady_step_s", "stage_wall_s", "stages_per_gpu")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat): others = delta - ours."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def write_result(out: Path, payload: dict[str, Any], threads: int) -> None:
    """The benchmark's JSON, with the machine it ran on and when."""
    machine = {
        "cpus_held": cpus_held(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "versions": package_versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({**payload, "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2)
    )
    print(f"wrote {out}")
