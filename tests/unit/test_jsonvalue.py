"""The JSON check that guards every stored value: its shortcut for parsed values decides as the full check does."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aetr.domain.jsonvalue import MAX_JSON_DEPTH, check_json

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=30)


def accepted(value: Any, parsed: bool) -> bool:
    try:
        check_json(value, parsed=parsed)
    except ValueError:
        return False
    return True


def nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


@given(values)
def test_a_value_parsed_from_json_is_judged_by_the_shortcut_as_by_the_full_check(value: Any) -> None:
    try:
        parsed = orjson.loads(orjson.dumps(value))  # what a callback body becomes
    except (TypeError, orjson.JSONDecodeError):
        return  # not something a body can carry
    assert accepted(parsed, parsed=True) == accepted(parsed, parsed=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, {"a": [1, -math.inf]}, 2**64, "\ud800"])
def test_values_json_cannot_carry_are_refused(bad: Any) -> None:
    assert not accepted(bad, parsed=False)


def test_depth_is_checked_on_parsed_values_too() -> None:
    assert accepted(nest(1, MAX_JSON_DEPTH - 1), parsed=True)
    assert not accepted(nest(1, MAX_JSON_DEPTH + 1), parsed=True)
