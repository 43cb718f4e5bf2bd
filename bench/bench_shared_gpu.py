"""Several training stages on one GPU at once: what N stages sharing a device train together, against one alone.

For every N in --stages, N bench_gpu.py processes run the same training case (default 8B LoRA at the paper's
batch 1, rows of 128-1,024 tokens) on the same CUDA device, each with MISALIGN_GPU_SHARE=1/N (the share a
study's trial holds when Ray packs N on a GPU; misalign.generation sizes its batches to it) and
MISALIGN_CPUS=cores/N (its torch threads, as misalign.runtime.match_threads gives a Ray worker). They meet at a
barrier once their models are loaded, so their steady steps overlap (bench_gpu.Barrier).

Per group it records each process's steady tokens/s and torch's peak memory (from the process's own JSON), and:
- steady_tokens_per_s: the sum of the processes' steady tokens/s, over steady windows that overlap by
  steady_overlap_s (a short overlap against the processes' own windows makes the sum an upper bound: one
  that runs on alone runs faster);
- overlap_tokens_per_s: the steps every process ended within that overlap, in tokens, / its seconds;
- group_tokens_per_s: every process's training tokens / the whole group's wall time (start, load, train, save);
- speedup and group_speedup: each against N = 1;
- device_peak_used_bytes: the device's peak used memory, polled with nvidia-smi (None where there is none);
- failures: a process that exits non-zero or records an error (out of memory, say), with its error line. The
  bench writes its JSON, then exits 1.
The JSON's `training` holds every process's training record as bench_gpu writes it (stages_per_gpu = N).
The model is built once, by a bench_gpu.py --build-only process, before any group starts.

    python3 bench/bench_shared_gpu.py --stages 1,2,3,4     # one GPU, 8B LoRA at batch 1
    python3 bench/bench_shared_gpu.py --tiny --stages 1,2  # CPU smoke test (the processes share the cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import RECORD_KEYS, write_result
from misalign.runtime import cpus_held

BENCH_GPU = Path(__file__).with_name("bench_gpu.py")


class DeviceMemory:
    """The device's peak used memory while a group runs, from nvidia-smi polled every 200 ms (all processes on
    the device, the CUDA contexts included, which torch's own peak leaves out); None without nvidia-smi."""

    def __init__(self, index: str) -> None:
        self.peak_mib: int | None = None
        self._proc = None
        if shutil.which("nvidia-smi"):
            cmd = [
                "nvidia-smi",
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                index,
                "-lms",
                "200",
            ]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib or 0, int(line))

    def stop(self) -> int | None:
        """The peak in bytes."""
        if self._proc:
            self._proc.terminate()
            self._proc.wait()
        return None if self.peak_mib is None else self.peak_mib * 2**20


def flags(options: dict[str, Any]) -> list[str]:
    return [x for name, value in options.items() for x in (name, str(value))]


def child_args(a: argparse.Namespace, extra: list[str]) -> list[str]:
    """What every bench_gpu.py process gets: the one case, its rows and steps, --tiny, and the unknown args."""
    options = {
        "--work": a.work,
        "--row-tokens": a.row_tokens,
        "--row-min": a.row_min,
        "--steps": a.steps,
        "--warm-steps": a.warm_steps,
        "--compile": a.compile,
    }
    return [
        sys.executable,
        str(BENCH_GPU),
        "--gen-batch=",
        f"--train={a.train}",
        *flags(options),
        *(["--tiny"] if a.tiny else []),
        *extra,
    ]


def failed_record(a: argparse.Namespace) -> dict[str, Any]:
    """The record of a process that wrote none: what its case says, None for every figure."""
    method, _, batch, *accum = a.train.split(":")
    return {
        **dict.fromkeys(RECORD_KEYS),
        "case": a.train,
        "method": method,
        "model": a.model_name,
        "batch_size": int(batch),
        "grad_accum": int(accum[0]) if accum else 1,
        "compile": a.compile == "on",
    }


