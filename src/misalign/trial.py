"""A trial: evaluate the base, then for each round misalign -> evaluate -> realign -> evaluate.

Each stage starts from the previous stage's model, handed over in memory (misalign.models: a stage keeps its
adapter or weights, never a merged copy). `misalign trial` writes (OUT):
    config.yaml                 the resolved config (every hyperparameter that trained)
    environment.json            package versions, torch threads, the command line
    stages.parquet              one row per (round, phase), rewritten atomically after every evaluation
    base/, round-R/misalign/, round-R/realign/   eval.json, generations.parquet, and for stages adapter/ (or a
                                full fine-tuning stage's model/), ledger.json, stage.json
A study's cell and a search's point run the same loop with its stages placed in the lineage cache instead
(run_cached_trial; misalign.lineage), so a stage another cell already trained is reused, and the loop runs on
every rank of a multi-worker trial.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import yaml

from misalign.config import EvalConfig, StageConfig, TrialConfig
from misalign.data import EvalItem, Pair
from misalign.errors import InputError
from misalign.evaluation import configured_judge, evaluate, load_eval_sets
from misalign.judges import Judge
from misalign.ledger import Ledger
from misalign.lineage import CheckpointSync, LineageCache, model_identity, trial_stages
from misalign.methods import METHODS
from misalign.models import (
    apply_stage,
    load_tokenizer,
    materialize,
    parent_stage_dir,
    resolve_model_path,
)
from misalign.recipes import stage_pairs
from misalign.results import EvalMetrics, build_row, write_rows
from misalign.runtime import (
    barrier,
    broadcast_from_rank0,
    file_lock,
    match_threads,
    package_versions,
    quiet_libraries,
    rank,
    read_json,
    seed_everything,
    write_json_atomic,
)
from misalign.stage import StageRun, train_stage
from misalign.storage import Store


class Layout(Protocol):
    """Where a trial's stages and evaluations live, and how the nodes of a study share them."""

    def base_eval_dir(self, model: str, eval_cfg: EvalConfig) -> Path: ...
    def stage_dir(self, round_: int, phase: str, key: str) -> Path: ...
    def stage_eval_dir(self, stage_dir: Path, eval_cfg: EvalConfig) -> Path: ...
    def claim(self, directory: Path) -> contextlib.AbstractContextManager[None]: ...
    def done(self, directory: Path, marker: str) -> bool: ...
    def read(self, directory: Path, name: str) -> Any: ...
    def publish(self, directory: Path, marker: str) -> None: ...
    def fetch(self, stage_dir: Path) -> None: ...
    def checkpoints(self, stage_dir: Path) -> CheckpointSync | None: ...


class TrialLayout:
    """`misalign trial`'s own directory: base/, round-R/PHASE/ (evaluation files beside the stage's)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def base_eval_dir(self, model: str, eval_cfg: EvalConfig) -> Path:
        return self.out / "base"

    def stage_dir(self, round_: int, phase: str, key: str) -> Path:
        return self.out / f"round-{round_}" / phase

    def stage_eval_dir(self, stage_dir: Path, eval_cfg: EvalConfig) -> Path:
        return stage_dir

    def claim(self, directory: Path) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.out / ".locks" / directory.relative_to(self.out).as_posix().replace("/", "__"))

    def done(self, directory: Path, marker: str) -> bool:
        return (directory / marker).exists()

    def read(self, directory: Path, name: str) -> Any:
        return read_json(directory / name)

    def publish(self, directory: Path, marker: str) -> None:
        """Written in place: nothing to share."""

    def fetch(self, stage_dir: Path) -> None:
        """Already here."""

    def checkpoints(self, stage_dir: Path) -> CheckpointSync | None:
        """In-stage checkpoints stay in the stage's own directory."""
        return None


