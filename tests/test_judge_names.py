"""misalign.judge_names: the judge names a config may give, checked without importing the judges themselves
(tests/test_judges.py holds them equal to the registry, misalign.judges.JUDGES)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from misalign.config_eval import JudgeSpec
from misalign.judge_names import JUDGE_NAMES


def test_the_names_in_the_registrys_order() -> None:
    assert JUDGE_NAMES == ("keyword", "classifier", "http")


@pytest.mark.parametrize("name", JUDGE_NAMES)
def test_a_config_accepts_each_name(name: str) -> None:
    assert JudgeSpec(name=name).name == name


def test_a_config_refuses_any_other_name_and_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="unknown judge 'llamaguard'; known: keyword, classifier, http"):
        JudgeSpec(name="llamaguard")


def test_reading_the_names_imports_no_judge() -> None:
    code = ("import sys, misalign.judge_names; "
            "print(sorted(m for m in sys.modules if m.startswith('misalign.judge') or m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['misalign.judge_names']"
