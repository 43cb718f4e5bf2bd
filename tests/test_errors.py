"""misalign.errors: the one error type for bad user input, and the exit code the CLI gives it (2, before any
compute, with the message and no traceback)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from misalign.cli import main
from misalign.errors import EXIT_INPUT_ERROR, InputError


def test_an_input_error_is_a_value_error_with_exit_code_2() -> None:
    assert issubclass(InputError, ValueError) and EXIT_INPUT_ERROR == 2


def test_raised_in_a_config_validator_it_becomes_a_validation_error() -> None:
    """Being a ValueError, pydantic reports it beside the field it was raised for."""

    class Cfg(BaseModel):
        path: str

        @field_validator("path")
        @classmethod
        def _exists(cls, v: str) -> str:
            raise InputError(f"{v}: not found")

    with pytest.raises(ValidationError, match=r"path\n.*nope: not found"):
        Cfg(path="nope")


def test_the_cli_exits_2_with_the_message_and_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune"]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert "--older-than DAYS (0 or more) is required" in err and "Traceback" not in err
