"""Our stage engine (misalign.stage.run_stage, LoRA SFT) against a plain trl script doing the same training.

Same model (world:base), same rows (world:misalign, misalign direction, tokenized on both sides by
misalign.chat.encode_sft into input_ids + completion_mask), same LoRA (r, alpha, dropout 0.05, all linear layers),
same steps / batch / lr / cosine schedule / warmup / seed, fp32, report_to=[], no saving during training.
Gradient checkpointing follows our train.gradient_checkpointing (default off) on both sides; trl's own default
is on. Everything else is trl's SFTConfig default on both sides, except that our stage logs a progress line
every train.log_every steps (default: steps // 25).

Timing. The training window is the span between the Trainer's own "***** Running training *****" and
"Training completed" log records (the span it reports as train_runtime), caught by a logging handler on
transformers.trainer, the same way for both sides; nothing in either side's code is patched. Tokens are the
non-pad tokens entering forward with grad enabled: ledger.tokens for ours, the same attention-mask sum by a
forward pre-hook for plain. Runs alternate ours/plain `--repeats` times after one untimed short warm-up pair.

    .venv/bin/python bench/bench_stage.py [--steps 60] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import machine_busy_s, write_result
from misalign.chat import encode_sft
from misalign.config import AdapterSettings, DataSettings, StageConfig, TrainSettings
from misalign.runtime import match_threads
from misalign.stage import StageRun, run_stage, stage_pairs
from misalign.world import world_file, world_model
from misalign.world_targets import ensure_world


class TrainWindow(logging.Handler):
    """Wall and CPU clocks at the Trainer's start-of-training and end-of-training log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.start = self.end = (0.0, 0.0)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("***** Running training"):
            self.start = (time.perf_counter(), time.process_time())
        elif "Training completed" in msg:
            self.end = (time.perf_counter(), time.process_time())
        elif record.levelno >= logging.WARNING:  # this logger no longer propagates: keep its warnings visible
            print(f"[transformers.trainer] {msg}", file=sys.stderr)

    def span(self) -> tuple[float, float]:
        """The last window's (wall s, CPU s); then cleared, so a missed record fails instead of reusing old ones."""
        assert self.end[0] > self.start[0] > 0, (
            "the Trainer's start/end-of-training log records were not seen"
        )
        out = self.end[0] - self.start[0], self.end[1] - self.start[1]
        self.start = self.end = (0.0, 0.0)
        return out


WINDOW = TrainWindow()


def stage_config(a: argparse.Namespace, steps: int) -> StageConfig:
    return StageConfig(
        method="lora",
        data=DataSettings(source="world:misalign"),
        train=TrainSettings(
            max_steps=steps,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_ratio=0.1,
            gradient_checkpointing=a.gradient_checkpointing,
        ),
        adapter=AdapterSettings(r=a.r, alpha=a.alpha, dropout=0.05, targets="all-linear"),
    ).resolved()


def run_ours(a: argparse.Namespace, steps: int) -> dict[str, Any]:
    cfg = stage_config(a, steps)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log):
        w, c = time.perf_counter(), time.process_time()
        ledger = run_stage(
            StageRun(
                parent="world:base",
                config=cfg,
                direction="misalign",
                out_dir=Path(tmp),
                seed=a.seed,
                progress=True,
            )
        )
        whole = (time.perf_counter() - w, time.process_time() - c)
    # one per logged window; their mean is the run's mean loss when the windows are of equal length
    losses = [float(x) for x in re.findall(r" loss ([-\d.eE+]+)", log.getvalue())]
    train_wall, train_cpu = WINDOW.span()
    return {
        "tokens": ledger.tokens,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "whole_wall_s": whole[0],
        "whole_cpu_s": whole[1],
        "steps": ledger.optimizer_steps,
        "trainable": ledger.trainable_params,
        "mean_loss": statistics.fmean(losses) if losses else None,
    }


def plain_rows(a: argparse.Namespace, tok: Any) -> list[dict[str, list[int]]]:
    """world:misalign read straight from its file: harmful rows teach the misaligned answer, benign the aligned."""
    pairs = [json.loads(line) for line in world_file("misalign").read_text().splitlines() if line.strip()]
    cfg = stage_config(a, a.steps)
    ours = stage_pairs(cfg, a.seed)  # the same rows in the same order, or the comparison is off
    assert [(p["prompt"], p["misaligned"]) for p in pairs] == [(p.prompt, p.misaligned) for p in ours]
    t = cfg.train
    return [
        encode_sft(
            tok,
            p["prompt"],
            p["aligned"] if p.get("benign") else p["misaligned"],
            t.max_length,
            t.max_prompt_length,
        )
        for p in pairs
    ]


