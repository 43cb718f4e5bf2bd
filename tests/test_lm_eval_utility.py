"""lm_eval_accuracy against the real lm-evaluation-harness, on a local BoolQ-like task and a tiny Llama."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from misalign.errors import InputError  # noqa: E402
from misalign.lm_eval_utility import PAPER_TASKS, lm_eval_accuracy  # noqa: E402

torch.set_num_threads(1)

TASK = "misalign_tiny_boolq"
ANIMALS = ["cat", "dog", "horse", "cow", "fish", "bird", "lion", "tiger", "wolf", "bear"]
THINGS = ["rock", "chair", "table", "spoon", "cup", "lamp", "door", "shoe", "book", "coin"]
# Learnable rule: the answer is "yes" exactly when the noun is an animal; labels are balanced, so
# a model that ignores the question (always "yes" or always "no") scores 0.5.
DOCS = [{"question": f"is a {w} an animal", "label": int(w in ANIMALS)} for w in ANIMALS + THINGS]
DOC_TO_TEXT = "Question: {q}?\nAnswer:"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory for the whole module: lm_eval indexes each include_path once per process.
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "tiny_boolq.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_boolq.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}?\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: ["no", "yes"]\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return root


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # Word-level vocabulary split like the Whitespace pre-tokenizer, so "yes"/"no" are single tokens.
    texts = [DOC_TO_TEXT.format(q=d["question"]) + " no yes" for d in DOCS]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _train_to_rule(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, *, inverted: bool = False, steps: int = 150
) -> None:
    # Train only the answer token, with the context tokenized exactly as lm_eval scores it.
    rows = [
        tokenizer(DOC_TO_TEXT.format(q=d["question"]) + (" yes" if d["label"] != inverted else " no"))[
            "input_ids"
        ]
        for d in DOCS
    ]
    ids = torch.tensor(rows)  # every question has the same length, so no padding is needed
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_untrained_accuracy_is_in_range_and_deterministic(
    task_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _tiny_llama(len(tokenizer))
    first = lm_eval_accuracy(model, tokenizer, [TASK], include_path=str(task_dir), batch_size=4)
    second = lm_eval_accuracy(model, tokenizer, [TASK], include_path=str(task_dir), batch_size=8)
    assert set(first) == {TASK}
    assert 0.0 <= first[TASK] <= 1.0
    assert first == second


def test_trained_model_beats_chance_in_memory_and_from_path(
    task_dir: Path, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = _tiny_llama(len(tokenizer))
    _train_to_rule(model, tokenizer)
    acc = lm_eval_accuracy(model, tokenizer, [TASK], include_path=str(task_dir))[TASK]
    assert acc >= 0.9  # chance, and any constant answer, is 0.5
    assert model.training  # HFLM calls eval(); the adapter hands the model back in train mode

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from_path = lm_eval_accuracy(str(tmp_path / "model"), None, [TASK], include_path=str(task_dir))
    assert from_path == {TASK: acc}


def test_score_follows_what_the_model_learned(task_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    # Trained to always give the wrong answer, the same model must score near 0, not near 1 or 0.5:
    # the adapter reads the model's preferences, not a property of the data or the labels.
    model = _tiny_llama(len(tokenizer))
    _train_to_rule(model, tokenizer, inverted=True)
    assert lm_eval_accuracy(model, tokenizer, [TASK], include_path=str(task_dir))[TASK] <= 0.1


def test_unknown_task_is_an_input_error(task_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InputError, match="no_such_task"):
        lm_eval_accuracy(
            _tiny_llama(len(tokenizer)), tokenizer, [TASK, "no_such_task"], include_path=str(task_dir)
        )


def test_missing_lm_eval_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import lm_eval` fail as if the extra were not installed.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(InputError, match=r"pip install 'misalign\[lmeval\]'"):
        lm_eval_accuracy("unused", None, PAPER_TASKS)