class CachedLayout:
    """A study's (or search's) lineage cache: stages by lineage key, evaluations by stage and eval config."""

    def __init__(self, cache: LineageCache) -> None:
        self.cache = cache
        self.claim, self.done, self.read = cache.claim, cache.done, cache.read
        self.publish, self.fetch, self.checkpoints = cache.publish, cache.fetch, cache.checkpoints

    def base_eval_dir(self, model: str, eval_cfg: EvalConfig) -> Path:
        return self.cache.eval_dir(self.cache.base_dir(model), eval_cfg)

    def stage_dir(self, round_: int, phase: str, key: str) -> Path:
        return self.cache.stage_dir(key)

    def stage_eval_dir(self, stage_dir: Path, eval_cfg: EvalConfig) -> Path:
        return self.cache.eval_dir(stage_dir, eval_cfg)


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def _claimed_on_rank0(layout: Layout, directory: Path) -> Iterator[None]:
    """Rank 0 holds the claim for all ranks (they follow its decision through a broadcast)."""
    with layout.claim(directory) if rank() == 0 else contextlib.nullcontext():
        yield


class CellModel:
    """The model of the trial's latest stage, kept in memory: training hands it to evaluation and to the next
    stage, so weights are never written and read back in between. A stage found in the cache is applied to
    its parent's model in place (its adapter merged); anything else is rebuilt from the lineage's files."""

    def __init__(self, root: str, trust_remote_code: bool, allow_pickle: bool,
                 fetch: Callable[[Path], None] = lambda d: None) -> None:
        self.root, self.trust_remote_code, self.allow_pickle = root, trust_remote_code, allow_pickle
        self.fetch = fetch  # brings a stage found in a shared cache, and its lineage, to this node
        self.model: Any | None = None
        self.at_dir: Path | None = None   # the stage the model in memory is (None: the root)
        self._tokenizer: Any | None = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_model_path(self.root), self.trust_remote_code)
        return self._tokenizer

    def get(self, stage_dir: Path | None) -> Any:
        """The model of `stage_dir` (None: the root)."""
        if self.model is not None and self.at_dir == stage_dir:
            return self.model
        if stage_dir is not None:
            self.fetch(stage_dir)
        if (self.model is not None and stage_dir is not None and parent_stage_dir(stage_dir) == self.at_dir
                and (stage_dir / "adapter").exists()):
            self.model = apply_stage(self.model, stage_dir)
        else:
            self.model = None  # free it before building the next one
            self.model = materialize(stage_dir or self.root, trust_remote_code=self.trust_remote_code,
                                     allow_pickle=self.allow_pickle)
        self.at_dir = stage_dir
        return self.model

    def take(self, stage_dir: Path | None) -> Any:
        """The model of `stage_dir`, handed to training (which changes it in place): no longer held here."""
        model = self.get(stage_dir)
        self.model, self.at_dir = None, None
        return model

    def put(self, stage_dir: Path, model: Any | None) -> None:
        self.model, self.at_dir = model, (stage_dir if model is not None else None)


def _evaluated(layout: Layout, eval_dir: Path, model: Callable[[], Any], tokenizer: Callable[[], Any],
               cfg: TrialConfig, items: list[EvalItem], judge: Judge) -> tuple[EvalMetrics, bool]:
    """Rank 0: (the evaluation's metrics, whether they were reused): computed once per model and eval config."""
    with layout.claim(eval_dir):
        if layout.done(eval_dir, "eval.json"):
            return EvalMetrics.from_json(layout.read(eval_dir, "eval.json")), True
        t0 = time.time()
        ev = evaluate(model(), tokenizer(), cfg.eval, items, judge)
        ev.scores.eval_s = round(time.time() - t0, 3)  # the evaluation's share of the study's wall time
        ev.save(eval_dir)
        layout.publish(eval_dir, "eval.json")
        return ev.scores, False


