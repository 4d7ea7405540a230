"""The AETR HTTP client: one async method per route of the `/api/v1` contract."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import quote

import aiohttp
import orjson
import yarl

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATES",
    "AetrConnectionError",
    "AetrError",
    "Applied",
    "Client",
]

DEFAULT_URL: Final = "http://127.0.0.1:9999"
# A node's states that never change again. A run's root is never `skipped` (only the children of a choice that
# were not chosen are), so `wait_run` ends on the first three alone; `skipped` is here for callers that walk nodes.
TERMINAL_STATES: Final = frozenset({"complete", "error", "cancelled", "skipped"})
MAX_WAIT_S: Final = 60.0  # seconds; the server's cap on `?wait=`
REQUEST_TIMEOUT_S: Final = 30.0  # seconds; for requests that do not long-poll
PURGE_TIMEOUT_S: Final = 3600.0  # seconds; a purge answers once every run it deletes is gone, batch after batch
# A server that ignores `?wait=` must not turn `wait_run` into a busy loop.
MIN_POLL_INTERVAL_S: Final = 0.25  # seconds
DETAIL_MAX_CHARS: Final = 500
APPLIED_HEADER: Final = "AETR-Applied"  # what a PUT of a step did to each step it defines


class AetrError(Exception):
    """A non-2xx answer from AETR, carrying the server's `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class AetrConnectionError(AetrError):
    """No answer from AETR at all (status 0): unreachable, connection lost, or timed out."""

    def __init__(self, base_url: str, detail: str) -> None:
        super().__init__(0, detail)
        self.base_url = base_url


class _Unset(enum.Enum):
    """Marks an argument not given where None is a value that can be given (a signal's `output: null`)."""

    UNSET = enum.auto()


UNSET: Final = _Unset.UNSET


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of a PUT of a step: whether it was created, the resolved tree, and what became of each step
    the definition holds, inline ones too ("created", "changed" or "unchanged"; empty from a server that does
    not say). A definition of thousands of steps has only the first ones said, created and changed ones first;
    `unlisted` is how many are not."""

    created: bool
    step: dict[str, Any]
    outcomes: dict[str, str] = field(default_factory=dict)
    unlisted: int = 0


def _segment(value: str) -> str:
    # Quote everything, "/" included, so a name or id is always exactly one path segment.
    return quote(str(value), safe="")


def _detail(status: int, reason: str | None, body: bytes) -> str:
    """The human-readable `detail` of an error answer, whatever its body looks like."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:DETAIL_MAX_CHARS] or (reason or f"HTTP {status}")
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        return detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return orjson.dumps(data).decode()[:DETAIL_MAX_CHARS]