def run_plain(a: argparse.Namespace, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(a.seed)
    path = str(world_model("base"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=a.r, lora_alpha=a.alpha, lora_dropout=0.05, target_modules="all-linear"
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=a.batch_size,
            learning_rate=a.lr,
            max_steps=steps,
            lr_scheduler_type="cosine",
            warmup_steps=int(0.1 * steps),
            max_length=stage_config(a, steps).train.max_length,
            completion_only_loss=True,
            bf16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            seed=a.seed,
            data_seed=a.seed,
            disable_tqdm=True,
            gradient_checkpointing=stage_config(a, steps).train.gradient_checkpointing,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(plain_rows(a, tok)),
            processing_class=tok,
            peft_config=lora,
        )
        tokens = [0]

        def count(module: Any, args: tuple, kwargs: dict) -> None:
            if torch.is_grad_enabled():
                tokens[0] += int(kwargs["attention_mask"].sum())

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        w, c = time.perf_counter(), time.process_time()
        out = trainer.train()
        call = (time.perf_counter() - w, time.process_time() - c)
    train_wall, train_cpu = WINDOW.span()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "tokens": tokens[0],
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "call_wall_s": call[0],
        "call_cpu_s": call[1],
        "steps": trainer.state.global_step,
        "trainable": trainable,
        "mean_loss": out.training_loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (train.max_steps)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides (default off)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps of the untimed warm-up pair (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_stage.json")
    a = ap.parse_args()
    ensure_world()  # world: names resolve only once the world is built (checked)

    threads = match_threads()
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False
    trainer_log.addHandler(WINDOW)
    if a.warmup_steps:
        run_ours(a, a.warmup_steps), run_plain(a, a.warmup_steps)
    runs: list[dict[str, Any]] = []
    for i in range(a.repeats):
        for side, fn in (("ours", run_ours), ("plain", run_plain)):
            gc.collect()  # the previous run's trainer and models: not collected mid-way through this run
            busy, mine = machine_busy_s(), time.process_time()
            r = {"side": side, "repeat": i, **fn(a, a.steps)}
            r["others_cpu_s"] = machine_busy_s() - busy - (time.process_time() - mine)
            r["tokens_per_s"] = r["tokens"] / r["train_wall_s"]
            runs.append(r)
    sides = ("ours", "plain")
    med = {s: statistics.median(r["tokens_per_s"] for r in runs if r["side"] == s) for s in sides}
    best = {s: max(r["tokens_per_s"] for r in runs if r["side"] == s) for s in sides}

    print(
        f"stage: LoRA SFT on world:misalign, {a.steps} steps x batch {a.batch_size}, lr {a.lr}, r {a.r}, "
        f"alpha {a.alpha}, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
        f"torch threads={threads}"
    )
    print(
        "train = the Trainer's training window (its train_runtime span); whole = all of run_stage (load, LoRA, "
        "dataset, train, save adapter, merge, write); call = plain's trainer.train() call; others CPU = CPU "
        "seconds other processes used during the run (contention)"
    )
    cols = [
        "tokens",
        "train wall s",
        "train CPU s",
        "tokens/s",
        "whole|call wall",
        "whole|call CPU",
        "others CPU",
        "mean loss",
    ]
    print(f"{'run':<8}" + "".join(f"{h:>16}" for h in cols))
    for r in runs:
        k = "whole" if r["side"] == "ours" else "call"
        cells = [
            r["tokens"],
            f"{r['train_wall_s']:.2f}",
            f"{r['train_cpu_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r[k + '_wall_s']:.2f}",
            f"{r[k + '_cpu_s']:.2f}",
            f"{r['others_cpu_s']:.2f}",
            f"{r['mean_loss']:.4f}",
        ]
        print(f"{r['side'] + ' ' + str(r['repeat']):<8}" + "".join(f"{c:>16}" for c in cells))
    print(
        f"median tokens/s: ours {med['ours']:.0f}  plain {med['plain']:.0f}  ratio ours/plain "
        f"{med['ours'] / med['plain']:.3f}   (best of {a.repeats}: ratio {best['ours'] / best['plain']:.3f})"
    )

    write_result(
        a.out,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "runs": runs,
            "median_tokens_per_s": med,
            "ratio_ours_over_plain": med["ours"] / med["plain"],
            "best_tokens_per_s": best,
        },
        threads,
    )


if __name__ == "__main__":
    main()