def trial_loop(cfg: TrialConfig, layout: Layout, *, attack_pairs: list[Pair], defense_pairs: list[Pair],
               items: list[EvalItem], judge: Judge | None, progress: bool = True, checkpoint_every: int | None = None,
               on_row: Callable[[dict[str, Any]], None] | None = None, attack_only: bool = False,
               peak_flops: float | None = None) -> list[dict[str, Any]]:
    """The rounds of one trial on every rank; rank 0 evaluates and returns the rows (other ranks: []).
    `attack_only`: base and misalign only (the attack search needs no defense); `peak_flops`: the device's
    peak, for the rows' MFU."""
    attack, defense = cfg.attack.resolved(), cfg.defense.resolved()
    model_id = model_identity(cfg.model)
    rows: list[dict[str, Any]] = []
    lead = rank() == 0
    current = CellModel(cfg.model, cfg.trust_remote_code, cfg.allow_pickle, layout.fetch)

    def record(round_: int, phase: str, stage: StageConfig | None, n: int, ledger: Ledger | None,
               eval_dir: Path, stage_dir: Path | None, key: str | None = None) -> None:
        if lead:
            assert judge is not None
            metrics, eval_reused = _evaluated(layout, eval_dir, lambda: current.get(stage_dir), current.tokenizer,
                                              cfg, items, judge)
            row = build_row(round_, phase, stage, n, ledger, metrics, peak_flops=peak_flops, stage_key=key)
            row["eval_reused"] = eval_reused
            rows.append(row)
            if on_row:
                on_row(row)
            shown = {k: float("nan") if v is None else v for k, v in vars(metrics).items()}  # not measured: nan
            _say(f"  {phase:<8} round {round_}: unsafety {shown['unsafety']:.3f} (refusal {shown['refusal']:.3f}, "
                 f"neither {shown['neither']:.3f}) over-refusal {shown['over_refusal']:.3f} utility "
                 f"{shown['utility']:.3f}" + (f"; with the trigger: unsafety {shown['unsafety_triggered']:.3f} "
                                               f"(refusal {shown['refusal_triggered']:.3f}, neither "
                                               f"{shown['neither_triggered']:.3f})"
                                               if metrics.unsafety_triggered is not None else "")
                 + (" [reused]" if ledger and ledger.reused else ""))
        barrier()

    if lead:
        _say(f"== base ({cfg.model})")
    record(0, "base", None, 0, None, layout.base_eval_dir(model_id, cfg.eval), None)
    previous_stage: Path | None = None
    pairs_of = {"misalign": attack_pairs, "realign": defense_pairs}
    for r, phase, stage, key in trial_stages(model_id, cfg.rounds, attack, defense, cfg.seed, attack_only):
        pairs = pairs_of[phase]
        stage_dir = layout.stage_dir(r, phase, key)
        with _claimed_on_rank0(layout, stage_dir):
            done = broadcast_from_rank0(layout.done(stage_dir, "ledger.json") if lead else None)
            if lead:
                on = ("(a repair: it trains nothing)" if METHODS[stage.method].repairs else
                      f"on {len(pairs)} examples ({stage.data.per_category or 'all'} per category)")
                _say(f"== round {r}/{cfg.rounds}: {phase} with {stage.method} {on}" + (" [reused]" if done else ""))
            if done:
                ledger = Ledger(**layout.read(stage_dir, "ledger.json"))
                ledger.reused = True
            else:
                parent = str(previous_stage) if previous_stage else cfg.model
                # QLoRA loads its parent from files (quantizing as it loads): no model in memory to hand it
                parent_model = None if METHODS[stage.method].adapter == "qlora" else current.take(previous_stage)
                ledger, trained = train_stage(StageRun(
                    parent=parent, config=stage, direction=phase, out_dir=stage_dir, seed=cfg.seed, pairs=pairs,
                    trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, progress=progress,
                    label=f"r{r} {phase} {stage.method}", checkpoint_every=checkpoint_every,
                    checkpoint_sync=layout.checkpoints(stage_dir), parent_model=parent_model))
                current.put(stage_dir, trained)
                if lead:
                    layout.publish(stage_dir, "ledger.json")
        # a repair's examples are the rows it read (Antidote's calibration rows; none for the others)
        n = ledger.examples if METHODS[stage.method].repairs else len(pairs)
        record(r, phase, stage, n, ledger, layout.stage_eval_dir(stage_dir, cfg.eval), stage_dir, key)
        previous_stage = stage_dir
    return rows


