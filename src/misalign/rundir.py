"""A run directory: where a study (misalign.study) or a search (misalign.search) keeps everything, on its store.

    RunDir(store[, shared_stages])            the paths: stages/ (the lineage cache), cells/, points/, results
    open_run_dir(cfg, store, record_name)     create it, or check that a rerun matches it (then it resumes)

Both kinds share the layout below; each uses its own part (a study its cells, a search its points and answer):
    study.yaml | search.yaml, inputs.json   the config and its inputs' contents; a rerun must match both
    stages/                the lineage cache (misalign.lineage); a search may use a study's (--stages) instead
    cells/<id>.parquet     a study's finished cell's rows; results.parquet assembles them
    points/<id>.parquet    a search's evaluated point's rows; trials.parquet, answer.json, optuna.db beside them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from misalign.errors import InputError
from misalign.lineage import model_identity, source_identity
from misalign.results import CELLS, RESULTS
from misalign.storage import Store

INPUTS = "inputs.json"


@dataclass
class RunDir:
    """A study's or a search's directory on its store; its stages there, or another run's (a search's --stages,
    to reuse what a study trained)."""

    store: Store
    shared_stages: Store | None = None

    @property
    def root(self) -> str:
        return self.store.url

    @property
    def stages(self) -> Store:
        return self.shared_stages or self.store.child("stages")

    # ---- a study's
    @staticmethod
    def cell_file(cell_id: str) -> str:
        return f"{CELLS}/{cell_id}.parquet"

    def cell_done(self, cell_id: str) -> bool:
        return self.store.exists(self.cell_file(cell_id))

    @property
    def results(self) -> str:
        return f"{self.root}/{RESULTS}"

    # ---- a search's
    @staticmethod
    def point_file(point_id: str) -> str:
        return f"points/{point_id}.parquet"

    @property
    def answer(self) -> str:
        return "answer.json"

    @property
    def trials(self) -> str:
        return "trials.parquet"

    @property
    def optuna_db(self) -> Path:
        """SQLite needs a local file: the directory itself, or this node's mirror of an object store (copied to
        the store after every run as optuna.db, and back from it when a rerun finds no local copy)."""
        return self.store.mirror / "optuna.db"


def open_run_dir(cfg: BaseModel, store: Store, record_name: str = "study.yaml") -> bool:
    """Create a study's (or search's) directory, or check that an existing one holds this config and the same
    inputs (data files and local models by contents: finished cells of changed inputs would be stale). True if
    resuming."""
    mine = cfg.model_dump(mode="json")
    inputs = input_identities(mine)
    if store.exists(record_name):
        saved = _as_now(cfg, yaml.safe_load(store.read_text(record_name)))
        kind = record_name.split(".")[0]
        if saved != mine:
            diff = sorted(_differences(saved, mine))
            raise InputError(f"{store.url} holds a different {kind} (changed: {', '.join(diff[:8])}); "
                             "rerun with the same config to resume, or choose another --storage or name")
        before = store.read_json(INPUTS) if store.exists(INPUTS) else inputs
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
        if changed:
            raise InputError(f"{store.url}: these inputs changed since the {kind} started: {', '.join(changed)}; "
                             f"its finished cells would be stale. Start a new {kind} (another --storage or name): "
                             "stages whose inputs did not change are found again by their keys only within one "
                             "study directory, so point a search's --stages at the old one to reuse them")
        return True
    if store.list() or store.subdirs():  # not empty, and not a study (search) of ours
        raise InputError(f"{store.url} exists and is not a {record_name.split('.')[0]} directory; choose another "
                         "--storage or name")
    store.write_json(INPUTS, inputs)
    store.write_text(record_name, yaml.safe_dump(mine, sort_keys=False))
    return False


_INPUT_KEYS = {"source": source_identity, "benign_source": source_identity, "harmful": source_identity,
               "benign": source_identity, "utility": source_identity, "model": model_identity,
               "models": model_identity}


def input_identities(config: dict[str, Any]) -> dict[str, str]:
    """Every data file and local model a config names, with what it is (contents) rather than where it lies."""
    found: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key in _INPUT_KEYS:
            ident = _INPUT_KEYS[key](value)
            if ident is not None and ident != value:
                found[value] = ident

    walk(config, "")
    return found


def _as_now(cfg: BaseModel, saved: Any) -> Any:
    """A saved config as this version dumps it: a field added since it was saved takes its default, so a study
    begun before an upgrade that only added fields resumes. As saved where it no longer validates (a field
    removed or renamed): the comparison then names what changed."""
    try:
        return type(cfg).model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in set(a) | set(b):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
