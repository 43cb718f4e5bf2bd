"""What every config class shares: unknown fields, infinities and booleans-as-numbers are errors.

A leaf below the config modules (config.py, config_stage.py, config_eval.py, config_resources.py): `Strict` is
their base class, and `whole_size`/`registered` are the checks more than one of them makes.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Collection
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def whole_size(v: float | None) -> float | None:
    """An examples-per-category size with whole numbers as int: 3.0 and 3 are one size, one cache key."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def registered(name: str, registry: Collection[str], what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    return name


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type really takes a bool (pydantic would otherwise read `true` as 1 or 1.0)."""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(v, bool) for v in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


def _bool_where_not_allowed(annotation: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return not _admits_bool(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):  # e.g. list[int] | None: the list member decides
        members = [a for a in args if typing.get_origin(a) in (list, dict)]
        return any(_bool_where_not_allowed(a, value) for a in members)
    if origin is list and isinstance(value, list) and args:
        return any(_bool_where_not_allowed(args[0], v) for v in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(_bool_where_not_allowed(args[1], v) for v in value.values())
    return False


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` epochs would train forever, `.inf` ratios overflow; numbers must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `true`/`yes` as a bool, which pydantic's lax mode turns into 1: `rounds: true` ran one round
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_where_not_allowed(field.annotation, value):
            raise ValueError("a boolean where a number or text is expected (YAML reads true/false/yes/no as "
                             "booleans)")
        return value
