"""misalign.callbacks: the stage's progress line, the checkpoint callback's counts and WHOLE marker (and the
preemption listener it tells), and which checkpoint a retried stage resumes from. Real transformers callback
objects and a real FlopCounter; no training (tests/test_stage.py trains with them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from misalign import preemption
from misalign.callbacks import WHOLE, checkpoint_callback, counts_file, last_checkpoint, stage_callbacks
from misalign.ledger import FlopCounter


def checkpoint(trainer_dir: Path, step: int, whole: bool) -> Path:
    path = trainer_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if whole:
        (path / WHOLE).write_text("{}")
    return path


def test_the_newest_whole_checkpoint_is_the_one_to_resume_from(tmp_path: Path) -> None:
    assert last_checkpoint(tmp_path) is None
    checkpoint(tmp_path, 9, whole=True)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    checkpoint(tmp_path, 10, whole=True)  # step 10 > step 9, though "10" < "9" as text
    checkpoint(tmp_path, 12, whole=False)  # a rank had not finished writing it
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_on_save_writes_the_counts_and_then_the_whole_marker(tmp_path: Path) -> None:
    counter = FlopCounter(torch.nn.Linear(2, 2), layers=1, d_model=2)
    counter.carry([5, 50, 2, 20])  # the sums a resumed stage starts from
    noted: list[str] = []
    callback = checkpoint_callback(counter, None, spent_s=lambda: 12.5)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[])
    with preemption.on_saved(lambda: noted.append("saved")):
        callback.on_save(args, TrainerState(global_step=7), TrainerControl())
    saved = tmp_path / "trainer" / "checkpoint-7"
    assert counts_file(saved) == saved / "misalign-counts-rank0.json"
    assert json.loads(counts_file(saved).read_text()) == {"sums": [5, 50, 2, 20], "seconds": 12.5}
    assert json.loads((saved / WHOLE).read_text()) == {"step": 7, "ranks": 1}
    assert noted == ["saved"]  # the cell's attempt log hears of it
    assert last_checkpoint(tmp_path / "trainer") == saved


def test_counts_files_are_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    assert counts_file(tmp_path).name == "misalign-counts-rank3.json"


def test_the_progress_line_is_printed_when_shown(capsys: pytest.CaptureFixture[str]) -> None:
    (shown,) = stage_callbacks("attack", show=True, adalora_model=None)
    (quiet,) = stage_callbacks("attack", show=False, adalora_model=None)
    state = TrainerState(global_step=3, max_steps=10)
    for callback in (shown, quiet):
        callback.on_log(None, state, TrainerControl(), logs={"loss": 1.23456})
        callback.on_log(None, state, TrainerControl(), logs={"learning_rate": 0.1})  # no loss: no line
    assert capsys.readouterr().out == "  [attack] step 3/10 loss 1.2346\n"


def test_adalora_reallocates_its_ranks_after_every_optimizer_step() -> None:
    """The allocator drives peft's rank budgeting (a tiny AdaLoRA Llama with gradients from one batch)."""
    from peft import get_peft_model
    from peft.tuners.adalora import AdaLoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ada = get_peft_model(model, AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=1, tinit=1, tfinal=1,
                                              deltaT=1, total_step=6))
    ids = torch.randint(0, 32, (2, 5))
    ada(input_ids=ids, labels=ids).loss.backward()
    progress, allocator = stage_callbacks("attack", show=False, adalora_model=ada)
    assert ada.base_model.rankallocator.ipt == {} and ada.peft_config["default"].rank_pattern is None
    for step in range(1, 5):
        allocator.on_optimizer_step(None, TrainerState(global_step=step), TrainerControl())
    assert ada.base_model.rankallocator.ipt  # importance scores gathered
    assert ada.peft_config["default"].rank_pattern is not None  # and ranks reallocated from them
