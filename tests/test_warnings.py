"""The default trial emits no Python warning from our package's calls: a deprecated argument we pass, a usage a
library warns about. (Warnings libraries raise while importing each other are theirs, not ours.)"""

from __future__ import annotations

import traceback
import warnings

import pytest

from misalign.config import load_config
from misalign.trial import run_trial

pytestmark = pytest.mark.slow  # trains (a quick version of the default trial)


def test_the_default_trial_emits_no_warning_from_our_calls(world, tmp_path):
    cfg = load_config("configs/trial-tiny.yaml", ["attack.train.max_steps=2", "defense.train.max_steps=2",
                                                  "eval.limit=8"])
    caught: list[tuple[str, list[traceback.FrameSummary]]] = []

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        caught.append((f"{category.__name__} {filename}:{lineno}: {message}", traceback.extract_stack()))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        run_trial(cfg, tmp_path / "run", progress=False)
    ours = [text for text, stack in caught
            if any("/misalign/" in f.filename for f in stack)
            and not any("importlib._bootstrap" in f.filename for f in stack)]
    assert not ours, "\n".join(sorted(set(ours)))
