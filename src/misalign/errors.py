"""The one error type for bad user input (configs, data files, CLI arguments)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user. The CLI prints the message and exits with code 2, before any compute.

    The message must name what is wrong and where: the config field, or the file and row.
    """


EXIT_INPUT_ERROR = 2
