"""What AETR sends to a step and what it takes back: values it cannot store, oversized answers, headers, the
passwords of step URLs, and the hosts steps may call."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from aetr.domain.hosts import AllowedHosts
from aetr.domain.kinds import ApiSpec
from aetr.domain.steps import StepConfig, StepDef
from aetr.engine.coordinator import utcnow
from aetr.testing import StepService, never, status
from aetr.testing.step_service import StepRequest
from tests.integration.conftest import Server, running_server

BIG_INTEGER = b"123456789012345678901234567890"
LIMIT = 64 * 1024  # AETR_MAX_PAYLOAD_BYTES for the oversized-answer tests
QUICK = {"max_attempts": 2, "backoff_s": 0.01, "max_backoff_s": 0.02}


def api(svc: StepService, name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), **kw}


def answer(code: int, body: bytes, content_type: str = "application/json") -> Any:
    """A behaviour answering `code` with these exact bytes."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        return web.Response(status=code, body=body, content_type=content_type)

    return behaviour


def streamed(code: int, seconds: float = 20.0) -> Any:
    """A behaviour answering `code` with a chunked body that goes on until AETR hangs up (or `seconds` pass)."""

    async def chunks() -> AsyncIterator[bytes]:
        deadline = asyncio.get_running_loop().time() + seconds
        yield b'"'
        while asyncio.get_running_loop().time() < deadline:
            yield b"x" * 16384

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        return web.Response(status=code, body=chunks(), content_type="application/json")

    return behaviour


# --- values AETR cannot store exactly --------------------------------------------------------------------------


