"""The dispatcher: calls one attempt of an api step over HTTP and reports the answer to the coordinator."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import orjson
from yarl import URL

from aetr.config import MIB
from aetr.domain.hosts import AllowedHosts
from aetr.domain.jsonvalue import check_parsed
from aetr.domain.kinds import ApiSpec, api
from aetr.domain.runs import EventRecord, Node, Work
from aetr.domain.steps import framing_headers
from aetr.domain.urls import redact_userinfo
from aetr.engine import metrics, tracing
from aetr.engine.calls import Answer, CallFailed, InlineCaller, ProcessCaller
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.engine.pacing import CallbackWindow
from aetr.engine.tokens import TokenSigner, redact
from aetr.store import ClaimedWork
from aetr.store.sql import FinishCall

log = logging.getLogger("aetr.dispatch")

# A call made this many seconds after it was due (its process restarted, or calls queued for a connection)
# moves its attempt's deadlines to count from the call.
LATE_CALL_S = 1.0
ANSWER_TIMEOUT_S = 30.0  # seconds a callback-mode step has to answer the call itself (not to finish)
BODY_EXCERPT = 300  # characters of an error answer kept in the node's error message
INLINE_UP_TO = 4  # calls under way that this process makes itself before it hands calls to its call process


def parse_body(body: bytes, content_type: str | None) -> Any:
    """A step's output from an HTTP body: JSON when it is JSON, else the text.

    Raises orjson.JSONDecodeError for a body that says it is JSON and is not, and ValueError (saying why) for
    JSON that AETR cannot store exactly, such as an integer beyond 64 bits.
    """
    if not body:
        return None
    if content_type and "json" in content_type:
        value = orjson.loads(body)  # the caller turns a JSONDecodeError into a clear answer
    else:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body.decode("utf-8", errors="replace")
    return check_parsed(value, body)


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


_RANDOM = random.Random()  # the dispatcher's own: drawing from it leaves the random module's sequence alone


def _span_id() -> str:
    # A trace's span id only has to differ from its siblings': no system call for secure randomness per call.
    return f"{_RANDOM.getrandbits(64) or 1:016x}"


@functools.lru_cache(maxsize=1024)
def _encoded(url: str) -> tuple[str, str]:
    """A step's URL as yarl encodes it, and its host."""
    parsed = URL(url)
    return str(parsed), parsed.raw_host or ""


def _shown(text: str) -> str:
    """A message as the run shows it: no callback token, no password of a step's URL."""
    return redact_userinfo(redact(text))


