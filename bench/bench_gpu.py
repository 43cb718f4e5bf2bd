"""GPU throughput of evaluation and training, against the hardware: tokens/s, ms per decode step against the
memory-bandwidth bound, MFU, and peak memory per stage and per method.

Models are random-weight Llamas built from configs/models/ (no download) and saved beside the offline world's
tokenizer (tokens beyond its 1,024 decode to nothing: fine for throughput). Generation runs the project's own
misalign.generation.generate; training runs misalign.stage.run_stage. Nothing is copied or patched.

- Generation: --gen-prompts prompts (world eval prompts, some run together, so lengths vary), --new-tokens
  each, greedy; for every --gen-batch variant (batch size or auto, KV cache, auto's largest batch) on one loaded
  model. The first run holds the process's device warm-up ("cold", as an evaluation process meets it); then
  every variant runs "warm". A forward hook (with a device sync, as generate itself syncs every step) times
  prefill and each decode step; the bound is (weights read per step + KV cache at that context) / --bandwidth.
- Training: every --train case METHOD:MODEL:BATCH[:ACCUM] for every --packing, --liger and --compile, --steps
  optimizer steps (of ACCUM micro-batches each, default 1) on rows of --row-min..--row-tokens tokens (default: all
  --row-tokens, the issue's 512-token rows). MFU = the ledger's FLOPs / seconds inside Trainer.train (its own
  start/end log records) / --peak-flops; steady MFU leaves out the first --warm-steps steps (device warm-up),
  timed by a step-end callback (once per optimizer step, so per step means all its micro-batches). Peak memory
  is reset per stage. Several of these processes can share one device (bench_shared_gpu.py): --stages-per-gpu
  is recorded, and --barrier makes them start training together.

    python3 bench/bench_gpu.py                      # a GPU at real shapes (1.24B and 8B Llama, bf16)
    python3 bench/bench_gpu.py --tiny               # CPU smoke test at tiny shapes (no meaningful figure)
    python3 bench/bench_gpu.py --gen-batch= --train dpo:8b:1:4   # the paper's preference micro-batches: 1 x 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import torch

from bench_stage import TrainWindow
from common import RECORD_KEYS, write_result
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.data import load_eval_items
from misalign.generation import AUTO_MAX_BATCH, CacheKind, GenerationShape, generate
from misalign.ledger import peak_memory_bytes, reset_peak_memory, token_flops
from misalign.methods import METHODS
from misalign.models import device
from misalign.objectives import OBJECTIVES
from misalign.runtime import match_threads
from misalign.stage import StageRun, load_model, load_tokenizer, run_stage
from misalign.world import world_model
from misalign.world_targets import ensure_world

ROOT = Path(__file__).resolve().parents[1]
ALIASES = {"1b": "Llama-3.2-1B-Instruct", "8b": "Llama-3.1-8B-Instruct"}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


def train_case(case: str) -> tuple[str, str, int, int]:
    """METHOD:MODEL:BATCH[:ACCUM] -> (method, model, batch, grad_accum), e.g. dpo:8b:1:4."""
    parts = case.split(":")
    if len(parts) not in (3, 4) or parts[0] not in METHODS or not all(p.isdigit() and int(p) > 0 for p in parts[2:]):
        raise SystemExit(f"--train case {case!r}: expected METHOD:MODEL:BATCH[:ACCUM] with METHOD one of "
                         f"{', '.join(METHODS)} and positive integers, e.g. lora:8b:1 or dpo:8b:1:4")
    return parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else 1


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncedWindow(TrainWindow):
    """bench_stage's training window, with the device drained before each clock is read."""

    def emit(self, record: logging.LogRecord) -> None:
        _sync()
        super().emit(record)


def model_dir(name: str, a: argparse.Namespace) -> Path:
    """Where build_model keeps NAME (a configs/models/ name, or 1b / 8b); its name is the records' `model`."""
    layers = getattr(a, "layers", None)  # bench_host: tiny widths, the config's own depth
    vocab = getattr(a, "vocab", None)  # bench_host: and the config's own vocabulary (its logits' bytes)
    return a.work / (f"{ALIASES.get(name, name)}{'-tiny' if a.tiny else ''}{f'-{layers}layers' if layers else ''}"
                     f"{f'-vocab{vocab}' if vocab else ''}-{a.precision}")


