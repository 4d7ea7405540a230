"""The dispatcher: calls one attempt of an api step over HTTP and reports the answer to the coordinator."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import random
import time
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from aetr.domain.jsonvalue import check_json
from aetr.domain.runs import EventRecord, Node
from aetr.engine import metrics
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.engine.tokens import TokenSigner, redact
from aetr.store import ClaimedWork
from aetr.store.sql import FinishCall

log = logging.getLogger("aetr.dispatch")

ANSWER_TIMEOUT_S = 30.0  # seconds a callback-mode step has to answer the call itself (not to finish)
STREAM_OVER_BYTES = 1024 * 1024  # inputs larger than this are streamed to the step
BODY_EXCERPT = 300  # characters of an error answer kept in the node's error message


def parse_body(body: bytes, content_type: str | None) -> Any:
    """A step's output from an HTTP body: JSON when it is JSON, else the text (spec §4)."""
    if not body:
        return None
    if content_type and "json" in content_type:
        return orjson.loads(body)  # the caller turns a JSONDecodeError into a clear answer
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - utcnow()).total_seconds())


def _span_id() -> str:
    # A trace's span id only has to differ from its siblings': no system call for secure randomness per call.
    return f"{random.getrandbits(64) or 1:016x}"


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of a failed call's exception chain.

    aiohttp leaves a failed call's exception in a reference cycle through the frames it unwound, and those
    frames hold the request's body: a step that is down would keep every input sent to it until the next
    collection, and `aetr serve` collects rarely (see settle_heap). Only the message is kept of the failure.
    (The frames themselves are not cleared: in Python before 3.13 that would close a suspended coroutine whose
    frame a traceback happened to hold.)
    """
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


@functools.lru_cache(maxsize=1024)
def _encoded(url: str) -> str:
    return str(URL(url))


@functools.lru_cache(maxsize=256)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


class Dispatcher:
    """Makes step calls with one shared aiohttp session (it holds up under concurrency where httpx does not)."""

    def __init__(self, coordinator: Coordinator, signer: TokenSigner, callback_base: str,
                 max_connections: int) -> None:
        self.coordinator = coordinator
        self.signer = signer
        self.callback_base = callback_base
        self._max_connections = max_connections
        # Calls wait for a slot here, before their time-out starts: aiohttp counts the wait for a pooled
        # connection against the request's time-out, which failed calls that had never been sent.
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP session."""
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda v: orjson.dumps(v).decode())

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()

    def callback_url(self, node: Node) -> str:
        """Where this attempt of the node reports back."""
        return f"{self.callback_base}/api/v1/callbacks/{self.signer.sign(node.id, node.attempt)}"

    async def dispatch(self, claimed: ClaimedWork) -> None:
        """Call the step for a leased dispatch row (with its node as committed), unless the attempt is over."""
        w, node = claimed.work, claimed.node
        if node is None or node.state != "executing" or node.attempt != w.attempt:
            self.coordinator.call_answered(FinishCall(w.node_id, w.attempt))
            return
        step = node.step
        assert step.url is not None
        callback = self.callback_url(node)
        # The step's URL as yarl encodes it, once; the query added to it is encoded here.
        url = URL(f"{_encoded(step.url)}{'&' if '?' in step.url else '?'}aetr={quote(callback, safe='')}",
                  encoded=True)
        headers = {**step.headers, "Content-Type": "application/json", "AETR-Callback": callback,
                   "AETR-Run-Id": node.root_id, "AETR-Node-Id": node.id, "AETR-Attempt": str(node.attempt),
                   "traceparent": f"00-{node.root_id.replace('-', '')}-{_span_id()}-01"}
        timeout_s = step.timeout_s if step.mode == "sync" else min(step.timeout_s, ANSWER_TIMEOUT_S)
        raw = orjson.dumps(node.input)
        # aiohttp streams file-like bodies instead of writing a large one in one go
        payload: bytes | io.BytesIO = io.BytesIO(raw) if len(raw) > STREAM_OVER_BYTES else raw
        assert self._session is not None
        failure: BaseException | None = None
        async with self._slots:  # calls wait for a slot before their time-out starts (see __init__)
            started = time.monotonic()
            try:
                # Redirects are not followed: they would carry the input and the callback token to wherever
                # Location points (and a 301/302 turns the POST into a GET without its body).
                async with self._session.request(step.method, url, data=payload, headers=headers,
                                                 allow_redirects=False, timeout=_timeout(timeout_s)) as resp:
                    body = await resp.read()
                    status, content_type = resp.status, resp.headers.get("Content-Type")
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = exc
        if failure is not None:
            _forget_frames(failure)
            metrics.CALLS.labels("unreachable").inc()
            # The driver's text may quote the URL called, whose `aetr=` parameter holds the callback token.
            reason = f"no answer within {timeout_s:g} s" if isinstance(failure, TimeoutError) else redact(str(failure))
            await self.coordinator.attempt_failed(
                node.id, node.attempt, f"{step.method} {step.url} failed: {reason or type(failure).__name__}", "http",
                retryable=True, source="dispatch")
            return
        ms = round((time.monotonic() - started) * 1000, 1)
        metrics.CALLS.labels(f"{status // 100}xx").inc()
        answer = {"attempt": node.attempt, "status": status, "ms": ms}
        if 200 <= status < 300:
            if step.mode == "callback":
                record = EventRecord(node.root_id, node.id, "dispatch", answer, utcnow())
                self.coordinator.call_answered(FinishCall(node.id, node.attempt, record=record))
                return
            try:
                output = check_json(parse_body(body, content_type), parsed=True)
            except orjson.JSONDecodeError:
                await self.coordinator.attempt_failed(
                    node.id, node.attempt, f"{step.url} answered {status} with a body that is not valid JSON",
                    "http", retryable=False, source="dispatch")
                return
            except ValueError as exc:
                await self.coordinator.attempt_failed(
                    node.id, node.attempt, f"{step.url} answered {status} with a body AETR cannot store: it {exc}",
                    "http", retryable=False, source="dispatch")
                return
            await self.coordinator.step_succeeded(node.id, node.attempt, output, source="dispatch")
            return
        excerpt = body[:BODY_EXCERPT].decode("utf-8", errors="replace")
        message = f"{step.method} {step.url} answered HTTP {status}: {excerpt}".rstrip(": ")
        if retry_after:
            message += f" (Retry-After: {retry_after})"
        if 300 <= status < 400:
            message += (f" (a redirect to {resp.headers.get('Location', 'nowhere')!r}: AETR does not follow "
                        "redirects; set the step's url to the final address)")
        retryable = status >= 500 or status == 429
        await self.coordinator.attempt_failed(node.id, node.attempt, message, "http", retryable, source="dispatch",
                                              retry_after_s=parse_retry_after(retry_after))

