"""Reading step answers: bodies and Retry-After; what a failed call leaves behind."""

from __future__ import annotations

import gc
import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest

from aetr.domain.kinds import ApiSpec
from aetr.domain.runs import Node, Work
from aetr.domain.steps import StepConfig
from aetr.engine.coordinator import utcnow
from aetr.engine.dispatcher import Dispatcher, parse_body, parse_retry_after
from aetr.engine.tokens import TokenSigner
from aetr.store.requests import ClaimedWork


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


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_a_body_with_an_integer_beyond_64_bits_is_refused_whatever_its_content_type(content_type: str | None) -> None:
    # orjson would read it as 1.2345678901234568e+29; a refusal is not a malformed body (400) but a 422 value
    with pytest.raises(ValueError, match=r'\["id"\] does not fit in 64 bits') as refused:
        parse_body(b'{"id": 123456789012345678901234567890}', content_type)
    assert not isinstance(refused.value, orjson.JSONDecodeError)
    assert parse_body(b'{"id": 18446744073709551615}', content_type) == {"id": 2**64 - 1}


class FailuresKept:
    """Stands in for the coordinator: keeps the failures the dispatcher reports."""

    def __init__(self) -> None:
        self.failed: list[tuple[Any, ...]] = []
        self.answers_coming: dict[str, Any] = {}

    async def attempt_failed(self, *args: Any, **kwargs: Any) -> None:
        self.failed.append(args)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_a_call_to_a_step_that_is_down_does_not_leave_its_input_to_the_cycle_collector(
        closed_port: int, collector_paused: None) -> None:
    # A step that is down is called again and again; its inputs must go when each call has failed, not at the
    # server's next (rare) collection.
    size = 2_000_000
    kept = FailuresKept()
    dispatcher = Dispatcher(kept, TokenSigner("secret"), "http://127.0.0.1:9", 4)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        node_id = str(uuid.uuid4())
        node = Node(id=node_id, root_id=node_id, parent_id=None, position=0, mapper=None, n_children=0,
                    step=StepConfig(name="down", spec=ApiSpec(url=f"http://127.0.0.1:{closed_port}/step")),
                    created_at=utcnow(), state="executing", input={"blob": "x" * size}, attempt=1)
        await dispatcher.dispatch(ClaimedWork(Work("dispatch", node_id, node_id, 1, utcnow()), node))
        assert len(kept.failed) == 1 and "failed" in kept.failed[0][2], kept.failed
        del node
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection would free stays in gc.garbage, to be looked at
        gc.collect()
        holding = [type(o).__name__ for o in gc.garbage for r in gc.get_referents(o)
                   if isinstance(r, bytes | str) and len(r) >= size]
        assert holding == [], f"unreachable objects still hold the call's input: {holding}"
    finally:
        await dispatcher.close()