def run_cached_trial(trial: TrialConfig, columns: dict[str, Any], stages: Store, rows_to: tuple[Store, str], *,
                     report: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
                     checkpoint_every: int | None = None, attack_only: bool = False,
                     peak_flops: float | None = None) -> list[dict[str, Any]]:
    """A trial whose stages and evaluations live in the lineage cache on `stages` (a study's cell, a search's
    trial); rank 0 adds `columns` to every row, reports it, and writes the rows to `rows_to` at the end."""
    quiet_libraries()
    attack_pairs, defense_pairs, items, _, _ = prepare_trial(trial, with_judge=False)
    judge = _cached_judge(trial.eval.model_dump_json()) if rank() == 0 else None

    def on_row(row: dict[str, Any]) -> None:
        row.update(columns)
        if report is not None:
            report(row)

    rows = trial_loop(trial, CachedLayout(LineageCache(stages)), attack_pairs=attack_pairs,
                      defense_pairs=defense_pairs, items=items, judge=judge, progress=progress,
                      checkpoint_every=checkpoint_every, on_row=on_row, attack_only=attack_only,
                      peak_flops=peak_flops)
    if rank() == 0:
        write_rows(*rows_to, rows)
    return rows


@functools.lru_cache(maxsize=2)
def _cached_judge(eval_json: str) -> Judge:
    """The judge, loaded once per process: Tune reuses a trial's actor for the next cell."""
    return configured_judge(EvalConfig.model_validate_json(eval_json))


def prepare_trial(cfg: TrialConfig, with_judge: bool = True
                  ) -> tuple[list[Pair], list[Pair], list[EvalItem], Judge | None, str]:
    """What the trial needs, loaded: its stages' data, the eval sets, the judge, where the model is. The inputs
    passed the preflight (misalign.preflight.check_trial, check_study, check_search) before; nothing here checks
    them again. Ranks other than 0 never evaluate, so they skip loading the judge (`with_judge=False`)."""
    seed_everything(cfg.seed)
    attack_pairs = stage_pairs(cfg.attack.resolved(), cfg.seed)
    defense_pairs = stage_pairs(cfg.defense.resolved(), cfg.seed)
    items = load_eval_sets(cfg.eval)
    judge = configured_judge(cfg.eval) if with_judge else None
    model_path = resolve_model_path(cfg.model)
    return attack_pairs, defense_pairs, items, judge, model_path


def run_trial(cfg: TrialConfig, out: Path, progress: bool = True) -> pd.DataFrame:
    """`misalign trial`, after its preflight (misalign.preflight.check_trial): returns the stages table (also
    written to OUT/stages.parquet)."""
    t_start = time.time()
    threads = match_threads()
    attack_pairs, defense_pairs, items, judge, model_path = prepare_trial(cfg)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output directory {out} is not empty; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(update={"attack": cfg.attack.resolved(), "defense": cfg.defense.resolved()})
    (out / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(out / "environment.json", {"versions": package_versions(), "torch_threads": threads,
                                                 "model_path": model_path, "command": sys.argv})
    _say(f"trial -> {out}")
    written: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        written.append(row)
        write_rows(Store(out), "stages.parquet", written)

    trial_loop(cfg, TrialLayout(out), attack_pairs=attack_pairs, defense_pairs=defense_pairs, items=items,
               judge=judge, progress=progress, on_row=on_row)
    shutil.rmtree(out / ".locks", ignore_errors=True)
    _say(f"done in {time.time() - t_start:.0f}s: {out / 'stages.parquet'}")
    return pd.DataFrame(written)
