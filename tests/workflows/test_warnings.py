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


def test_a_stage_on_a_cpu_prints_no_deepspeed_accelerator_warning(world, tmp_path):
    """DeepSpeed, which the trainer imports, logs a warning on stdout when it has to guess the CPU accelerator:
    the stage names it (DS_ACCELERATOR=cpu) on a machine without CUDA, so a user's output is ours."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "stage.yaml"
    cfg.write_text("method: lora\ndata: {source: 'world:misalign', per_category: 1}\n"
                   "train: {max_steps: 1, batch_size: 2}\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "misalign.cli", "stage", str(cfg), "--model", "world:base",
                           "--direction", "misalign", "--out", str(tmp_path / "stage")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accelerator" not in (done.stdout + done.stderr).lower(), done.stdout[-3000:] + done.stderr[-3000:]
