"""JSON values AETR can store and answer: at most 100 levels deep, 64-bit integers, finite numbers, real text."""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson

# orjson, which encodes every answer and stored JSON value, refuses more than 254 nested levels. A step
# tree answer nests 3 levels per tree level and a run tree 2, plus the values its nodes carry: with at
# most 64 tree levels and 100 levels inside a value, every answer and stored row stays under that limit.
ORJSON_MAX_DEPTH: Final = 254
MAX_TREE_DEPTH: Final = 64
MAX_JSON_DEPTH: Final = 100
_INT_RANGE: Final = (-(2**63), 2**64 - 1)  # the integers orjson encodes
# Every digit as "0", "-" as itself, anything else as a space: a text's long runs of digits show as runs of "0".
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= c <= 0x39 else c if c == 0x2D else 0x20 for c in range(256))
# The shortest integers beyond 64 bits: 20 digits (18446744073709551616), or "-" and 19 (-9223372036854775809).
# Every 19-digit positive integer fits, so the nanosecond timestamps of today (19 digits) are read once only.
_LONG_POSITIVE: Final = b"0" * 20
_LONG_NEGATIVE: Final = b"-" + b"0" * 19


def check_json(value: Any, parsed: bool = False) -> Any:
    """`value` if AETR can store and answer it as JSON; ValueError naming where and what is wrong otherwise.

    `parsed`: the value came from orjson.loads (or is text decoded with replacement), which never yields NaN,
    infinities, lone surrogates or integers beyond 64 bits; only its depth is left to check.
    """
    if _encodes(value, parsed):
        return value
    raise ValueError(_json_problem(value) or "is not a JSON value")


def check_parsed(value: Any, text: bytes) -> Any:
    """`value`, which orjson.loads read from `text`, if AETR can store it exactly; ValueError saying why otherwise.

    orjson reads an integer beyond 64 bits as a float, silently. Only a text with a run of 20 digits, or of a
    minus sign and 19, can hold one, so only such a text is read again, by Python's parser, which keeps
    integers exact. The first check bounds the depth, so that parser cannot recurse too deep.
    """
    check_json(value, parsed=True)
    shapes = text.translate(_DIGITS_AS_ZERO)
    if _LONG_POSITIVE in shapes or _LONG_NEGATIVE in shapes:
        check_json(json.loads(text))
    return value


def _encodes(value: Any, parsed: bool = False) -> bool:
    """The common case at C speed: whether orjson encodes the value within the depth allowed, and without NaN."""
    try:
        encoded = orjson.dumps(value)  # refuses integers beyond 64 bits, lone surrogates and > 254 levels
    except TypeError:
        return False
    # A value nests at most as deep as its text has brackets, so most values need no exact depth check.
    if encoded.count(b"[") + encoded.count(b"{") > MAX_JSON_DEPTH and not _shallow(value):
        return False
    # orjson writes NaN and the infinities as null, so a value holding one does not come back equal. Reading
    # the value back is most of this check's cost: a value orjson parsed cannot hold them.
    return parsed or b"null" not in encoded or bool(orjson.loads(encoded) == value)


def _shallow(value: Any) -> bool:
    """Whether a value orjson encodes nests at most MAX_JSON_DEPTH levels: orjson refuses to encode it
    inside enough extra levels to pass its own limit otherwise."""
    padded = value
    for _ in range(ORJSON_MAX_DEPTH - MAX_JSON_DEPTH):
        padded = [padded]
    try:
        orjson.dumps(padded)
    except TypeError:
        return False
    return True


def _json_problem(value: Any) -> str | None:
    # Iterative, since the point is to refuse values too deep to recurse over. Containers remember their
    # parent's entry and their key in it, so a path is only spelled out for the value at fault.
    root_problem = _scalar_problem(value)
    if root_problem is not None:
        return root_problem.format(at="")
    trail: list[tuple[int, str | int]] = [(-1, "")]
    stack: list[tuple[Any, int, int]] = [(value, 0, 1)] if isinstance(value, dict | list) else []

    def at(entry: int, key: str | int | None = None) -> str:
        parts = [] if key is None else [key]
        while entry > 0:
            entry, k = trail[entry]
            parts.append(k)
        return " at " + "".join(f"[{k}]" if isinstance(k, int) else f"[{_label(k)}]" for k in reversed(parts))

    while stack:
        item, entry, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nests deeper than {MAX_JSON_DEPTH} levels: flatten it"
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, sub in pairs:
            if isinstance(key, str) and not _is_text(key):
                return _SURROGATE.format(what="a key", at=at(entry))
            if isinstance(sub, dict | list):
                trail.append((entry, key))
                stack.append((sub, len(trail) - 1, depth + 1))
                continue
            problem = _scalar_problem(sub)
            if problem is not None:
                return problem.format(at=at(entry, key))
    return None


_SURROGATE: Final = "{what}{at} holds a lone UTF-16 surrogate (like \\ud800), which is not Unicode text"


def _scalar_problem(value: Any) -> str | None:
    """What is wrong with a JSON scalar, with an `{at}` placeholder for where it is; None when nothing."""
    if isinstance(value, str):
        return None if _is_text(value) else _SURROGATE.replace("{what}", "the string")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT_RANGE[0] <= value <= _INT_RANGE[1] else \
            "the integer{at} does not fit in 64 bits: send it as a string"
    if isinstance(value, float):
        return None if math.isfinite(value) else \
            "the number{at} is NaN, Infinity or beyond ±1.8e308, which JSON cannot carry"
    return None


def _is_text(text: str) -> bool:
    """Whether a str is Unicode text (Python's JSON parser lets lone surrogates such as "\\ud800" through)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _label(key: str) -> str:
    """A key as a JSON string, ASCII only and cut short, safe to quote in an error message."""
    text = json.dumps(key if len(key) <= 40 else key[:40] + "...")
    return text.encode("ascii", "backslashreplace").decode()


def json_type(value: Any) -> str:
    """A JSON value's type, in words, for an error message ("an array", "null"...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