async def test_a_callback_holding_an_integer_beyond_64_bits_is_refused_and_changes_nothing(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    await aetr.put_step(api(steps_service, "a"))
    run_id = await aetr.start("a")
    (call,) = await steps_service.wait_for_calls("/a", 1)
    for content_type in ("application/json", "text/plain"):
        async with aetr.http.post(call.headers["AETR-Callback"], data=b'{"id": ' + BIG_INTEGER + b"}",
                                  headers={"Content-Type": content_type}) as resp:
            assert resp.status == 422, await resp.text()
            detail = (await resp.json())["detail"]
        assert '["id"]' in detail and "64 bits" in detail and "as a string" in detail, detail
    _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert run["state"] == "executing" and run["output"] is None
    assert [e for e in await aetr.events(run_id) if e["kind"].startswith("callback")] == []
    # Sent as the refusal says, and with the largest integer that fits, it is stored exactly.
    exact = b'{"id": "' + BIG_INTEGER + b'", "max": 18446744073709551615}'
    async with aetr.http.post(call.headers["AETR-Callback"], data=exact,
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    run = await aetr.wait_run(run_id)
    assert run["output"] == {"id": BIG_INTEGER.decode(), "max": 2**64 - 1}


async def test_a_sync_answer_holding_an_integer_beyond_64_bits_fails_the_attempt(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/s", answer(200, b'{"total": [' + BIG_INTEGER + b"]}"))
    await aetr.put_step(api(steps_service, "s", mode="sync", retry=QUICK))
    run = await aetr.wait_run(await aetr.start("s"))
    assert run["state"] == "error" and run["output"] is None, run
    assert run["error"]["kind"] == "http" and '["total"][0] does not fit in 64 bits' in run["error"]["message"]
    assert len(steps_service.calls("/s")) == 1  # the same answer would come again: not retried


# --- cookies ----------------------------------------------------------------------------------------------------


async def test_a_cookie_a_step_sets_is_never_sent_on_later_calls(aetr: Server, steps_service: StepService) -> None:
    """Each call is a request of its own: a Set-Cookie in one step's answer is not kept and sent on the calls that
    follow (another run's, another step's on the same host)."""

    async def sets_a_cookie(request: StepRequest) -> web.StreamResponse:
        response = web.json_response({"n": 1})
        response.set_cookie("session", "of-one-run", path="/")
        return response

    steps_service.route("/first", sets_a_cookie)
    steps_service.route("/second", answer(200, b'{"n": 2}'))
    host = f"http://localhost:{steps_service.port}"  # a host name: cookies of an IP address are never kept
    await aetr.put_step({"name": "pair", "kind": "sequential", "children": [
        {"step": {"name": "first", "kind": "api", "url": f"{host}/first", "mode": "sync"}},
        {"step": {"name": "second", "kind": "api", "url": f"{host}/second", "mode": "sync"}}]})
    for _ in range(2):
        run = await aetr.wait_run(await aetr.start("pair"))
        assert run["state"] == "complete", run
    calls = steps_service.calls("/first") + steps_service.calls("/second")
    assert len(calls) == 4
    assert [c.headers.get("Cookie") for c in calls] == [None] * 4


# --- a call longer than the lease ------------------------------------------------------------------------------


async def test_a_call_that_outlasts_its_lease_keeps_it_and_is_made_once(database_url: str,
                                                                       steps_service: StepService) -> None:
    """The process making a call renews the call's lease while the step works: neither it nor another process
    takes the call for one whose maker died, and makes it again."""
    lease_s = 0.4

    async def slow(request: StepRequest) -> web.StreamResponse:
        await asyncio.sleep(lease_s * 4)  # the step works for four leases' time before it answers
        return web.json_response({"done": True})

    steps_service.route("/slow", slow)
    async with running_server(database_url, lease_s=lease_s, poll_s=0.05) as aetr:
        await aetr.put_step(api(steps_service, "slow", mode="sync", timeout_s=30))
        run = await aetr.wait_run(await aetr.start("slow"))
    assert run["state"] == "complete" and run["output"] == {"done": True}, run
    assert len(steps_service.calls("/slow")) == 1


# --- answers over the payload limit ------------------------------------------------------------------------------


async def test_an_answer_over_the_payload_limit_fails_the_attempt_at_once_without_being_read(
        database_url: str, steps_service: StepService) -> None:
    over = b'"' + b"x" * LIMIT + b'"'
    steps_service.route("/sync-sized", answer(200, over))  # with a Content-Length over the limit
    steps_service.route("/sync-endless", streamed(200))  # chunked, and it never ends
    steps_service.route("/accepted", streamed(202))
    steps_service.route("/refused", answer(400, over))
    steps_service.route("/down", streamed(503))
    async with running_server(database_url, max_payload_bytes=LIMIT) as aetr:
        names = {"sync-sized": "sync", "sync-endless": "sync", "accepted": "callback", "refused": "sync",
                 "down": "sync"}
        for name, mode in names.items():
            # A long deadline: ending within the test's wait shows the answer was not read to its end.
            await aetr.put_step(api(steps_service, name, mode=mode, timeout_s=120, retry=QUICK))
        started = asyncio.get_running_loop().time()
        runs = {name: await aetr.start(name) for name in names}
        ended = {name: await aetr.wait_run(run_id, timeout=10) for name, run_id in runs.items()}
        assert asyncio.get_running_loop().time() - started < 10
        for name, run in ended.items():
            assert run["state"] == "error" and run["output"] is None, (name, run)
            message = run["error"]["message"]
            assert run["error"]["kind"] == "http" and f"{LIMIT} bytes (AETR_MAX_PAYLOAD_BYTES)" in message, message
        assert "HTTP 400" in ended["refused"]["error"]["message"]
        # A 2xx or 4xx over the limit fails for good; a 5xx is retried as any 5xx is.
        assert {name: len(steps_service.calls(f"/{name}")) for name in names} == {
            "sync-sized": 1, "sync-endless": 1, "accepted": 1, "refused": 1, "down": 2}
        assert (await aetr.call("GET", "/healthz"))[0] == 200


# --- headers -----------------------------------------------------------------------------------------------------


async def test_a_step_stored_with_a_framing_header_before_they_were_refused_is_not_called(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/old", never())
    old = StepConfig(name="old", spec=ApiSpec(url=steps_service.url("/old"), headers={"Content-Length": "3"}))
    await aetr.engine.store.put_steps([StepDef(old)], None, utcnow())
    run = await aetr.wait_run(await aetr.start("old", {"a": 1}))
    assert run["state"] == "error" and "Content-Length" in run["error"]["message"], run
    assert "PUT the step again without" in run["error"]["message"]
    assert steps_service.calls("/old") == []


# --- passwords in step URLs --------------------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_password_in_a_step_url_is_not_shown_in_runs_events_or_logs(
        aetr: Server, steps_service: StepService, closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    # The step echoes the URL it was called on, password and all, in its error page.
    steps_service.route("/echo", answer(403, f"no entry for http://user:secret@127.0.0.1:{steps_service.port}/echo"
                                                .encode(), "text/plain"))
    await aetr.put_step({"name": "down", "kind": "api", "url": f"http://user:secret@127.0.0.1:{closed_port}/x",
                         "retry": QUICK})
    await aetr.put_step({"name": "echo", "kind": "api", "retry": QUICK,
                         "url": f"http://user:secret@127.0.0.1:{steps_service.port}/echo"})
    with caplog.at_level(logging.DEBUG):
        runs = [await aetr.wait_run(await aetr.start(name)) for name in ("down", "echo")]
        shown = [orjson.dumps(run) for run in runs]
        shown += [orjson.dumps(await aetr.events(run["id"])) for run in runs]
        _, listed = await aetr.call("GET", "/api/v1/runs")
        shown.append(orjson.dumps(listed))
    assert all(run["state"] == "error" for run in runs), runs
    assert [b"secret" in text for text in shown] == [False] * len(shown)
    assert "secret" not in caplog.text
    # The URL is still shown, with its user-info hidden; the step itself was sent the credentials.
    assert f"http://***@127.0.0.1:{closed_port}/x failed" in runs[0]["error"]["message"]
    assert "HTTP 403: no entry for http://***@127.0.0.1" in runs[1]["error"]["message"]
    assert steps_service.calls("/echo")[0].headers["Authorization"] == "Basic dXNlcjpzZWNyZXQ="
    # The step's own definition keeps its URL as written.
    _, step = await aetr.call("GET", "/api/v1/steps/down")
    assert step["url"] == f"http://user:secret@127.0.0.1:{closed_port}/x"


# --- AETR_ALLOWED_STEP_HOSTS -------------------------------------------------------------------------------------


async def test_a_step_url_outside_the_allowed_hosts_is_refused_when_stored(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse("127.0.0.2/32")) as aetr:
        spec = {"name": "p", "kind": "sequential", "children": [{"step": api(steps_service, "a")}]}
        status_code, body = await aetr.call("PUT", "/api/v1/steps/p", spec)
        assert status_code == 422, body
        assert body["detail"].startswith("step 'a', url: '127.0.0.1' is not within AETR_ALLOWED_STEP_HOSTS "
                                         "(127.0.0.2/32)"), body
        assert (await aetr.call("GET", "/api/v1/steps"))[1] == []
    async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse("catalog.internal")) as aetr:
        # With names alone listed, a name that is not one of them cannot be allowed by what it resolves to.
        status_code, body = await aetr.call("PUT", "/api/v1/steps/a",
                                            {"name": "a", "kind": "api", "url": "http://other.internal/a"})
        assert status_code == 422, body
        assert "'other.internal' is not listed in AETR_ALLOWED_STEP_HOSTS (catalog.internal)" in body["detail"]


async def test_a_name_is_judged_by_the_addresses_it_resolves_to_when_called(
        database_url: str, steps_service: StepService) -> None:
    steps_service.route("/a", status(200, {"ok": True}))
    by_name = {"name": "a", "kind": "api", "mode": "sync", "retry": QUICK,
               "url": f"http://localhost:{steps_service.port}/a"}
    # localhost resolves to 127.0.0.1 (and perhaps ::1), outside this list: stored, but never called.
    async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse("127.0.0.2/32")) as aetr:
        await aetr.put_step(by_name)
        run = await aetr.wait_run(await aetr.start("a"))
        assert run["state"] == "error" and run["attempt"] == 1, run
        assert run["error"]["kind"] == "http"
        assert "'localhost' resolves to 127.0.0.1" in run["error"]["message"]
        assert "none of them within AETR_ALLOWED_STEP_HOSTS (127.0.0.2/32)" in run["error"]["message"]
        assert steps_service.calls("/a") == []
    # The same step, where its address is allowed, or its name is listed: called.
    for allowed in ("127.0.0.0/8", "LocalHost"):
        async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse(allowed)) as aetr:
            await aetr.put_step(by_name)
            run = await aetr.wait_run(await aetr.start("a"))
            assert run["state"] == "complete" and run["output"] == {"ok": True}, (allowed, run)


async def test_a_step_stored_before_its_host_was_disallowed_is_not_called(
        database_url: str, steps_service: StepService) -> None:
    steps_service.route("/a", status(200, {"ok": True}))
    async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse("127.0.0.2/32")) as aetr:
        stored = StepConfig(name="a", spec=ApiSpec(url=steps_service.url("/a"), mode="sync"))
        await aetr.engine.store.put_steps([StepDef(stored)], None, utcnow())
        run = await aetr.wait_run(await aetr.start("a"))
        assert run["state"] == "error" and run["attempt"] == 1, run
        assert "not called: '127.0.0.1' is not within AETR_ALLOWED_STEP_HOSTS" in run["error"]["message"]
        assert steps_service.calls("/a") == []
