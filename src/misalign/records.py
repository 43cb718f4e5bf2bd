"""A stage directory's record, `stage.json`: what the stage was trained from and how. One type writes and reads it.

    StageRecord(...).write(stage_dir);  StageRecord.read(stage_dir) -> StageRecord

A leaf: it imports nothing of ours but misalign.runtime. The JSON keeps the keys, their order and their values
exactly as the stage has always written them, so existing stage caches read as before; a repair stage
(misalign.repair) adds one key, `repair`, last.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from misalign.runtime import read_json, write_json_atomic

FILE = "stage.json"


@dataclass(kw_only=True)  # keyword-only: the fields keep the file's key order, defaults or not
class StageRecord:
    root: str                         # the model reference the lineage starts from
    root_identity: str | None = None  # what the root stood for when trained (misalign.lineage.model_identity)
    parent_dir: str | None = None     # the parent stage's directory relative to this one; None: the root
    direction: str = ""               # "misalign" or "realign"
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the resolved StageConfig, as model_dump() gives it
    has_adapter: bool                 # adapter/ (merged into the parent) or model/ (a full stage's weights)
    dtype: str | None = None          # the dtype the outputs are stored in (the lineage start's)
    versions: dict[str, str] = field(default_factory=dict)  # misalign.runtime.package_versions()
    # a repair stage's recipe, applied to its parent's weights when the lineage loads (misalign.repair.apply_recipe):
    # {"kind": "resta", "plus", "minus", "scale"} or {"kind": "antidote", "mask": file}; None: none (the file omits it)
    repair: dict[str, Any] | None = None

    def write(self, stage_dir: Path) -> Path:
        path = stage_dir / FILE
        data = asdict(self)
        if data["repair"] is None:  # a trained stage's file keeps the keys it always had
            del data["repair"]
        write_json_atomic(path, data)
        return path

    @property
    def applies_on_parent(self) -> bool:
        """Whether loading this stage starts from its parent's model (an adapter or a repair recipe), not from
        weights of its own (a full stage's model/)."""
        return self.has_adapter or self.repair is not None

    @classmethod
    def read(cls, stage_dir: Path) -> StageRecord:
        data = read_json(stage_dir / FILE)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def parent(self, stage_dir: Path) -> Path | None:
        """The stage this one trained from (a directory beside it), or None when it trained from its root."""
        return Path(os.path.normpath(stage_dir / self.parent_dir)) if self.parent_dir else None
