"""The dispatcher: calls one attempt of an api step over HTTP and reports the answer to the coordinator."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import random
import socket
import time
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from aetr.config import MIB
from aetr.domain.hosts import AllowedHosts, address_of
from aetr.domain.jsonvalue import check_parsed
from aetr.domain.kinds import api
from aetr.domain.runs import EventRecord, Node
from aetr.domain.steps import framing_headers
from aetr.domain.urls import redact_userinfo
from aetr.engine import metrics, tracing
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
STREAM_OVER_BYTES = 1024 * 1024  # inputs larger than this are streamed to the step
BODY_EXCERPT = 300  # characters of an error answer kept in the node's error message


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


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, keep: int) -> tuple[bytes, bool]:
    """The first `keep` bytes of an answer's body, and whether the body is over `limit` bytes.

    The body is never read past `limit` (nor at all when its Content-Length is over it), and only what is kept
    is held: a step answering gigabytes costs no more memory than the limit.
    """
    if resp.content_length is not None and resp.content_length > limit:
        return b"", True
    chunks: list[bytes] = []
    kept = seen = 0
    async for chunk in resp.content.iter_any():
        seen += len(chunk)
        if seen > limit:
            return b"".join(chunks), True
        if kept < keep:
            chunks.append(chunk if kept + len(chunk) <= keep else chunk[:keep - kept])
            kept += len(chunks[-1])
    return b"".join(chunks), False


class HostRefused(Exception):
    """A step's host is outside AETR_ALLOWED_STEP_HOSTS (an OSError would be taken for a retryable DNS failure)."""


class AllowListResolver(AbstractResolver):
    """Resolves names as aiohttp does, keeping only the addresses the allow-list covers (all, for a listed name).

    aiohttp connects to nothing but what its resolver returns, so a name that resolves (or is made to resolve)
    to a forbidden address is refused after resolution, not merely by its spelling.
    """

    def __init__(self, allowed: AllowedHosts) -> None:
        self._allowed = allowed
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """The addresses of `host` that steps may be called on; HostRefused when there are none."""
        results = await self._inner.resolve(host, port, family)
        if self._allowed.lists_name(host):
            return results
        kept = [r for r in results if (a := address_of(r["host"])) is not None and self._allowed.covers(a)]
        if not kept:
            raise HostRefused(self._allowed.refusal(host, dict.fromkeys(r["host"] for r in results)))
        return kept

    async def close(self) -> None:
        """Release the resolver underneath."""
        await self._inner.close()


def _shown(text: str) -> str:
    """A message as the run shows it: no callback token, no password of a step's URL."""
    return redact_userinfo(redact(text))