class Dispatcher:
    """Makes step calls through a caller: in a process of its own (`calls_apart`), or in this one."""

    def __init__(self, coordinator: Coordinator, signer: TokenSigner, callback_base: str,
                 max_connections: int, max_payload_bytes: int = 16 * MIB,
                 allowed_hosts: AllowedHosts | None = None, window: CallbackWindow | None = None,
                 calls_apart: bool = False) -> None:
        self.coordinator = coordinator
        self.window = window
        self.signer = signer
        self.callback_base = callback_base
        # A callback URL percent-encoded for the `aetr=` query parameter: its prefix once, and the token as it is
        # (a token's characters are all unreserved: quote would leave them alone, at 4 µs a call).
        self._callbacks_at = f"{callback_base}/api/v1/callbacks/"
        self._callbacks_at_quoted = quote(self._callbacks_at, safe="")
        self.max_payload_bytes = max_payload_bytes
        self.allowed_hosts = allowed_hosts
        # Calls wait for a slot here, before their time-out starts: aiohttp counts the wait for a pooled
        # connection against the request's time-out, which failed calls that had never been sent.
        self._slots = asyncio.Semaphore(max_connections)
        self.inline = InlineCaller(max_connections, allowed_hosts)
        # With `calls_apart`, the calls made while INLINE_UP_TO are already under way go to a process of their
        # own: there the serving process spends ~20 µs of its CPU on a call instead of ~120 (a busy process is
        # what every step waits for), and the first few, at the lowest latency, in this one (a chain's next step
        # waits for its call alone).
        self.apart = ProcessCaller(max_connections, allowed_hosts) if calls_apart else None
        self._calling = 0  # calls under way
        # Why a URL's host may not be called, judged once per host: None when allowed or to be judged once resolved.
        self._host_problem = functools.lru_cache(maxsize=1024)(
            allowed_hosts.url_host_problem if allowed_hosts is not None else lambda host: None)

    async def start(self) -> None:
        """Get ready to call: open the HTTP session, and start the call process."""
        await self.inline.start()
        if self.apart is not None:
            await self.apart.start()
        if self.window is not None:
            self.window.start()

    async def close(self) -> None:
        """Close the HTTP session, and stop the call process."""
        if self.window is not None:
            await self.window.stop()
        await self.inline.close()
        if self.apart is not None:
            await self.apart.close()

    async def _fail(self, node: Node, message: str, retryable: bool, retry_after_s: float | None = None) -> None:
        if self.window is not None:
            self.window.leave((node.id, node.attempt))
        await self.coordinator.attempt_failed(node.id, node.attempt, _shown(message), "http", retryable,
                                              source="dispatch", retry_after_s=retry_after_s)

    async def dispatch(self, claimed: ClaimedWork) -> None:
        """Call the step for a leased dispatch row (with its node as committed), unless the attempt is over."""
        w, node = claimed.work, claimed.node
        if node is None or node.state != "executing" or node.attempt != w.attempt:
            self.coordinator.call_answered(FinishCall(w.node_id, w.attempt))
            return
        step = api.spec_of(node)
        target = f"{step.method} {step.url}"
        if framing := framing_headers(step.headers):  # stored before such headers were refused
            await self._fail(node, f"{target} not called: the step sets {', '.join(framing)}, which AETR manages "
                                   "itself; PUT the step again without them", retryable=False)
            return
        token = self.signer.sign(node.id, node.attempt)
        callback = f"{self._callbacks_at}{token}"
        # The step's URL as yarl encodes it, once; the query added to it is encoded here.
        encoded, host = _encoded(step.url)
        url = f"{encoded}{'&' if '?' in step.url else '?'}aetr={self._callbacks_at_quoted}{token}"
        if (problem := self._host_problem(host)) is not None:
            await self._fail(node, f"{target} not called: {problem}", retryable=False)
            return
        # Traced, the attempt's own span; else (or for a run started untraced) a span of the run's id as trace.
        traced = await tracing.traceparent(node, self.coordinator.store) if tracing.TRACER is not None else None
        headers = {**step.headers, "Content-Type": "application/json", "AETR-Callback": callback,
                   "AETR-Run-Id": node.root_id, "AETR-Node-Id": node.id, "AETR-Attempt": str(node.attempt),
                   "traceparent": traced or f"00-{node.root_id.replace('-', '')}-{_span_id()}-01"}
        timeout_s = step.timeout_s if step.mode == "sync" else min(step.timeout_s, ANSWER_TIMEOUT_S)
        raw = orjson.dumps(node.input)
        limit = self.max_payload_bytes
        # Only a sync step's output is needed whole; of any other answer, the start of an error's text.
        keep_ok = limit if step.mode == "sync" else BODY_EXCERPT
        answer: Answer | None = None
        failure: tuple[str, str] | None = None  # its kind and message: the exception itself holds the frames
        if self.window is not None and step.mode == "callback":
            await self.window.enter((node.id, node.attempt))  # callbacks first: see aetr.engine.pacing
        async with self._slots:  # calls wait for a slot before their time-out starts (see __init__)
            started, called_at = time.monotonic(), utcnow()
            metrics.call_made(node.id, node.attempt, started)
            if traced is not None:
                tracing.called(node)
            caller: InlineCaller | ProcessCaller = self.inline
            coming: asyncio.Future[None] | None = None
            if self.apart is not None and self._calling >= INLINE_UP_TO:
                caller = self.apart
                metrics.CALLS_APART.inc()
            if self.apart is not None and step.mode == "callback":
                # With a call process, a step's report often comes before its answer, which comes the longer way
                # round: the report then waits a little for it (Coordinator._event), for the history's order.
                coming = self.coordinator.answers_coming[node.id] = asyncio.get_running_loop().create_future()
            self._calling += 1
            try:
                answer = await caller.call(step.method, url, headers, raw, timeout_s, limit, keep_ok, BODY_EXCERPT)
            except CallFailed as exc:
                failure = (exc.kind, str(exc))
            finally:
                self._calling -= 1
        try:
            await self._answered(node, w, step, target, answer, failure, started, called_at)
        finally:
            if coming is not None:
                if self.coordinator.answers_coming.get(node.id) is coming:
                    del self.coordinator.answers_coming[node.id]
                coming.set_result(None)

    async def _answered(self, node: Node, w: Work, step: ApiSpec, target: str, answer: Answer | None,
                        failure: tuple[str, str] | None, started: float, called_at: datetime) -> None:
        """Record what the call came to: its answer, the step's output (sync), or the attempt's failure."""
        limit = self.max_payload_bytes
        if failure is not None or answer is None:
            assert failure is not None
            kind, why = failure
            if kind == "refused":
                metrics.call_ended("refused")
                await self._fail(node, f"{target} not called: {why}", retryable=False)
                return
            metrics.call_ended("unreachable")
            # The driver's text may quote the URL called, whose `aetr=` parameter holds the callback token.
            await self._fail(node, f"{target} failed: {why}", retryable=True)
            return
        status, body, over = answer.status, answer.body, answer.over
        ms = round((time.monotonic() - started) * 1000, 1)
        metrics.call_ended(f"{status // 100}xx")
        too_big = (f"a body over the payload limit of {limit} bytes (AETR_MAX_PAYLOAD_BYTES), not read past "
                   "the limit")
        if 200 <= status < 300:
            if over:
                # Calling again would bring the same answer: the attempt fails for good.
                await self._fail(node, f"{target} answered {status} with {too_big}: make the answer smaller "
                                       "(answer with where the data is) or raise the limit", retryable=False)
                return
            if step.mode == "callback":
                said = {"attempt": node.attempt, "status": status, "ms": ms, "step": node.step.name}
                record = EventRecord(node.root_id, node.id, "dispatch", said, utcnow())
                late = called_at - w.due_at > timedelta(seconds=LATE_CALL_S)
                self.coordinator.call_answered(FinishCall(
                    node.id, node.attempt, record=record,
                    deadline_at=called_at + timedelta(seconds=step.timeout_s) if late else None,
                    heartbeat_at=called_at + timedelta(seconds=step.heartbeat_s)
                    if late and step.heartbeat_s is not None else None))
                return
            try:
                output = parse_body(body, answer.content_type)
            except orjson.JSONDecodeError:
                await self._fail(node, f"{target} answered {status} with a body that is not valid JSON",
                                 retryable=False)
                return
            except ValueError as exc:
                await self._fail(node, f"{target} answered {status} with a body AETR cannot store exactly: {exc}",
                                 retryable=False)
                return
            await self.coordinator.step_succeeded(node.id, node.attempt, output, source="dispatch")
            return
        excerpt = body[:BODY_EXCERPT].decode("utf-8", errors="replace")
        message = f"{target} answered HTTP {status}"
        if over:
            message += f" with {too_big}"
        message = f"{message}: {excerpt}".rstrip(": ")
        if answer.retry_after:
            message += f" (Retry-After: {answer.retry_after})"
        if 300 <= status < 400:
            message += (f" (a redirect to {answer.location or 'nowhere'!r}: AETR does not follow "
                        "redirects; set the step's url to the final address)")
        await self._fail(node, message, retryable=status >= 500 or status == 429,
                         retry_after_s=parse_retry_after(answer.retry_after))
