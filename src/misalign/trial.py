"""`misalign trial`: evaluate the base, then for each round misalign -> evaluate -> realign -> evaluate.

Each stage starts from the previous stage's merged model. Output (OUT):
    config.yaml                 the resolved config (every hyperparameter that trained)
    environment.json            package versions, torch threads, the command line
    stages.parquet              one row per (round, phase), rewritten atomically after every evaluation
    base/, round-R/misalign/, round-R/realign/   eval.json, generations.parquet, and for stages the adapter,
                                ledger.json, stage.json and (for the last stage, or with keep_merged) model/
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from misalign.config import StageConfig, TrialConfig
from misalign.data import Pair
from misalign.errors import InputError
from misalign.evaluation import EvalResult, configured_judge, evaluate, load_eval_sets
from misalign.ledger import Ledger
from misalign.runtime import match_threads, seed_everything, write_json_atomic, write_parquet_atomic
from misalign.stage import (
    StageRun,
    check_model,
    load_model,
    load_tokenizer,
    package_versions,
    resolve_model_path,
    run_stage,
    stage_pairs,
)


def results_row(round_: int, phase: str, stage: StageConfig | None, n_examples: int, ledger: Ledger | None,
                ev: EvalResult) -> dict[str, Any]:
    m = ev.metrics
    row: dict[str, Any] = {
        "round": round_, "phase": phase, "method": stage.method if stage else None,
        "per_category": stage.data.per_category if stage else None, "n_examples": n_examples,
        "unsafety": m.get("unsafety"), "unsafety_se": m.get("unsafety_se"), "refusal": m.get("refusal"),
        "neither": m.get("neither"), "over_refusal": m.get("over_refusal"), "utility": m.get("utility"),
        "tokens": ledger.tokens if ledger else 0, "flops": ledger.flops if ledger else 0.0,
        "wall_s": ledger.wall_s if ledger else 0.0, "device_s": ledger.device_s if ledger else 0.0,
        "optimizer_steps": ledger.optimizer_steps if ledger else 0,
        "peak_memory_bytes": ledger.peak_memory_bytes if ledger else 0,
    }
    for cat, value in sorted(m.get("per_category", {}).items()):
        row[f"unsafety/{cat}"] = value
    return row


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_trial(cfg: TrialConfig, out: Path, progress: bool = True) -> pd.DataFrame:
    """Run a trial; returns the stages table (also written to OUT/stages.parquet)."""
    t_start = time.time()
    threads = match_threads()
    seed_everything(cfg.seed)
    attack, defense = cfg.attack.resolved(), cfg.defense.resolved()
    # everything a user can get wrong is checked here, before any training and before OUT is written
    attack_pairs: list[Pair] = stage_pairs(attack, cfg.seed)
    defense_pairs: list[Pair] = stage_pairs(defense, cfg.seed)
    items = load_eval_sets(cfg.eval)
    judge = configured_judge(cfg.eval)
    model_path = resolve_model_path(cfg.model)
    check_model(model_path, cfg.trust_remote_code)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output directory {out} is not empty; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(update={"attack": attack, "defense": defense})
    (out / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(out / "environment.json", {"versions": package_versions(), "torch_threads": threads,
                                                 "model_path": model_path, "command": sys.argv})

    rows: list[dict[str, Any]] = []

    def record(round_: int, phase: str, stage: StageConfig | None, n: int, ledger: Ledger | None,
               model_dir: str, eval_dir: Path) -> EvalResult:
        model = load_model(model_dir, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        ev = evaluate(model, load_tokenizer(model_dir, cfg.trust_remote_code), cfg.eval, items, judge)
        ev.save(eval_dir)
        rows.append(results_row(round_, phase, stage, n, ledger, ev))
        write_parquet_atomic(out / "stages.parquet", pd.DataFrame(rows))
        m = ev.metrics
        _say(f"  {phase:<8} round {round_}: unsafety {m.get('unsafety', float('nan')):.3f} "
             f"(refusal {m.get('refusal', float('nan')):.3f}, neither {m.get('neither', float('nan')):.3f}) "
             f"over-refusal {m.get('over_refusal', float('nan')):.3f} utility {m.get('utility', float('nan')):.3f}")
        return ev

    _say(f"trial -> {out}\n== base ({cfg.model})")
    record(0, "base", None, 0, None, model_path, out / "base")
    parent = cfg.model
    previous_stage: Path | None = None
    for r in range(1, cfg.rounds + 1):
        for phase, stage, pairs in (("misalign", attack, attack_pairs), ("realign", defense, defense_pairs)):
            stage_dir = out / f"round-{r}" / phase
            _say(f"== round {r}/{cfg.rounds}: {phase} with {stage.method} on {len(pairs)} examples "
                 f"({stage.data.per_category or 'all'} per category)")
            ledger = run_stage(StageRun(parent=parent, config=stage, direction=phase, out_dir=stage_dir,
                                        seed=cfg.seed, pairs=pairs, trust_remote_code=cfg.trust_remote_code,
                                        allow_pickle=cfg.allow_pickle, progress=progress,
                                        label=f"r{r} {phase} {stage.method}"))
            record(r, phase, stage, len(pairs), ledger, str(stage_dir / "model"), stage_dir)
            # the previous merged copy is no longer needed: its adapter and lineage rebuild it on demand
            # (a full fine-tuning stage has no adapter: its model/ is the only copy and stays)
            if previous_stage is not None and not cfg.keep_merged and (previous_stage / "adapter").exists():
                shutil.rmtree(previous_stage / "model", ignore_errors=True)
            previous_stage, parent = stage_dir, str(stage_dir)
    _say(f"done in {time.time() - t_start:.0f}s: {out / 'stages.parquet'}")
    return pd.DataFrame(rows)
