"""misalign.config_base: what every config class shares (unknown fields, infinities and booleans where numbers
belong are errors), and the two checks more than one config module makes."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import ValidationError

from misalign.config_base import Strict, registered, whole_size


class Toy(Strict):
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", True] = "a"
    sizes: list[int] | None = None
    weights: dict[str, float] = {}
    anything: Any = None


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(ValidationError, match="coutn"):
        Toy(coutn=2)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(value: float) -> None:
    with pytest.raises(ValidationError, match="finite"):
        Toy(ratio=value)


@pytest.mark.parametrize("field", ["count", "ratio"])
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number(field: str, value: bool) -> None:
    with pytest.raises(ValidationError, match="a boolean where a number or text is expected"):
        Toy(**{field: value})


def test_a_boolean_inside_a_list_or_dict_of_numbers_is_refused() -> None:
    with pytest.raises(ValidationError, match="a boolean"):
        Toy(sizes=[1, True])
    with pytest.raises(ValidationError, match="a boolean"):
        Toy(weights={"a": 1.0, "b": False})
    assert Toy(sizes=[1, 2], weights={"a": 1}).sizes == [1, 2]


def test_fields_that_take_a_boolean_still_do() -> None:
    toy = Toy(flag=True, mode=True, anything=False)
    assert toy.flag is True and toy.mode is True and toy.anything is False
    assert Toy(count=3, ratio=1).count == 3


def test_assignment_is_validated_too() -> None:
    toy = Toy()
    with pytest.raises(ValidationError, match="a boolean"):
        toy.count = True  # type: ignore[assignment]
    toy.count = 4
    assert toy.count == 4


def test_whole_sizes_are_ints() -> None:
    assert whole_size(3.0) == 3 and isinstance(whole_size(3.0), int)
    assert whole_size(2.5) == 2.5 and whole_size(None) is None and whole_size(7) == 7


def test_registered_names_the_known_ones() -> None:
    assert registered("lora", ("lora", "full"), "method") == "lora"
    with pytest.raises(ValueError, match="unknown method 'lorra'; known: lora, full"):
        registered("lorra", ("lora", "full"), "method")
