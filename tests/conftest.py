"""Shared fixtures. Everything is offline: no hub is reachable, and tests must not try."""

from __future__ import annotations

import os

# set before datasets/transformers are imported anywhere: they read these at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/misalign/torch_extensions"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world() -> Path:
    """The offline world, built once per machine (cached by content hash; about 3 minutes when new)."""
    from misalign.world import build

    return build(quiet=True)