class Client:
    """Async client for one AETR server; use it as `async with Client(...) as c:`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return (status, decoded JSON body or None), raising AetrError on non-2xx."""
        status, body, _ = await self._exchange(method, path, body=body, params=params, headers=headers,
                                               timeout_s=timeout_s)
        return status, body

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """Send one request; return (status, decoded JSON body or None, answer headers with lowercase names),
        raising AetrError on non-2xx."""
        if self._session is None:
            raise RuntimeError("Client is not open: use `async with Client(...) as client:`")
        # encoded=True: keep our quoting as is (yarl would otherwise normalise a step named "..").
        url = yarl.URL(f"{self.base_url}/api/v1{path}", encoded=True)
        if params:
            url = url.update_query(params)
        send_headers = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            send_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with self._session.request(method, url, data=data, headers=send_headers, timeout=timeout) as response:
                raw = await response.read()
                status, reason = response.status, response.reason
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError as exc:
            # Checked first: aiohttp's ServerTimeoutError is also a ClientConnectionError.
            limit = timeout_s if timeout_s is not None else self._timeout_s
            raise AetrConnectionError(
                self.base_url, f"AETR at {self.base_url} did not answer within {limit:g}s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise AetrConnectionError(
                self.base_url, f"cannot reach AETR at {self.base_url} — is `aetr serve` running?"
            ) from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise AetrConnectionError(
                self.base_url, f"{self.base_url!r} is not an AETR URL: give one like {DEFAULT_URL}"
            ) from exc
        except aiohttp.ClientError as exc:
            reason = str(exc) or type(exc).__name__
            raise AetrConnectionError(
                self.base_url, f"lost the connection to AETR at {self.base_url}: {reason}"
            ) from exc
        if not 200 <= status < 300:
            raise AetrError(status, _detail(status, reason, raw))
        if not raw:
            return status, None, answer_headers
        try:
            return status, orjson.loads(raw), answer_headers
        except orjson.JSONDecodeError as exc:
            raise AetrError(status, f"the server answered with a body that is not JSON: {raw[:80]!r}") from exc

    # Steps

    async def apply_step(self, spec: dict[str, Any], if_match: int | None = None, *,
                         dry_run: bool = False) -> Applied:
        """Create or replace the step `spec["name"]` (and its inline children); a step defined as it is stored
        is left unchanged. With `dry_run`, what it would do, with nothing changed."""
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError('a step definition needs a "name" (a non-empty string)')
        headers = {"If-Match": str(if_match)} if if_match is not None else None
        params = {"dry_run": "true"} if dry_run else None
        status, tree, answer = await self._exchange("PUT", f"/steps/{_segment(name)}", body=spec, headers=headers,
                                                    params=params)
        said = answer.get(APPLIED_HEADER.lower(), "")
        outcomes = dict(pair.split("=", 1) for pair in said.split() if "=" in pair)
        unlisted = outcomes.pop("+more", "0")
        return Applied(created=status == 201 or outcomes.get(name) == "created", step=cast(dict[str, Any], tree),
                       outcomes=outcomes, unlisted=int(unlisted) if unlisted.isdigit() else 0)

    async def put_step(self, spec: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        """Create or replace a step; return its resolved tree."""
        return (await self.apply_step(spec, if_match)).step

    async def get_step(self, name_or_id: str) -> dict[str, Any]:
        """The resolved step tree of a step, by name or id."""
        _, tree = await self._request("GET", f"/steps/{_segment(name_or_id)}")
        return cast(dict[str, Any], tree)

    async def list_steps(self) -> list[dict[str, Any]]:
        """Every step as `{id, name, kind, version, updated_at}`, sorted by name."""
        _, steps = await self._request("GET", "/steps")
        return cast(list[dict[str, Any]], steps)

    async def step_parents(self, name: str) -> list[dict[str, Any]]:
        """The steps that have `name` as a child."""
        _, parents = await self._request("GET", f"/steps/{_segment(name)}/parents")
        return cast(list[dict[str, Any]], parents)

    async def delete_step(self, name: str) -> None:
        """Delete a step that no other step uses."""
        await self._request("DELETE", f"/steps/{_segment(name)}")

    # Runs

    async def start_run(self, step: str, input: Any, idempotency_key: str | None = None,
                        notify: str | None = None) -> dict[str, Any]:
        """Start a run of `step` with `input`; the same idempotency key returns the same run. `notify`: a URL
        told of the run's end with a CloudEvent."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        body: dict[str, Any] = {"step": step, "input": input}
        if notify is not None:
            body["notify"] = notify
        _, run = await self._request("POST", "/runs", body=body, headers=headers)
        return cast(dict[str, Any], run)

    async def get_run(self, id: str, wait: float | None = None) -> dict[str, Any]:
        """The whole run tree; with `wait`, answered once terminal or after `wait` seconds (≤ 60)."""
        params = {"wait": f"{wait:g}"} if wait is not None else None
        # A long poll legitimately lasts `wait` seconds: give the request that much on top of the usual.
        timeout_s = self._timeout_s + wait if wait is not None else None
        _, run = await self._request("GET", f"/runs/{_segment(id)}", params=params, timeout_s=timeout_s)
        return cast(dict[str, Any], run)

    # The timeout is part of this method's meaning, not a wrapper: it sizes each `?wait=` long poll.
    async def wait_run(self, id: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the run is terminal and return it; raise TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            asked_at = time.monotonic()
            remaining = deadline - asked_at
            run = await self.get_run(id, wait=max(0.0, min(MAX_WAIT_S, remaining)))
            if run.get("state") in TERMINAL_STATES:
                return run
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"run {id} is still {run.get('state')} after {timeout:g}s")
            if now - asked_at < MIN_POLL_INTERVAL_S:
                await asyncio.sleep(min(MIN_POLL_INTERVAL_S, deadline - now))

    async def list_runs(
        self,
        state: str | None = None,
        step: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        id_prefix: str | None = None,
    ) -> dict[str, Any]:
        """One page of root runs, newest first; `id_prefix` keeps those whose id starts with it."""
        given = {"state": state, "step": step, "limit": limit, "cursor": cursor, "id_prefix": id_prefix}
        params = {key: str(value) for key, value in given.items() if value is not None}
        _, page = await self._request("GET", "/runs", params=params)
        return cast(dict[str, Any], page)

    async def run_events(self, id: str) -> list[dict[str, Any]]:
        """The run's history, oldest first."""
        _, events = await self._request("GET", f"/runs/{_segment(id)}/events")
        return cast(list[dict[str, Any]], events)

    async def cancel_run(self, id: str) -> dict[str, Any]:
        """Cancel every non-terminal node of the run."""
        _, run = await self._request("POST", f"/runs/{_segment(id)}/cancel")
        return cast(dict[str, Any], run)

    async def retry_run(self, id: str) -> dict[str, Any]:
        """Run the failed and cancelled nodes of a run in `error` or `cancelled` again."""
        _, run = await self._request("POST", f"/runs/{_segment(id)}/retry")
        return cast(dict[str, Any], run)

    async def delete_run(self, id: str) -> None:
        """Delete an ended run with its nodes and history (AetrError 409 while it has not ended)."""
        await self._request("DELETE", f"/runs/{_segment(id)}")

    async def purge_runs(self, older_than_s: float) -> int:
        """Delete every run that ended more than `older_than_s` seconds ago; how many were deleted."""
        _, answer = await self._request("POST", "/retention/purge", body={"older_than_s": older_than_s},
                                        timeout_s=PURGE_TIMEOUT_S)
        return int(cast(dict[str, Any], answer)["deleted"])

    async def signal(
        self, run_id: str, node_id: str, *, output: Any = UNSET, error: str | None = None
    ) -> dict[str, Any]:
        """Answer a signal wait, and return the run tree: with `output` (any JSON, None too) the wait completes
        with it; with `error` (a message) it fails, error kind `signal`. Give exactly one of the two.

        The server answers 404 for a node that is not in the run, 409 for a node that is not a wait awaiting
        its signal (already answered, timed out, cancelled, or another kind of step)."""
        if (output is UNSET) == (error is None):
            raise ValueError("give exactly one of `output` (the wait completes with it) or `error` (it fails)")
        if error is not None and not error:
            raise ValueError("`error` must be a non-empty message")
        body = {"output": output} if error is None else {"error": error}
        path = f"/runs/{_segment(run_id)}/nodes/{_segment(node_id)}/signal"
        _, run = await self._request("POST", path, body=body)
        return cast(dict[str, Any], run)

    # Schedules

    async def apply_schedule(self, spec: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create or replace the schedule `spec["name"]`; (created, the schedule as stored)."""
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError('a schedule definition needs a "name" (a non-empty string)')
        status, schedule = await self._request("PUT", f"/schedules/{_segment(name)}", body=spec)
        return status == 201, cast(dict[str, Any], schedule)

    async def put_schedule(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a schedule (`step`, `cron`, `timezone`, `enabled`, `input`, `notify`)."""
        _, schedule = await self._request("PUT", f"/schedules/{_segment(name)}", body=spec)
        return cast(dict[str, Any], schedule)

    async def get_schedule(self, name: str) -> dict[str, Any]:
        """A schedule with its `next_run_at` and `last_runs`."""
        _, schedule = await self._request("GET", f"/schedules/{_segment(name)}")
        return cast(dict[str, Any], schedule)

    async def list_schedules(self) -> list[dict[str, Any]]:
        """Every schedule, by name."""
        _, schedules = await self._request("GET", "/schedules")
        return cast(list[dict[str, Any]], schedules)

    async def delete_schedule(self, name: str) -> None:
        """Delete a schedule (the runs it started are kept)."""
        await self._request("DELETE", f"/schedules/{_segment(name)}")

    async def set_schedule_enabled(self, name: str, enabled: bool) -> dict[str, Any]:
        """Pause (False) or resume (True) a schedule; resuming starts none of the times it missed meanwhile."""
        schedule = await self.get_schedule(name)
        return await self.put_schedule(name, {**schedule, "enabled": enabled})
