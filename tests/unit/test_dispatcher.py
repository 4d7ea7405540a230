"""Reading step answers: bodies and Retry-After."""

from __future__ import annotations

from datetime import timedelta
from email.utils import format_datetime

import orjson
import pytest

from aetr.engine.coordinator import utcnow
from aetr.engine.dispatcher import parse_body, parse_retry_after


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("120") == 120.0
    in_a_minute = format_datetime(utcnow() + timedelta(seconds=60), usegmt=True)
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 60
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_bodies_are_json_when_they_are_json_and_text_otherwise() -> None:
    assert parse_body(b'{"a": 1}', "application/json") == {"a": 1}
    assert parse_body(b"[1, 2]", None) == [1, 2]
    assert parse_body(b"hello", "text/plain") == "hello"
    assert parse_body(b"", "application/json") is None
    with pytest.raises(orjson.JSONDecodeError):
        parse_body(b"{truncated", "application/json")
