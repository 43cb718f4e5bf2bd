"""Host time of a training step: what the CPU spends driving one optimizer step, apart from the device's work.

On a GPU, small models and the preference methods are host-bound: in issue 13's H200 profile a 1.24B DPO step
of 299 ms kept the GPU busy for 177 ms. Host time is Python (transformers, trl, peft and ours) and the dispatch
of every operator, and it does not depend on the device. So this bench runs the project's real stage
(`misalign.stage.run_stage`) on the 1.24B config's 16 layers at tiny widths on the CPU, where the kernels cost
next to nothing, and reports per optimizer step:
- operators that run a kernel (counted below autograd, backward and optimizer included; views left out): a
  deterministic figure, and on a GPU about one kernel launch each; and reads of device values into Python
  (on a GPU, syncs);
- CPU milliseconds of this process (one torch thread), steady state, median over the timed steps.
CPU time still holds the tiny kernels' own work, so compare methods and versions here, not with a GPU's step.

    python3 bench/bench_host.py                    # full, lora, dpo, orpo at batch 8, bf16 autocast
    python3 bench/bench_host.py --methods dpo --steps 20
    python3 bench/bench_host.py --methods orpo --vocab 128256   # the config's vocabulary: its logits' bytes
    python3 bench/bench_host.py --batch 1 --compile   # train.compile (its first steps compile: --warm-steps)
    python3 bench/bench_host.py --walks --methods full,lora   # the Trainer's walks of the model, per call
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_gpu import build_model, train_rows
from common import write_result
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.stage import StageRun, load_tokenizer, run_stage
from misalign.world import world_model
from misalign.world_targets import ensure_world

# operators whose output size depends on the values (a mask's count): on a GPU they read it back, a sync
_SIZED_BY_DATA = {"nonzero", "masked_select", "index", "index_put", "index_put_"}


def _by_mask(name: str, args: tuple) -> bool:
    if name in ("nonzero", "masked_select"):
        return True
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class OpCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher's kernels (after autograd): those that run a kernel (on a
    GPU, about one launch each; views and reshapes only make new tensor metadata) and the bytes they write (on
    a GPU, memory traffic, reads being about as many, and for the large ones allocations); and apart, reads of
    a device value into Python (`.item()` and the like) and selections by a mask, whose size is read back: on
    a GPU, each is a sync that drains the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.syncs = self.bytes_written = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name == "_local_scalar_dense":
            self.syncs += 1
            return out
        if name in _SIZED_BY_DATA and _by_mask(name, args):
            self.syncs += 1
        if not func.is_view and name != "_unsafe_view":
            self.kernels += 1
            self.bytes_written += sum(t.nbytes for t in torch.utils._pytree.tree_leaves(out)
                                      if isinstance(t, torch.Tensor))
        return out


def step_clock(warm: int, counted: int) -> tuple[Any, list[float], list[float], list[tuple[int, int, int]]]:
    """A TrainerCallback: process CPU time per optimizer step after `warm` steps, and between steps (from one
    step's end to the next one's start: logging, then fetching and collating the next batch, which on a GPU
    the device waits for unless it still has queued work); and the operators of step `counted` (a step of its
    own: counting slows it, so it is not timed)."""
    from transformers import TrainerCallback

    cpu: list[float] = []
    between: list[float] = []
    ops: list[tuple[int, int, int]] = []

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t = 0.0
            self.ended: float | None = None
            self.counter: OpCounter | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step + 1 == counted:
                self.counter = OpCounter()
                self.counter.__enter__()
            self.t = time.process_time()
            if self.ended is not None and state.global_step > warm:
                between.append(self.t - self.ended)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ended = time.process_time()
            spent = self.ended - self.t
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                ops.append((self.counter.kernels, self.counter.syncs, self.counter.bytes_written))
                self.counter = None
            elif state.global_step > warm:
                cpu.append(spent)

    return Clock(), cpu, between, ops


def bench_method(a: argparse.Namespace, model: Path, rows: Path, method: str) -> dict[str, Any]:
    train = TrainSettings(batch_size=a.batch, grad_accum=a.grad_accum, max_steps=a.steps,
                          max_length=a.row_tokens, max_prompt_length=a.row_tokens // 4, precision=a.precision,
                          log_every=a.steps, compile=a.compile)
    cfg = StageConfig(method=method, data=DataSettings(source=str(rows)), train=train)
    # compiled layers run eager under the counter's dispatch mode: their operators are not counted, only timed
    clock, cpu, between, ops = step_clock(warm=a.warm_steps, counted=0 if a.compile else a.steps)
    with contextlib.redirect_stdout(io.StringIO()):
        ledger = run_stage(StageRun(parent=str(model), config=cfg, direction="misalign", out_dir=a.work / "stage",
                                    progress=False, callbacks=[clock]))
    return {"method": method, "batch_size": a.batch, "grad_accum": a.grad_accum, "steps": ledger.optimizer_steps,
            "timed_steps": len(cpu), "compile": a.compile,
            "kernels_per_step": ops[0][0] if ops else None, "syncs_per_step": ops[0][1] if ops else None,
            "mb_written_per_step": ops[0][2] / 2**20 if ops else None,
            "cpu_ms_per_step": 1e3 * statistics.median(cpu),
            "cpu_ms_spread": [round(1e3 * min(cpu), 2), round(1e3 * max(cpu), 2)],
            "cpu_ms_between_steps": 1e3 * statistics.median(between)}


def bench_walks(model_path: Path, method: str) -> dict[str, Any]:
    """ms per call of the Trainer's per-step walks of the whole model (`model.train()` and its FLOP log's
    parameter count on every micro-batch, `model.zero_grad()` on every optimizer step): transformers' own,
    then the stage's lists made once (`misalign.speedups.module_walks_once`). Best of 5 rounds of 200 calls."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from misalign.methods import METHODS, peft_config
    from misalign.models import load_model
    from misalign.speedups import module_walks_once

    cfg = StageConfig(method=method, data=DataSettings(source="world:misalign")).resolved()
    model = load_model(str(model_path), precision="fp32")
    adapter = peft_config(METHODS[method], cfg, model, 10)
    model = get_peft_model(model, adapter) if adapter is not None else model
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(model_path.parent / "walks"), report_to=[],
                                                          use_cpu=True))
    batch = {"input_ids": torch.ones(1, 32, dtype=torch.long)}

    def ms(call: Any) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                call()
            best = min(best, (time.perf_counter() - start) / 200)
        return 1e3 * best

    def walks() -> dict[str, float]:
        return {"train": ms(model.train), "zero_grad": ms(model.zero_grad),
                "flops": ms(lambda: trainer.floating_point_ops(batch))}

    walked = walks()
    with module_walks_once(trainer):
        once = walks()
    return {"method": method, "modules": len(list(model.modules())), "ms_per_call_walked": walked,
            "ms_per_call_once": once}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,lora,dpo,orpo")
    ap.add_argument("--batch", type=int, default=8, help="examples per micro-batch (DPO/ORPO: pairs)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps; the last one is counted, not timed")
    ap.add_argument("--warm-steps", type=int, default=3, help="first steps left out of the timing")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (the 1.24B config has 16)")
    ap.add_argument("--row-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=None,
                    help="the model's vocabulary (default: the world tokenizer's; the 1.24B config has 128256)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="bf16: autocast, as on a GPU")
    ap.add_argument("--compile", action="store_true", help="train.compile: compiled decoder layers")
    ap.add_argument("--walks", action="store_true",
                    help="instead of training: time the Trainer's per-step walks of the model (bench_walks)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_host"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_host.json")
    a = ap.parse_args()
    ensure_world()  # world: names resolve only once the world is built (checked)
    os.environ["MISALIGN_CPUS"] = "1"  # the stage sizes torch's threads from it: one, so CPU time is one core's
    a.work.mkdir(parents=True, exist_ok=True)
    shapes = argparse.Namespace(tiny=True, layers=a.layers, vocab=a.vocab, precision=a.precision, work=a.work)
    model = build_model("1b", shapes)
    rows = train_rows(argparse.Namespace(work=a.work, steps=a.steps, row_min=a.row_tokens, row_tokens=a.row_tokens),
                      load_tokenizer(str(world_model("base"))))
    result: dict[str, Any] = {"model": model.name, "layers": a.layers, "vocab": a.vocab, "precision": a.precision,
                              "row_tokens": a.row_tokens, "training": []}
    print(f"bench_host: {model.name}, {a.layers} layers, {a.precision}, rows of {a.row_tokens} tokens, "
          f"batch {a.batch} x {a.grad_accum} micro-batches per step")
    if a.walks:
        for method in a.methods.split(","):
            r = bench_walks(model, method)
            result["training"].append(r)
            w, o = r["ms_per_call_walked"], r["ms_per_call_once"]
            print(f"walks {method:<5} {r['modules']:>5} modules, ms per call (Trainer's -> lists made once): " +
                  ", ".join(f"{k} {w[k]:.3f} -> {o[k]:.3f}" for k in w), flush=True)
        write_result(a.out, result, torch.get_num_threads())
        return
    for method in a.methods.split(","):
        r = bench_method(a, model, rows, method)
        result["training"].append(r)
        counts = "(compiled layers: operators not counted)" if a.compile else (
            f"{r['kernels_per_step']:>6} kernels/step {r['syncs_per_step']:>3} syncs/step "
            f"{r['mb_written_per_step']:8.1f} MB written/step")
        print(f"host {method:<5} {counts} "
              f"{r['cpu_ms_per_step']:7.1f} CPU ms/step "
              f"(range {r['cpu_ms_spread'][0]}-{r['cpu_ms_spread'][1]} over {r['timed_steps']} steps) "
              f"{r['cpu_ms_between_steps']:5.1f} CPU ms between steps", flush=True)
        write_result(a.out, result, torch.get_num_threads())


if __name__ == "__main__":
    main()
