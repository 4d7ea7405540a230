"""The JSON check that guards every stored value: its shortcut for parsed values decides as the full check does."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aetr.domain.jsonvalue import MAX_JSON_DEPTH, check_json, check_parsed

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


def parsed_back(text: bytes) -> Any:
    """What a callback body or sync answer becomes: orjson's reading of it, checked against the text."""
    return check_parsed(orjson.loads(text), text)


@pytest.mark.parametrize(("text", "where"), [
    (b'{"id": 123456789012345678901234567890}', '["id"]'),
    (b'[1, {"a": [18446744073709551616]}]', '[1]["a"][0]'),
    (b'{"low": -9223372036854775809}', '["low"]'),
])
def test_an_integer_beyond_64_bits_is_refused_where_orjson_would_make_it_a_float(text: bytes, where: str) -> None:
    assert isinstance(orjson.loads(text), dict | list)  # orjson itself reads it without a word
    with pytest.raises(ValueError, match=r"does not fit in 64 bits: send it as a string") as refused:
        parsed_back(text)
    assert where in str(refused.value)


@pytest.mark.parametrize("text", [
    b"18446744073709551615", b"-9223372036854775808", b"9999999999999999999",  # the edges, and 19 digits
    b'{"id": "123456789012345678901234567890"}',  # as a string, as the refusal asks
    b"[1.2345678901234567890123, 12345678901234567890.5, 1e300]",  # long runs in floats: floats they stay
])
def test_long_digit_runs_that_are_no_big_integer_come_back_exactly(text: bytes) -> None:
    value = parsed_back(text)
    assert value == orjson.loads(text)
    assert orjson.dumps(value) == orjson.dumps(orjson.loads(text))


@given(values)
def test_a_text_is_refused_exactly_when_orjson_would_not_read_it_exactly(value: Any) -> None:
    try:
        text = json.dumps(value, allow_nan=False).encode()  # Python writes any integer, as a step could
        parsed = orjson.loads(text)
    except (ValueError, orjson.JSONDecodeError):
        return  # not JSON, or JSON orjson refuses outright (a lone surrogate)
    # Python's reading keeps every integer; written out, a float differs from the integer it replaced.
    exact = json.dumps(parsed) == json.dumps(json.loads(text))
    try:
        parsed_back(text)
    except ValueError:
        assert not exact
    else:
        assert exact
