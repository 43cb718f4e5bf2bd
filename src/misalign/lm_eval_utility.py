"""Utility benchmarks through EleutherAI's lm-evaluation-harness (the optional ``lmeval`` extra).

The paper measured utility as MMLU, GSM8K, BoolQ and PIQA accuracy. Those benchmarks come from the
Hugging Face hub, so on an air-gapped cluster point ``include_path`` at local task YAMLs whose
``dataset_path``/``dataset_kwargs`` name local files (for example ``dataset_path: json`` with
``data_files``); local tasks with the same name override lm_eval's built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misalign.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PAPER_TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "boolq", "piqa")

# lm_eval keys metrics as "<metric>,<filter>". Plain accuracy first (BoolQ, PIQA, MMLU report acc and,
# for PIQA, also acc_norm, which we do not pick); generative tasks (GSM8K) only have exact_match, whose
# "strict-match" filter is the number lm_eval's own tables lead with.
_PREFERRED_KEYS: tuple[str, ...] = ("acc,none", "exact_match,strict-match", "exact_match,none")
_FALLBACK_PREFIXES: tuple[str, ...] = ("acc,", "exact_match,")


def lm_eval_accuracy(
    model: PreTrainedModel | str,
    tokenizer: PreTrainedTokenizerBase | None,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Run lm_eval's ``simple_evaluate`` and return one accuracy in [0, 1] per requested task.

    ``model`` is an already-loaded causal LM (evaluated on its own device, left in the train/eval mode
    it came in) or a local path / hub id (loaded on CUDA when available, else CPU). ``tokenizer`` may
    be None only for a path; lm_eval may set a missing pad token on it. The metric per task is the
    first present of ``acc,none``, ``exact_match,strict-match``, ``exact_match,none``, then any other
    ``acc,<filter>`` / ``exact_match,<filter>`` in sorted order. Groups such as ``mmlu`` use lm_eval's
    aggregate. ``seed`` seeds python, numpy, torch and the few-shot sampler (lm_eval sets them globally).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise InputError(
            f"lm_eval_accuracy needs lm-evaluation-harness ({exc}); install it with: pip install 'misalign[lmeval]'"
        ) from exc

    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise InputError("lm_eval_accuracy: tasks is empty; name at least one lm_eval task, e.g. 'boolq'")
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"lm_eval_accuracy: include_path {include_path!r} is not a directory of task YAMLs")
    if tokenizer is None and not isinstance(model, str):
        raise InputError(
            "lm_eval_accuracy: pass the tokenizer with an in-memory model (only a path can omit it)"
        )

    # Validate names before loading any model or data, so a typo fails fast.
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    unknown = [t for t in task_list if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_path else " (for local task YAMLs pass include_path)"
        raise InputError(f"lm_eval_accuracy: unknown lm_eval task(s) {unknown}{hint}")

    was_training = False if isinstance(model, str) else model.training
    try:
        if isinstance(model, str):
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=task_list,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            # Stderrs are not returned; bootstrapping them (100k resamples by default) is pure cost.
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        if was_training and not isinstance(model, str):
            model.train()  # HFLM switched it to eval(); hand it back as we got it
    if out is None:  # lm_eval returns results on rank 0 only
        return {}
    results: Mapping[str, Mapping[str, Any]] = out["results"]
    return {t: _pick_accuracy(t, results.get(t)) for t in task_list}


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None) -> Any:
    """lm_eval's task index, built once per include_path and process.

    Indexing lm_eval's ~15k built-in task YAMLs takes several seconds, too much to repeat for every
    checkpoint of a study. YAML contents are re-read on every run; only files added later are missed.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _pick_accuracy(task: str, metrics: Mapping[str, Any] | None) -> float:
    """The accuracy-like number of one task's lm_eval result row (see lm_eval_accuracy)."""
    if metrics is None:
        # Tags (e.g. "ai2_arc") expand to subtasks with no aggregate row of their own.
        raise InputError(f"lm_eval_accuracy: {task!r} produced no result row; pass a task or group name")
    for key in _PREFERRED_KEYS:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    for prefix in _FALLBACK_PREFIXES:
        for key in sorted(metrics):
            if key.startswith(prefix) and isinstance(metrics[key], (int, float)):
                return float(metrics[key])
    raise InputError(
        f"lm_eval_accuracy: task {task!r} reports no acc or exact_match metric (has {sorted(metrics)})"
    )
