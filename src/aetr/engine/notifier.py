"""The notifier: delivers a `notify` work row — one CloudEvent announcing a run's end — and records each try.

A delivery is at least once: a 2xx answer ends it; any other answer, a connection error or a time-out is
tried again after an exponential wait (aetr.domain.notify.Backoff) until the window after the run's end has
passed, the row's due time and tries kept in the database so that restarts and other processes go on where
it stopped. Every try is a `notify` line in the run's history.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import aiohttp
from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent
from yarl import URL

from aetr.domain.hosts import AllowedHosts
from aetr.domain.notify import EVENT_TYPES, Backoff, event_data, notification_id
from aetr.domain.runs import EventRecord, Node, Work
from aetr.domain.urls import redact_userinfo
from aetr.engine import metrics
from aetr.engine.calls import AllowListResolver, HostRefused
from aetr.engine.coordinator import utcnow
from aetr.store import ClaimedWork, Store
from aetr.store.sql import FinishCall, FinishCalls, LoadRoot, NotifyTried, single

log = logging.getLogger("aetr.notify")

MAX_DELIVERY_S = 10.0  # seconds a receiver has to answer one try (at most a third of the work lease)
MAX_CONNECTIONS = 32  # connections to receivers open at once: notifications must not crowd out step calls
ERROR_EXCERPT = 200  # characters of a refusing answer's body kept in the history
SHOWN_FIRST = ("attempt", "outcome", "status", "error", "next_at", "reason")


def cloud_event(root: Node, source: str) -> CloudEvent:
    """The CloudEvent announcing the end of the run `root` (which has ended)."""
    attributes: dict[str, Any] = {
        "id": notification_id(root), "source": source, "type": EVENT_TYPES[root.state], "subject": root.id,
        "time": root.completed_at or utcnow(), "datacontenttype": "application/json",
    }
    return CloudEvent(attributes, event_data(root))


def encode(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """The event in structured JSON mode: the HTTP headers and body of a delivery."""
    message = to_structured_event(event)
    return dict(message.headers), message.body


class Notifier:
    """POSTs run-end CloudEvents to the runs' notify URLs, with one aiohttp session of its own."""

    def __init__(self, store: Store, source: str, backoff: Backoff, lease_s: float,
                 allowed_hosts: AllowedHosts | None = None) -> None:
        self.store = store
        self.source = source
        self.backoff = backoff
        self.allowed_hosts = allowed_hosts
        self.timeout = aiohttp.ClientTimeout(total=min(MAX_DELIVERY_S, lease_s / 3))
        self._session: aiohttp.ClientSession | None = None
        self._resolver: AllowListResolver | None = None

    async def start(self) -> None:
        """Open the HTTP session (its resolver keeps to the step-host allow-list, like the dispatcher's)."""
        if self.allowed_hosts is not None:
            self._resolver = AllowListResolver(self.allowed_hosts)
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=300, resolver=self._resolver)
        # No cookie jar: one receiver's Set-Cookie is not sent with the notifications of other runs.
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def deliver(self, claimed: ClaimedWork, owner: str) -> None:
        """Make one try of a leased `notify` row and record it: done, to be tried again, or given up."""
        w = claimed.work
        root: Node | None = await self.store.run(single(LoadRoot(w.root_id)))
        if root is None:  # the run was deleted meanwhile: nobody is left to tell about
            await self.store.run(single(FinishCalls([FinishCall(w.node_id, w.attempt, "notify")])))
            return
        tries = w.attempt + 1
        data: dict[str, Any] = {"id": w.node_id, "attempt": tries, "url": redact_userinfo(root.notify or "")}
        if not root.terminal or notification_id(root) != w.node_id:
            # Retried and running again (or ended again, which has a notification of its own).
            data.update(outcome="superseded", reason=f"the run went on: it is {root.state} now")
            await self._record(w, owner, root, data, None)
            return
        headers, body = encode(cloud_event(root, self.source))
        status, problem, final = await self._post(root.notify or "", headers, body)
        if status is not None:
            data["status"] = status
        if problem:
            data["error"] = problem
        now = utcnow()
        if status is not None and 200 <= status < 300:
            data["outcome"] = "delivered"
            await self._record(w, owner, root, data, None)
            return
        next_at = None if final else self.backoff.next_try(tries, root.completed_at or now, now)
        if next_at is None:
            data["outcome"] = "gave_up"
            if not final:
                data["reason"] = f"no 2xx answer within {self.backoff.window_s:g} s of the run's end"
        else:
            data.update(outcome="failed", next_at=next_at.isoformat().replace("+00:00", "Z"))
        await self._record(w, owner, root, data, next_at)

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int | None, str, bool]:
        """One POST: the answer's status (None without one), what went wrong, and whether trying again is pointless."""
        assert self._session is not None
        host = URL(url).raw_host or ""
        if self.allowed_hosts is not None and (problem := self.allowed_hosts.url_host_problem(host)) is not None:
            return None, f"not sent: {problem}", True
        try:
            # Redirects are not followed: the event is for the URL the run was given.
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                          timeout=self.timeout) as resp:
                status = resp.status
                excerpt = "" if 200 <= status < 300 else (await resp.content.read(ERROR_EXCERPT)).decode(
                    "utf-8", errors="replace")
        except HostRefused as exc:
            return None, f"not sent: {exc}", True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = f"no answer within {self.timeout.total:g} s" if isinstance(exc, TimeoutError) else str(exc)
            return None, redact_userinfo(reason or type(exc).__name__), False
        except Exception as exc:  # anything else the client raises is a failed try too, recorded and tried again
            log.exception("sending a notification to %s failed", redact_userinfo(url))
            return None, redact_userinfo(f"{type(exc).__name__}: {exc}"), False
        return status, excerpt.strip(), False

    async def _record(self, w: Work, owner: str, root: Node, data: dict[str, Any], next_at: datetime | None) -> None:
        # What a person reads first comes first (the CLI's history shows the start of a long line).
        ordered = {key: data[key] for key in SHOWN_FIRST if key in data} | data
        record = EventRecord(root.id, root.id, "notify", ordered, utcnow())
        kept = await self.store.run(single(NotifyTried(w.node_id, w.attempt, owner, record, next_at)))
        if kept:
            metrics.NOTIFICATIONS.labels(data["outcome"]).inc()
        else:
            log.info("notification %s of run %s was taken over by another process", w.node_id, root.id)