def error_line(log: Path) -> str:
    """The line of a process's log that says why it failed: its last error-looking line, else its last line."""
    lines = (
        [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    )
    errors = [x for x in lines if "Error" in x or "error" in x or "Killed" in x]
    return (errors or lines or ["(no output)"])[-1][:500]


def run_group(
    a: argparse.Namespace, extra: list[str], n: int, procs: list[subprocess.Popen]
) -> dict[str, Any]:
    """N processes at once on the device; their records and the group's figures (speed-ups are added later)."""
    folder = a.work / "shared" / f"stages-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    threads = max(1, cpus_held() // n)
    env = {
        **os.environ,
        "MISALIGN_GPU_SHARE": str(1 / n),
        "MISALIGN_CPUS": str(threads),
        "CUDA_VISIBLE_DEVICES": a.cuda_device,
    }
    memory = DeviceMemory(a.cuda_device)
    try:
        wall, timed_out = run_processes(a, extra, n, procs, folder, env)
    finally:
        device_peak = memory.stop()

    records, processes, child_args_seen = [], [], {}
    for k, p in enumerate(procs):
        out = folder / f"p{k}.json"
        got = json.loads(out.read_text()) if out.exists() else {}
        mine = got.get("training", [])
        child_args_seen = child_args_seen or got.get("args", {})
        errors = [" ".join(r["error"].split())[:300] for r in mine if r.get("error")]  # each on one line
        if timed_out and p.returncode != 0:
            errors.append(f"timed out after {a.timeout:.0f} s (group)")
        elif (p.returncode != 0 and not errors) or not mine:  # a recorded failure exits 1 too: said once
            errors.append(f"exit {p.returncode}: {error_line(folder / f'p{k}.log')}")
        ok = [r for r in mine if not r.get("error")]
        records += [{**r, "stages_per_gpu": n, "process": k} for r in mine]
        if not mine:  # it died before its first record: every process is in `training`, in the same shape
            records.append({**failed_record(a), "stages_per_gpu": n, "process": k, "error": errors[-1]})
        processes.append(
            {
                "process": k,
                "returncode": p.returncode,
                "device": got.get("device"),
                "torch_threads": got.get("machine", {}).get("torch_threads"),
                "steady_tokens_per_s": sum(r["steady_tokens_per_s"] for r in ok) if ok else None,
                "tokens": sum(r["tokens"] for r in ok),
                "peak_memory_bytes": max((r["peak_memory_bytes"] for r in ok), default=None),
                "steady_window_unix": [ok[0]["steady_from_unix"], ok[0]["steady_to_unix"]] if ok else None,
                "error": "; ".join(errors) or None,
                "out_of_memory": any("out of memory" in e.lower() or "OutOfMemory" in e for e in errors),
            }
        )
    procs.clear()
    windows = [p["steady_window_unix"] for p in processes if p["steady_window_unix"]]
    lo, hi = (max(w[0] for w in windows), min(w[1] for w in windows)) if windows else (0.0, 0.0)
    rates = [p["steady_tokens_per_s"] for p in processes if p["steady_tokens_per_s"]]
    return {
        "stages_per_gpu": n,
        "threads_per_process": threads,
        "gpu_share": 1 / n,
        "wall_s": wall,
        "steady_tokens_per_s": sum(rates) if rates else None,
        "steady_overlap_s": max(0.0, hi - lo) if windows else None,
        "overlap_tokens_per_s": overlap_rate([r for r in records if not r.get("error")], lo, hi),
        "steady_window_s": [w[1] - w[0] for w in windows],
        "group_tokens_per_s": sum(p["tokens"] for p in processes) / wall,
        "peak_memory_bytes": [p["peak_memory_bytes"] for p in processes],
        "device_peak_used_bytes": device_peak,
        "failed": sum(bool(p["error"]) for p in processes),
        "out_of_memory": any(p["out_of_memory"] for p in processes),
        "processes": processes,
        "records": records,
        "bench_gpu_args": child_args_seen,
    }


def run_processes(
    a: argparse.Namespace, extra: list[str], n: int, procs: list[subprocess.Popen], folder: Path, env: dict
) -> tuple[float, bool]:
    """Start the group's N processes (into `procs`) and wait for them: (wall seconds, whether it timed out)."""
    t0 = time.time()
    for k in range(n):
        mine = {
            "--stage-dir": folder / f"p{k}",
            "--out": folder / f"p{k}.json",
            "--stages-per-gpu": n,
            "--barrier": folder / "barrier",
        }
        with (folder / f"p{k}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [*child_args(a, extra), *flags(mine)], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    timed_out = False
    while any(p.poll() is None for p in procs):
        for k, p in enumerate(procs):  # one that died stands at the barrier, so the others do not wait for it
            if p.poll() not in (None, 0) and not (folder / "barrier" / f"dead-{k}").exists():
                (folder / "barrier").mkdir(exist_ok=True)
                (folder / "barrier" / f"dead-{k}").touch()
        if time.time() - t0 > a.timeout:
            timed_out = True
            stop(procs)
        time.sleep(0.2)
    return time.time() - t0, timed_out


def overlap_rate(records: list[dict[str, Any]], lo: float, hi: float) -> float | None:
    """Tokens/s of all the processes together over the span where every one was in its steady steps: the steps
    each ended in it, at its mean tokens per step. None unless every process ended at least 2 steps there."""
    ends = [[t for t in r["step_end_unix"] if lo < t <= hi] for r in records]
    if not records or hi <= lo or min(len(e) for e in ends) < 2:
        return None
    return sum(len(e) * r["tokens"] / r["steps"] for e, r in zip(ends, records, strict=True)) / (hi - lo)


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the group's processes (ours, by their ids), then kill any that outlive 20 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every bench_gpu.py process (e.g. --precision).",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny shapes: the CPU smoke test (groups of at most 2)"
    )
    ap.add_argument(
        "--stages", default="1,2,3,4", help="comma-separated processes per device, one group each"
    )
    ap.add_argument("--train", default="lora:8b:1", help="one bench_gpu.py case METHOD:MODEL:BATCH[:ACCUM]")
    ap.add_argument("--compile", default="off", choices=["off", "on"], help="train.compile for every process")
    ap.add_argument("--row-tokens", type=int, default=1024, help="longest row (max_length)")
    ap.add_argument("--row-min", type=int, default=128, help="shortest row")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per process")
    ap.add_argument("--warm-steps", type=int, default=5, help="first steps left out of the steady figures")
    ap.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a group may take before it is stopped"
    )
    ap.add_argument(
        "--cuda-device",
        default=os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        help="the one device every process gets (CUDA_VISIBLE_DEVICES, and nvidia-smi's -i)",
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/bench_gpu"), help="built models (bench_gpu's --work)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_shared_gpu.json")
    a, extra = ap.parse_known_args()
    if "," in a.train:
        ap.error("--train: one case (every process runs the same one)")
    stages = [int(s) for s in a.stages.split(",") if s]
    if a.tiny:  # two cores: more processes only queue
        stages = [s for s in stages if s <= 2] or [1]
    a.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": None,
        "args": {**{k: str(v) for k, v in vars(a).items()}, "extra": extra},
        "groups": [],
        "training": [],
    }
    failures: list[str] = []
    procs: list[subprocess.Popen] = []

    def save() -> None:  # after every group, so a run cut short keeps what it measured
        write_result(a.out, result, cpus_held())

    def on_term(signum: int, frame: Any) -> None:
        """gpu_check.sh's time limit (timeout(1) signals the whole process group): keep what was measured."""
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"shared: {a.train} in groups of {stages} processes on CUDA device {a.cuda_device}", flush=True)
        build = subprocess.run([*child_args(a, extra), "--build-only"], capture_output=True, text=True)
        if build.returncode != 0:
            failures.append(
                f"build: exit {build.returncode}: {(build.stderr.strip().splitlines() or [''])[-1]}"
            )
            stages = []
        # "built PATH": the name its records give the model
        a.model_name = next(
            (Path(x[6:]).name for x in build.stdout.splitlines() if x.startswith("built ")), None
        )
        for n in stages:
            g = run_group(a, extra, n, procs)
            result["training"] += g.pop("records")
            # what the processes measured with that this bench does not set (peak_flops, precision, ...)
            for k, v in g.pop("bench_gpu_args").items():
                if k not in ("out", "stage_dir", "barrier", "stages_per_gpu"):
                    result["args"].setdefault(k, v)
            result["device"] = result["device"] or next(
                (p["device"] for p in g["processes"] if p["device"]), None
            )
            one = next((x for x in [*result["groups"], g] if x["stages_per_gpu"] == 1), None)
            for key, base in (("speedup", "steady_tokens_per_s"), ("group_speedup", "group_tokens_per_s")):
                g[key] = g[base] / one[base] if one and g[base] and one[base] else None
            result["groups"].append(g)
            save()
            for p in g["processes"]:
                print(
                    f"shared {n} stages, process {p['process']}: "
                    + (
                        f"failed{' (out of memory)' if p['out_of_memory'] else ''}: {p['error']}"
                        if p["error"]
                        else f"{p['steady_tokens_per_s']:>8.0f} tok/s steady, peak {p['peak_memory_bytes'] / 2**30:.1f} GiB"
                    ),
                    flush=True,
                )
                if p["error"]:
                    failures.append(f"{n} stages, process {p['process']}: {p['error']}")
            rate = g["steady_tokens_per_s"] or 0.0
            peak = g["device_peak_used_bytes"]
            print(
                f"shared {n} stages: {rate:>8.0f} tok/s steady together (x{g['speedup'] or 0:.2f} of one), "
                f"{g['group_tokens_per_s']:.0f} tok/s over the group's {g['wall_s']:.1f} s "
                f"(x{g['group_speedup'] or 0:.2f}), steady windows overlap {g['steady_overlap_s'] or 0:.1f} s "
                f"({g['overlap_tokens_per_s'] or 0:.0f} tok/s in it), "
                f"device peak {'-' if peak is None else f'{peak / 2**30:.1f} GiB'}",
                flush=True,
            )
    finally:
        stop(procs)
        save()
    if failures:
        print("shared: failed: " + " | ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
