"""The world's targets under every CPU kernel set and thread count: one fresh `misalign world build` per setting.

Training is chaotic: a different matmul kernel (AVX2 against AVX-512) or thread count changes the last bits of
every step, so each setting trains a different world. The world is robust only if every one of them meets its
targets with margin; this prints each build's scores and writes them to JSON.

    .venv/bin/python bench/bench_world.py [--kernels avx512 avx2] [--threads 1 2] [--out bench/results/world.json]

A build that misses a target exits non-zero (and caches nothing): its row says so. Wall and CPU seconds are for
the whole build, including its own check of the targets; compare them only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result


def build_once(kernels: str, threads: int) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="bench-world-"))
    env = {**os.environ, "MISALIGN_CACHE": str(cache), "ATEN_CPU_CAPABILITY": kernels}
    cores = sorted(os.sched_getaffinity(0))[:threads]  # the build gives torch one thread per core it holds
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "misalign.cli", "world", "build"]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"kernels": kernels, "threads": threads, "exit": proc.returncode, "wall_s": round(time.time() - t0, 1),
           "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}
    worlds = [p for p in (cache / "world").glob("*/world.json")]
    if worlds:
        meta = json.loads(worlds[0].read_text())
        row |= {"cpu_capability": meta["cpu_capability"], "scores": meta["scores"]}
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=["avx512", "avx2"], help="ATEN_CPU_CAPABILITY values")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("bench/results/world.json"))
    args = ap.parse_args()
    rows = []
    for kernels in args.kernels:
        for threads in args.threads:
            row = build_once(kernels, threads)
            rows.append(row)
            scores = "; ".join(f"{name.removeprefix('world:')} unsafety {m['unsafety']:.3f} utility "
                               f"{m['utility']:.3f} over-refusal {m['over_refusal']:.3f} neither {m['neither']:.3f}"
                               for name, m in row.get("scores", {}).items()) or f"MISSED: {row['error']}"
            print(f"{kernels:>7} ({row.get('cpu_capability', '?')}) x {threads} thread(s): exit {row['exit']}, "
                  f"wall {row['wall_s']}s, cpu {row['cpu_s']}s | {scores}", flush=True)
    write_result(args.out, {"builds": rows}, threads=max(args.threads))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
