"""The study grid: every cell (one trial) of models x seeds x attack points x defense points, and the stages
the cells share.

A cell's id is a digest of its axes, so it is the same in every run of the same study: results, resume and
the lineage cache all key on it. `unique_stages` counts what has to train once the cells share stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from misalign.config import StageConfig, StudyConfig, TrialConfig
from misalign.lineage import model_identity, trial_stages


@dataclass(frozen=True)
class Cell:
    """One trial of the study: a model, a seed, one attack point and one defense point."""

    model: str
    seed: int
    attack: dict[str, Any] = field(hash=False)   # {"method": ..., "per_category": ..., "<dotted axis>": ...}
    defense: dict[str, Any] = field(hash=False)

    @property
    def axes(self) -> dict[str, Any]:
        """The cell's coordinates as flat columns: model, seed, attack_method, attack_per_category, ..."""
        out: dict[str, Any] = {"model": self.model, "seed": self.seed}
        out.update({f"attack_{k}": v for k, v in self.attack.items()})
        out.update({f"defense_{k}": v for k, v in self.defense.items()})
        return out

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.axes, sort_keys=True).encode()).hexdigest()[:12]

    @staticmethod
    def from_axes(axes: dict[str, Any]) -> Cell:
        attack = {k.removeprefix("attack_"): v for k, v in axes.items() if k.startswith("attack_")}
        defense = {k.removeprefix("defense_"): v for k, v in axes.items() if k.startswith("defense_")}
        return Cell(model=axes["model"], seed=int(axes["seed"]), attack=attack, defense=defense)

    def trial_config(self, study: StudyConfig) -> TrialConfig:
        return TrialConfig(model=self.model, seed=self.seed, rounds=study.rounds,
                           attack=study.attack.stage(self.attack), defense=study.defense.stage(self.defense),
                           eval=study.eval, trust_remote_code=study.trust_remote_code,
                           allow_pickle=study.allow_pickle)


def cells(study: StudyConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order: defense points outermost, so the trials that start together
    have different attacks (cells sharing an attack in parallel would wait on one another's stage)."""
    return [Cell(model=m, seed=s, attack=a, defense=d) for d in study.defense.axis_values()
            for m in study.models for s in study.seeds for a in study.attack.axis_values()]


@dataclass
class StageUse:
    """One stage as a cell uses it: which cell, round and phase, its config and its lineage key."""

    cell: Cell
    round: int
    phase: str
    config: StageConfig
    key: str


def stage_uses(study: StudyConfig) -> list[StageUse]:
    """Every stage every cell runs, with its lineage key (the same key = the same stage, trained once)."""
    uses: list[StageUse] = []
    # once per model, not per cell: a bucket's model is keyed by listing its objects
    identity = {m: model_identity(m) for m in dict.fromkeys(study.models)}
    for cell in cells(study):
        trial = cell.trial_config(study)
        for r, phase, stage, key in trial_stages(identity[cell.model], study.rounds, trial.attack.resolved(),
                                                 trial.defense.resolved(), cell.seed):
            uses.append(StageUse(cell, r, phase, stage, key))
    return uses


def unique_stages(uses: list[StageUse]) -> dict[str, StageUse]:
    """The first use of every distinct stage (what trains once stages are shared)."""
    out: dict[str, StageUse] = {}
    for u in uses:
        out.setdefault(u.key, u)
    return out