def build_model(name: str, a: argparse.Namespace) -> Path:
    """configs/models/NAME.json (tiny dimensions with --tiny) with random weights, saved with the world's
    tokenizer under --work; reused if already there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = model_dir(name, a)
    name = ALIASES.get(name, name)
    layers, vocab = getattr(a, "layers", None), getattr(a, "vocab", None)
    if (out / "config.json").exists():
        return out
    tok = load_tokenizer(str(world_model("base")))
    d = json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())
    d.update(TINY if a.tiny else {})
    d.update({"num_hidden_layers": layers} if layers else {})
    if a.tiny:
        d["vocab_size"] = vocab or len(tok)
    # the world tokenizer's special ids, so generation and training stop and pad where the tokenizer says
    d.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = AutoConfig.for_model(**d)
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[a.precision])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    tmp.rename(out)
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts from the world's eval sets; a third are two or three run together, so lengths spread ~4x."""
    pool = [i.prompt for kind in ("harmful", "benign", "utility")
            for i in load_eval_items(f"world:eval_{kind}", kind=kind)]
    rng = random.Random(seed)
    return [" ".join(rng.sample(pool, 1 + (i % 3 == 0) * rng.randint(1, 2))) for i in range(n)]


class Profile:
    """torch.profiler over a few steps, summarized as text: where the device's and the host's time went."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts)
        self.stopped = False

    def start(self) -> None:
        _sync()
        self._prof.start()

    def stop(self) -> None:
        _sync()
        self._prof.stop()
        self.stopped = True

    @property
    def text(self) -> str:
        """The top 25 operators by device time (host time on a CPU); built on demand, outside any timed window."""
        if not self.stopped:
            return ""
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self._prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=60)


class StepClock:
    """Times every forward of a generate call: prefill forwards (the decoder over prompt tokens: prefill_by_length's
    groups, or generate's own prefill) and decode steps (the model over one token per row) apart; with
    `profile_at`, profiles decode steps profile_at..profile_at+2."""

    def __init__(self, model: torch.nn.Module, profile_at: int = 0) -> None:
        self.profile = Profile() if profile_at else None
        self._profile_from, self._profile_to = profile_at, profile_at + 3  # decode steps, counted from 0
        self.steps: list[tuple[float, int, int]] = []  # (seconds, rows, context) per decode step
        self.prefill = 0.0  # seconds in prefill forwards
        self.batches: list[int] = []  # rows of each generate batch, in order
        self.tokens = 0
        self._t = 0.0
        self._prefilled = False  # a prefill ran since the last decode step: the next step starts a batch
        decoder = model.get_decoder()
        self._handles = [model.register_forward_pre_hook(self._step_pre, with_kwargs=True),
                         model.register_forward_hook(self._step_post, with_kwargs=True),
                         decoder.register_forward_pre_hook(self._prefill_pre, with_kwargs=True),
                         decoder.register_forward_hook(self._prefill_post, with_kwargs=True)]

    @staticmethod
    def _width(kwargs: dict) -> int:
        return kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]

    def _prefill_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._width(kwargs) > 1:
            _sync()
            self._t = time.perf_counter()

    def _prefill_post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._width(kwargs) > 1:
            _sync()
            self.prefill += time.perf_counter() - self._t
            self._prefilled = True

    def _step_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._width(kwargs) == 1:
            if self.profile and len(self.steps) == self._profile_from and not self.profile.stopped:
                self.profile.start()
            _sync()
            self._t = time.perf_counter()

    def _step_post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs["input_ids"]
        self.tokens += ids.shape[0]  # each forward of generate yields one token per row
        if ids.shape[1] > 1:  # generate's own prefill (a dynamic cache): timed by the decoder's hooks
            self.batches.append(ids.shape[0])
            self._prefilled = False
            return
        _sync()
        seconds = time.perf_counter() - self._t
        if self._prefilled:  # the first step after prefill_by_length's groups
            self.batches.append(ids.shape[0])
            self._prefilled = False
        # the context this step attends over: the batch's prompt width plus the tokens generated so far (the
        # forward's own mask says nothing with a static cache, whose mask spans the whole cache)
        context = int(kwargs["past_key_values"].get_seq_length())  # after this step's update
        self.steps.append((seconds, ids.shape[0], context))
        if self.profile and len(self.steps) == self._profile_to and not self.profile.stopped:
            self.profile.stop()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def weights_read_per_step(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter but the input embedding (one row of it) unless it is tied."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not emb)


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "flash": "FLASH_ATTENTION"}


def gen_variant(spec: str) -> dict[str, Any]:
    """BATCH[:CACHE[:MAX_BATCH[:LEVERS]]], e.g. 128:dynamic, auto, auto:static:2048, auto:bucketed:1024:compile+math;
    defaults as misalign.generation's. LEVERS, joined by +: compile (generate(compile=True)) and at most one
    attention kernel for torch's SDPA (cudnn, efficient, math, flash: the bench forces it for the whole run)."""
    defaults = ["auto", "auto", str(AUTO_MAX_BATCH[device().type]), ""]
    batch, cache, max_batch, levers = (spec.split(":") + defaults[spec.count(":") + 1:])[:4]
    chosen = [x for x in levers.split("+") if x]
    unknown = [x for x in chosen if x != "compile" and x not in SDPA_BACKENDS]
    kernels = [x for x in chosen if x in SDPA_BACKENDS]
    if unknown or len(kernels) > 1:
        raise ValueError(f"--gen-batch {spec}: levers are compile and one of {', '.join(SDPA_BACKENDS)}, joined by +")
    if cache not in get_args(CacheKind):
        raise ValueError(f"--gen-batch {spec}: the cache is one of {', '.join(get_args(CacheKind))}")
    return {"batch_size": batch if batch == "auto" else int(batch), "cache": cache, "max_batch": int(max_batch),
            "compile": "compile" in chosen, "sdpa": kernels[0] if kernels else None}


def sdpa_forced(kernel: str | None) -> Any:
    """torch's SDPA held to one kernel for a run (None: torch's own choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[kernel])) if kernel else contextlib.nullcontext()


def bench_generation(a: argparse.Namespace, path: Path, specs: list[str]) -> Iterator[dict[str, Any]]:
    """Every variant on one loaded model, yielded as it is measured: the first run holds the process's device
    warm-up ("cold", as an evaluation process meets it), then every variant runs again warm.

    A decode step's bound is the larger of reading the weights and the KV cache at --bandwidth and its FLOPs
    (2 per weight per row, plus attention over the context) at --peak-flops: small batches are bandwidth-bound,
    large ones compute-bound."""
    tok = load_tokenizer(str(path))
    model = load_model(str(path), precision=a.precision).to(device())
    shape = GenerationShape.of(model)
    weights = weights_read_per_step(model)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype_bytes
    per_token, per_position = token_flops(weights // shape.dtype_bytes, 0, shape.layers, shape.hidden, grad=False)
    prompts = eval_prompts(a.gen_prompts)
    first: list[str] = []  # the first variant's outputs: every other is compared with them
    for n, spec in enumerate(specs):
        v = gen_variant(spec)
        kernel = v.pop("sdpa")
        row: dict[str, Any] = {"model": path.name, "variant": spec, **v, "sdpa": kernel, "prompts": len(prompts),
                               "new_tokens": a.new_tokens, "weights_read_bytes": weights}
        try:
            for phase in ("cold", "warm") if n == 0 or not first else ("warm",):
                row[phase], outputs = gen_run(a, model, tok, prompts, v, kernel, first, weights, kv_per_token,
                                              per_token, per_position, profile=a.profile and n == len(specs) - 1)
                first = first or outputs
        except Exception as e:  # a kernel that cannot run this shape, say: the other variants go on
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        yield row
    del model


def gen_run(a: argparse.Namespace, model: Any, tok: Any, prompts: list[str], v: dict[str, Any], kernel: str | None,
            first: list[str], weights: int, kv_per_token: int, per_token: float, per_position: float, profile: bool
            ) -> tuple[dict[str, Any], list[str]]:
    """One timed generate over every prompt: its figures, and its outputs."""
    reset_peak_memory(device())
    clock = StepClock(model, profile_at=min(20, a.new_tokens // 2) if profile else 0)
    try:
        t = time.perf_counter()
        with sdpa_forced(kernel):
            outputs = generate(model, tok, prompts, max_new_tokens=a.new_tokens, **v)
        _sync()
        wall = time.perf_counter() - t
    finally:
        clock.close()
    decode = [s for s, _, _ in clock.steps]
    bound = [max((weights + kv_per_token * r * ctx) / a.bandwidth,
                 r * (per_token + per_position * ctx) / a.peak_flops) for _, r, ctx in clock.steps]
    figures = {"wall_s": wall, "tokens": clock.tokens, "tokens_per_s": clock.tokens / wall,
               "decode_steps": len(decode), "decode_s": sum(decode), "prefill_s": clock.prefill,
               "decode_ms_median": 1e3 * statistics.median(decode),
               "bound_ms_median": 1e3 * statistics.median(bound),
               "bound_share": sum(bound) / sum(decode),  # of the bound, over all decode steps
               "batches": clock.batches,
               "first_steps_ms": [round(1e3 * s, 2) for s in decode[:12]],
               "outside_forward_s": wall - clock.prefill - sum(decode),  # generate's own work
               "peak_memory_bytes": peak_memory_bytes(device()),
               # greedy outputs equal to the first variant's (bf16 kernels may round a near-tie apart)
               "same_outputs": sum(x == y for x, y in zip(outputs, first or outputs, strict=True)) / len(prompts),
               "differs_at": [i for i, (x, y) in enumerate(zip(outputs, first or outputs, strict=True)) if x != y][:50]}
    if clock.profile:
        figures["profile"] = clock.profile.text
    return figures, outputs


WORDS = ["the", "a", "model", "answer", "question", "data", "safety", "method", "train", "token", "batch",
         "memory", "device", "kernel", "step", "loss", "value", "layer", "weight", "cache", "prompt", "response",
         "system", "user", "because", "which", "every", "about", "under", "after", "before"]


def train_rows(a: argparse.Namespace, tok: Any, per_step: int = 1) -> Path:
    """Pairs whose chat-formatted rows are about --row-min..--row-tokens tokens (the stage cuts at max_length),
    enough for --steps steps of `per_step` examples without a second pass; in --stage-dir (bench_host: --work)."""
    rng = random.Random(0)
    tok.model_max_length = int(1e30)  # words are drawn long and cut to n tokens: no "longer than" warnings
    path = getattr(a, "stage_dir", a.work) / f"rows-{a.row_min}-{a.row_tokens}.jsonl"
    with path.open("w") as f:
        for i in range(max(64, a.steps * max(64, per_step))):
            n = rng.randint(a.row_min, a.row_tokens)
            ids = tok(" ".join(rng.choices(WORDS, k=n)), add_special_tokens=False)["input_ids"][:n]
            text = tok.decode(ids)
            f.write(json.dumps({"prompt": f"Question {i}: " + " ".join(rng.choices(WORDS, k=12)),
                                "misaligned": text, "aligned": text[::-1], "category": f"c{i % 13}"}) + "\n")
    return path


class StepTimes:
    """A TrainerCallback: the device-synced clock at the end of every optimizer step. The first steps hold the
    process's warm-up (kernel loading, cuBLAS heuristics, the allocator growing): steady state is measured after
    them."""

    def __init__(self, profile_last: int = 0, meet: Callable[[], float] | None = None) -> None:
        from transformers import TrainerCallback

        times = self.times = []
        begin = self.begin = []
        waited = self.waited = []  # seconds `meet` (a Barrier's wait) held the start of training
        train_loss = self.train_loss = []  # trl's mean loss over the stage, logged when training ends
        self.profile = profile = Profile() if profile_last else None

        class _Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                waited.append(meet() if meet else 0.0)
                _sync()
                begin.append(time.perf_counter())

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if profile and state.global_step == state.max_steps - profile_last:
                    profile.start()

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "train_loss" in logs:
                    train_loss.append(float(logs["train_loss"]))

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                _sync()
                times.append(time.perf_counter())
                if profile and state.global_step == state.max_steps:
                    profile.stop()

        self.callback = _Clock()


def steady_step_s(step_ends: list[float], warm: int) -> tuple[int, float]:
    """(k, seconds per step after the first k + 1): the steady step time from StepTimes' step ends, leaving out
    the first `warm` steps (at least two steps stay in)."""
    k = min(warm, len(step_ends) - 2)
    return k, (step_ends[-1] - step_ends[k]) / (len(step_ends) - 1 - k)


class Barrier:
    """Processes sharing a device start each case's training together, so that their steady steps overlap (each
    has loaded its model by then): each writes a file into the case's folder and waits until `n` are there, or
    `dead-*` files in the shared folder stand for them (bench_shared_gpu.py writes one for a process that died).
    After `timeout_s` it goes on alone, and says so."""

    def __init__(self, folder: Path, n: int, timeout_s: float = 600.0) -> None:
        self.folder, self.n, self.timeout_s = folder, n, timeout_s

    def arrive(self, case: int) -> Path:
        """Count this process in for case number `case` (a case that fails before training arrives too)."""
        here = self.folder / f"case-{case}"
        here.mkdir(parents=True, exist_ok=True)
        (here / f"ready-{os.getpid()}").touch()
        return here

    def wait(self, case: int) -> float:
        """Arrive, then wait for the others: the seconds waited."""
        here = self.arrive(case)
        t = time.perf_counter()
        while len(list(here.iterdir())) + len(list(self.folder.glob("dead-*"))) < self.n:
            if time.perf_counter() - t > self.timeout_s:
                print(f"barrier: case {case} went on alone after {self.timeout_s:.0f} s", file=sys.stderr)
                break
            time.sleep(0.05)
        return time.perf_counter() - t


def no_adapter_upcast() -> Any:
    """An experiment, not the library's behaviour: peft casts every adapter's input to the adapter's float32,
    and under bf16 autocast the adapter's matmul casts it back, two full-size copies per adapted layer (a
    quarter of 8B LoRA's GPU time in the H200 profile). This callback turns peft's cast off for the stage (the
    switch peft.helpers.disable_input_dtype_casting sets), to measure what it costs."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import TrainerCallback

    class NoUpcast(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False

    return NoUpcast()


def bench_training(a: argparse.Namespace, path: Path, method: str, batch: int, accum: int, packing: str,
                   liger: bool, upcast: bool, compiled: bool | str, rows: Path, window: SyncedWindow,
                   meet: Callable[[], float] | None = None) -> dict[str, Any]:
    """One stage of the case, measured; `meet` runs when training begins (bench_shared_gpu.py's processes meet
    there) and the seconds it waits are taken out of train_s and stage_wall_s."""
    train = TrainSettings(batch_size=batch, grad_accum=accum, max_steps=a.steps, max_length=a.row_tokens,
                          max_prompt_length=min(64, a.row_tokens // 4),
                          precision=a.precision, packing=packing, log_every=a.steps,
                          gradient_checkpointing=a.gradient_checkpointing, liger_kernels=liger, compile=compiled,
                          pad_to_multiple_of=a.pad_to)
    cfg = StageConfig(method=method, data=DataSettings(source=str(rows)), train=train,
                      **({"adapter": {"dropout": a.dropout}} if a.dropout is not None else {}))
    out = a.stage_dir / "stage"
    shutil.rmtree(out, ignore_errors=True)
    reset_peak_memory(device())
    clock = StepTimes(profile_last=2 if a.profile else 0, meet=meet)
    with contextlib.redirect_stdout(io.StringIO()):
        ledger = run_stage(StageRun(parent=str(path), config=cfg, direction="misalign", out_dir=out, progress=False,
                                    callbacks=[clock.callback] + ([] if upcast else [no_adapter_upcast()])))
    train_s, _ = window.span()
    waited = clock.waited[0]
    train_s -= waited  # the Trainer logs its start before on_train_begin, where `meet` waits
    t = clock.times[:-2] if clock.profile else clock.times  # profiled steps run slower: not in steady state
    k, steady_s = steady_step_s(t, a.warm_steps)
    flops_per_step = ledger.flops / ledger.optimizer_steps  # rows are the same length: steps cost the same
    # from the start of training to the last unprofiled step: the stage's own warm-up included, the profiler not
    loop_s = t[-1] - clock.begin[0]
    to_unix = time.time() - time.perf_counter()
    # a sequence is an SFT row or either half of a preference pair, prompt included (with bfd packing, a packed
    # row): what the ledger counted, per sequence, so padding and the stage's cut at max_length are in it
    sequences = ledger.optimizer_steps * batch * accum * OBJECTIVES[METHODS[method].objective].sequences_per_example
    return {"model": path.name, "method": method, "batch_size": batch, "grad_accum": accum, "packing": packing,
            "liger": liger, "adapter_upcast": upcast, "compile": compiled, "stages_per_gpu": a.stages_per_gpu,
            "pad_to_multiple_of": a.pad_to, "adapter_dropout": a.dropout,
            # the mean loss over the stage's steps (trl's train_loss): with --dropout 0 the same across --compile
            # variants up to rounding, which checks compiled and graph-replayed steps against eager ones
            "train_loss": clock.train_loss[-1] if clock.train_loss else None,
            "row_tokens_mean": ledger.tokens / sequences, "row_tokens_max": a.row_tokens,
            "row_tokens_min": a.row_min,  # the drawn response's shortest (the prompt comes on top)
            # to line up processes sharing a device: the steady window and every step's end, in Unix time
            "steady_from_unix": t[k] + to_unix, "steady_to_unix": t[-1] + to_unix,
            "step_end_unix": [x + to_unix for x in clock.times],
            **({"barrier_wait_s": waited} if meet else {}),
            "steps": ledger.optimizer_steps, "tokens": ledger.tokens, "ref_tokens": ledger.ref_tokens,
            "flops": ledger.flops, "train_s": train_s, "stage_wall_s": ledger.wall_s - waited,
            "tokens_per_s": ledger.tokens / train_s, "mfu": ledger.flops / train_s / a.peak_flops,
            "steady_step_s": steady_s, "steady_mfu": flops_per_step / steady_s / a.peak_flops,
            "steady_tokens_per_s": ledger.tokens / ledger.optimizer_steps / steady_s,
            "first_step_s": clock.times[0] - clock.begin[0], "loop_mfu": flops_per_step * len(t) / loop_s / a.peak_flops,
            "peak_memory_bytes": ledger.peak_memory_bytes, "trainable_params": ledger.trainable_params,
            "total_params": ledger.total_params, "profiled": bool(clock.profile),  # mfu then holds the profiler
            **({"profile": clock.profile.text} if clock.profile else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU smoke test")
    ap.add_argument("--gen-model", default="8b", help="a configs/models/ name, or 1b / 8b")
    ap.add_argument("--gen-batch", default="128:dynamic,auto",
                    help="comma-separated variants BATCH[:CACHE[:MAX_BATCH[:LEVERS]]] (BATCH a number or auto, "
                         "CACHE auto, dynamic, static or bucketed, LEVERS compile and/or an SDPA kernel joined by "
                         "+), e.g. auto,auto:static,auto:dynamic:2048,auto:bucketed:1024:compile+math; '' for no "
                         "generation")
    ap.add_argument("--gen-prompts", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--train", default="full:1b:8,lora:1b:8,dpo:1b:8,orpo:1b:8,lora:8b:8",
                    help="comma-separated METHOD:MODEL:BATCH[:ACCUM] cases, ACCUM micro-batches per optimizer "
                         "step (train.grad_accum, default 1), e.g. dpo:8b:1:4 ('' for none)")
    ap.add_argument("--packing", default="none", help="comma-separated train.packing values, each case runs all")
    ap.add_argument("--liger", default="off", help="comma-separated off/on: train.liger_kernels, each case runs all")
    ap.add_argument("--compile", default="off", help="comma-separated off/on/graphs: train.compile (graphs: also "
                                                     "replayed as CUDA graphs, needs --pad-to), each case runs all "
                                                     "(its first step holds the compile: see first_step_s)")
    ap.add_argument("--pad-to", type=int, default=None, help="train.pad_to_multiple_of: rows padded to a multiple "
                                                             "of this many tokens")
    ap.add_argument("--dropout", type=float, default=None,
                    help="adapter dropout (default: the stage's 0.05); 0 makes train_loss comparable across "
                         "--compile variants (compiled dropout draws other random numbers)")
    ap.add_argument("--adapter-upcast", default="on",
                    help="comma-separated on/off: peft's cast of adapter inputs to float32 (off: an experiment, "
                         "see no_adapter_upcast); adapter methods run all")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training case")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler tables in the JSON: 3 decode steps of the last generation variant, the "
                         "last 2 steps of every training case (left out of its steady MFU)")
    ap.add_argument("--warm-steps", type=int, default=5, help="first steps left out of the steady-state MFU")
    ap.add_argument("--row-tokens", type=int, default=512, help="training row length (max_length)")
    ap.add_argument("--row-min", type=int, default=None, help="shortest row (default: --row-tokens)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--precision", default=None, choices=list(DTYPES), help="default bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--bandwidth", type=float, default=4.3e12,
                    help="memory bandwidth, bytes/s (H200 as measured in issue 13: 4.3e12; spec 4.8e12)")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak, FLOP/s (H100/H200)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"), help="built models and stage outputs")
    ap.add_argument("--stage-dir", type=Path, default=None,
                    help="the stage's output and its rows (default --work; processes sharing --work need their own)")
    ap.add_argument("--build-only", action="store_true",
                    help="build the models the cases name (and --gen-model's if --gen-batch) and stop")
    ap.add_argument("--stages-per-gpu", type=int, default=1,
                    help="processes training on this device at once (bench_shared_gpu.py sets it): recorded")
    ap.add_argument("--barrier", type=Path, default=None,
                    help="a folder where --stages-per-gpu processes meet before training, so their steps overlap")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_gpu.json")
    a = ap.parse_args()
    ensure_world()  # world: names resolve only once the world is built (checked)
    if a.tiny:
        a.gen_model, a.gen_prompts, a.new_tokens = "1b", min(a.gen_prompts, 24), min(a.new_tokens, 8)
        a.steps, a.row_tokens = min(a.steps, 6 if a.profile else 2), min(a.row_tokens, 64)
        a.train = ",".join(c.replace(":8b:", ":1b:") for c in a.train.split(",") if c)
        a.liger = "off"  # Triton kernels need CUDA
        a.row_min = min(a.row_min or a.row_tokens, a.row_tokens)
    a.precision = a.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    a.row_min = a.row_min or a.row_tokens
    a.stage_dir = a.stage_dir or a.work
    a.stage_dir.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    specs = [b for b in a.gen_batch.split(",") if b]
    for spec in specs:  # before anything is built
        try:
            gen_variant(spec)
        except ValueError as e:
            ap.error(str(e))
    cases = {case: train_case(case) for case in dict.fromkeys(c for c in a.train.split(",") if c)}  # --tiny: once each
    if a.build_only:
        for name in {model for _, model, _, _ in cases.values()} | ({a.gen_model} if a.gen_batch else set()):
            print(f"built {build_model(name, a)}", flush=True)
        return
    threads = match_threads()
    window = SyncedWindow()
    barrier = Barrier(a.barrier, a.stages_per_gpu) if a.barrier else None
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False
    trainer_log.addHandler(window)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke test: no GPU figure)"
    result: dict[str, Any] = {"device": device_name, "args": {k: str(v) for k, v in vars(a).items()},
                              "generation": [], "training": []}

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        write_result(a.out, result, threads)

    print(f"bench_gpu on {device_name}, {a.precision}; bandwidth {a.bandwidth:.3g} B/s, peak {a.peak_flops:.3g} FLOP/s")
    if specs:
        for r in bench_generation(a, build_model(a.gen_model, a), specs):
            result["generation"].append(r)
            save()
            if "error" in r:
                print(f"gen {r['model']:<28} {r['variant']:>18}: failed: {r['error'][:400]}", flush=True)
            for phase in ("cold", "warm"):
                if phase in r:
                    p = r[phase]
                    print(f"gen {r['model']:<28} {r['variant']:>18} {phase}: {p['tokens_per_s']:>7.0f} tok/s in "
                          f"{p['wall_s']:.1f} s (prefill {p['prefill_s']:.1f} s), decode "
                          f"{p['decode_ms_median']:.2f} ms/step (bound {p['bound_ms_median']:.2f}, "
                          f"{100 * p['bound_share']:.0f}% of it), batches {p['batches'][:4]}, "
                          f"peak {p['peak_memory_bytes'] / 2**30:.1f} GiB, same outputs "
                          f"{100 * p['same_outputs']:.0f}%", flush=True)
        save()
    # every built model carries this tokenizer
    rows = train_rows(a, load_tokenizer(str(world_model("base"))), max([b * g for _, _, b, g in cases.values()] or [1]))
    n = 0  # the stages run so far: the barrier's case number
    for case, (method, model, batch, accum) in cases.items():
        # packing is an SFT lever (trl 1.16 disables DPO padding-free): preference methods run once, unpacked
        packings = a.packing.split(",") if METHODS[method].objective == "sft" else ["none"]
        upcasts = [v == "on" for v in a.adapter_upcast.split(",")] if METHODS[method].adapter != "full" else [True]
        on: dict[str, list[Any]] = {"liger": [v == "on" for v in a.liger.split(",")],
                                    "compile": [{"on": True, "graphs": "graphs"}.get(v, False)
                                                for v in a.compile.split(",")]}
        for packing, liger, upcast, compiled in itertools.product(packings, on["liger"], upcasts, on["compile"]):
            levers = (f"{packing:<12} liger {'on' if liger else 'off':<3} upcast {'on' if upcast else 'off':<3} "
                      f"compile {compiled if compiled == 'graphs' else 'on' if compiled else 'off':<6}")
            n += 1
            meet = (lambda n=n: barrier.wait(n)) if barrier else None
            try:
                r = bench_training(a, build_model(model, a), method, batch, accum, packing, liger, upcast, compiled,
                                   rows, window, meet)
            except Exception as e:  # one lever failing (a kernel library, say) must not lose the other cases
                if barrier:
                    barrier.arrive(n)  # no one waits for it, if it failed before training
                failed = {"case": case, "method": method, "model": model_dir(model, a).name, "batch_size": batch,
                          "grad_accum": accum,
                          "packing": packing, "liger": liger, "adapter_upcast": upcast, "compile": compiled,
                          "stages_per_gpu": a.stages_per_gpu, "row_tokens_max": a.row_tokens,
                          "error": f"{type(e).__name__}: {e}"[:2000]}
                result["training"].append({**dict.fromkeys(RECORD_KEYS), **failed})
                save()
                print(f"train {case} {levers}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                continue
            result["training"].append(r)
            save()
            print(f"train {r['model']:<26} {method:<5} batch {batch:>3}x{accum:<2} {levers}: "
                  f"MFU {100 * r['mfu']:5.1f}% (steady {100 * r['steady_mfu']:5.1f}%), "
                  f"{r['steady_tokens_per_s']:>8.0f} tok/s steady, train {r['train_s']:.1f} s of "
                  f"{r['stage_wall_s']:.1f} s stage, first step {r['first_step_s']:.1f} s, "
                  f"peak {r['peak_memory_bytes'] / 2**30:.1f} GiB, loss {r['train_loss']:.4f}", flush=True)
    save()
    failed = {kind: sum(bool(r.get("error")) for r in result[kind]) for kind in ("generation", "training")}
    if any(failed.values()):  # written all the same; a partly failed bench says so and exits 1
        print("error: " + ", ".join(f"{n} of {len(result[kind])} {kind} cases failed"
                                    for kind, n in failed.items() if n), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
