"""The preemption notice (misalign.preemption): a training process that gets SIGTERM saves a checkpoint at its
next optimizer step and stops, and its retry resumes there, so a noticed preemption loses under one step.
Outside a stage, SIGTERM ends the process as before."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import stored_weights_rel_diff

# One LoRA stage of 10 optimizer steps, each slowed so the parent can signal it mid-stage; it prints each step
# as it begins and ends, then its ledger, or the preemption.
_STAGE = """
import json, sys, time
from transformers import TrainerCallback
from misalign import preemption
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.stage import StageRun, train_stage
out, pause, every = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) or None
preemption.install()
class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **k):
        print(f"STEP {state.global_step}", flush=True)
    def on_step_begin(self, args, state, control, **k):
        print(f"BEGIN {state.global_step + 1}", flush=True)
        time.sleep(pause)
cfg = StageConfig(method="lora", data=DataSettings(source="world:misalign", per_category=2),
                  train=TrainSettings(max_steps=10, batch_size=2))
try:
    ledger, _ = train_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=__import__(
        "pathlib").Path(out), progress=False, checkpoint_every=every, callbacks=[Slow()]))
except preemption.StagePreempted as e:
    print(f"PREEMPTED {e.step} {e.notice_to_saved_s:.3f}", flush=True)
    sys.exit(3)
print("LEDGER " + json.dumps(ledger.to_dict()), flush=True)
"""


def _stage(out: Path, pause: float, checkpoint_every: int = 4) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _STAGE, str(out), str(pause), str(checkpoint_every)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # trains a stage in a subprocess, slowed a step at a time (about a minute)
def test_sigterm_mid_stage_saves_at_the_next_step_and_the_retry_resumes_there(world, tmp_path):
    """SIGTERM after step 5 (between the checkpoints at 4 and 8): the stage saves checkpoint-6 at the end of the
    step then running, exits with StagePreempted, and a rerun resumes from step 6, not 4, and ends at 10."""
    out = tmp_path / "stage"
    first = _stage(out, pause=1.0)
    seen: list[int] = []
    for line in first.stdout:  # type: ignore[union-attr]
        if line.startswith("STEP "):
            seen.append(int(line.split()[1]))
        if line.startswith("BEGIN 6"):  # step 5 ended, every callback ran: step 6 is the next to end
            first.send_signal(signal.SIGTERM)
        if line.startswith("PREEMPTED"):
            break
    rest, err = first.communicate(timeout=300)
    assert first.returncode == 3, err[-3000:]
    match = re.search(r"PREEMPTED (\d+)", line)
    assert match, line
    saved = int(match.group(1))
    assert saved == 6 and seen[-1] == 6, (saved, seen)  # the step after the notice, not a later one
    assert (out / "trainer" / "checkpoint-6" / "misalign-whole.json").exists()
    assert not (out / "ledger.json").exists()  # unfinished

    second = _stage(out, pause=0.0)
    text, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    ledger = json.loads(text.split("LEDGER ", 1)[1])
    assert ledger["extra"]["resumed_from_step"] == 6 and ledger["optimizer_steps"] == 10
    steps_after = [int(s) for s in re.findall(r"STEP (\d+)", text)]
    assert steps_after == [7, 8, 9, 10]  # nothing replayed, nothing skipped

    # and it ends where an unbroken run of the same stage ends (no checkpoints, no notice)
    whole = _stage(tmp_path / "whole", pause=0.0, checkpoint_every=0)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    assert stored_weights_rel_diff(out, tmp_path / "whole") <= 1e-5


def test_sigterm_outside_a_stage_ends_the_process_as_before():
    """The notice is only taken while a stage trains: elsewhere the previous handler runs (here Python's
    default, which ends the process by the signal)."""
    code = ("import time; from misalign import preemption; preemption.install(); print('READY', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"  # type: ignore[union-attr]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert proc.returncode != 0 and time.time() - t0 < 20