class Dispatcher:
    """Makes step calls with one shared aiohttp session (it holds up under concurrency where httpx does not)."""

    def __init__(self, coordinator: Coordinator, signer: TokenSigner, callback_base: str,
                 max_connections: int, max_payload_bytes: int = 16 * MIB,
                 allowed_hosts: AllowedHosts | None = None, window: CallbackWindow | None = None) -> None:
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
        self._max_connections = max_connections
        # Calls wait for a slot here, before their time-out starts: aiohttp counts the wait for a pooled
        # connection against the request's time-out, which failed calls that had never been sent.
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._resolver: AllowListResolver | None = None
        # Why a URL's host may not be called, judged once per host: None when allowed or to be judged once resolved.
        self._host_problem = functools.lru_cache(maxsize=1024)(
            allowed_hosts.url_host_problem if allowed_hosts is not None else lambda host: None)

    async def start(self) -> None:
        """Open the HTTP session."""
        if self.allowed_hosts is not None:
            self._resolver = AllowListResolver(self.allowed_hosts)
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300,
                                         resolver=self._resolver)
        # No cookie jar: a Set-Cookie in one step's answer must not ride along on later calls (another run's).
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              json_serialize=lambda v: orjson.dumps(v).decode())
        if self.window is not None:
            self.window.start()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.window is not None:
            await self.window.stop()
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

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
        url = URL(f"{_encoded(step.url)}{'&' if '?' in step.url else '?'}aetr={self._callbacks_at_quoted}{token}",
                  encoded=True)
        if (problem := self._host_problem(url.raw_host or "")) is not None:
            await self._fail(node, f"{target} not called: {problem}", retryable=False)
            return
        # Traced, the attempt's own span; else (or for a run started untraced) a span of the run's id as trace.
        traced = await tracing.traceparent(node, self.coordinator.store) if tracing.TRACER is not None else None
        headers = {**step.headers, "Content-Type": "application/json", "AETR-Callback": callback,
                   "AETR-Run-Id": node.root_id, "AETR-Node-Id": node.id, "AETR-Attempt": str(node.attempt),
                   "traceparent": traced or f"00-{node.root_id.replace('-', '')}-{_span_id()}-01"}
        timeout_s = step.timeout_s if step.mode == "sync" else min(step.timeout_s, ANSWER_TIMEOUT_S)
        raw = orjson.dumps(node.input)
        # aiohttp streams file-like bodies instead of writing a large one in one go
        payload: bytes | io.BytesIO = io.BytesIO(raw) if len(raw) > STREAM_OVER_BYTES else raw
        limit = self.max_payload_bytes
        assert self._session is not None
        failure: BaseException | None = None
        if self.window is not None and step.mode == "callback":
            await self.window.enter((node.id, node.attempt))  # callbacks first: see aetr.engine.pacing
        async with self._slots:  # calls wait for a slot before their time-out starts (see __init__)
            started, called_at = time.monotonic(), utcnow()
            metrics.call_made(node.id, node.attempt, started)
            if traced is not None:
                tracing.called(node)
            try:
                # Redirects are not followed: they would carry the input and the callback token to wherever
                # Location points (and a 301/302 turns the POST into a GET without its body).
                async with self._session.request(step.method, url, data=payload, headers=headers,
                                                 allow_redirects=False, timeout=_timeout(timeout_s)) as resp:
                    status, content_type = resp.status, resp.headers.get("Content-Type")
                    retry_after, location = resp.headers.get("Retry-After"), resp.headers.get("Location")
                    # Only a sync step's output is needed whole; of any other answer, the start of an error's text.
                    keep = limit if step.mode == "sync" and 200 <= status < 300 else BODY_EXCERPT
                    body, over = await read_bounded(resp, limit, keep)
                    if over:
                        resp.close()  # the rest is never read: drop the connection rather than drain it
            except (aiohttp.ClientError, TimeoutError, OSError, HostRefused) as exc:
                failure = exc
        if failure is not None:
            _forget_frames(failure)
            if isinstance(failure, HostRefused):
                metrics.call_ended("refused")
                await self._fail(node, f"{target} not called: {failure}", retryable=False)
                return
            metrics.call_ended("unreachable")
            # The driver's text may quote the URL called, whose `aetr=` parameter holds the callback token.
            reason = f"no answer within {timeout_s:g} s" if isinstance(failure, TimeoutError) else str(failure)
            await self._fail(node, f"{target} failed: {reason or type(failure).__name__}", retryable=True)
            return
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
                answer = {"attempt": node.attempt, "status": status, "ms": ms, "step": node.step.name}
                record = EventRecord(node.root_id, node.id, "dispatch", answer, utcnow())
                late = called_at - w.due_at > timedelta(seconds=LATE_CALL_S)
                self.coordinator.call_answered(FinishCall(
                    node.id, node.attempt, record=record,
                    deadline_at=called_at + timedelta(seconds=step.timeout_s) if late else None,
                    heartbeat_at=called_at + timedelta(seconds=step.heartbeat_s)
                    if late and step.heartbeat_s is not None else None))
                return
            try:
                output = parse_body(body, content_type)
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
        if retry_after:
            message += f" (Retry-After: {retry_after})"
        if 300 <= status < 400:
            message += (f" (a redirect to {location or 'nowhere'!r}: AETR does not follow "
                        "redirects; set the step's url to the final address)")
        await self._fail(node, message, retryable=status >= 500 or status == 429,
                         retry_after_s=parse_retry_after(retry_after))
