"""StepService and its behaviours over real HTTP on loopback, with a tiny receiver playing AETR's callbacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web

from aetr.testing import (
    StepRequest,
    StepService,
    callback,
    callback_before_answer,
    fail,
    never,
    sequence,
    status,
    sync,
)

CALLBACK_PATH = "/api/v1/callbacks/tok-1"


@dataclass(frozen=True)
class Received:
    """One request the fake AETR callback endpoint received."""

    path: str
    json: Any
    received_at: float


class CallbackReceiver:
    """AETR's callback endpoint, faked: records what it gets and answers as told."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer_status = 200
        self.answer_body: Any = {"accepted": True}
        self.gate: asyncio.Event | None = None  # when set up, answers wait for it
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def callback_url(self) -> str:
        return self.base_url + CALLBACK_PATH

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        async with self._changed:
            self.received.append(Received(request.path, orjson.loads(raw) if raw else None, time.monotonic()))
            self._changed.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        return web.Response(status=self.answer_status, body=orjson.dumps(self.answer_body),
                            content_type="application/json")

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:  # noqa: ASYNC109 -- message on timeout
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.received) >= n)
        except TimeoutError:
            raise TimeoutError(f"receiver expected {n} callback(s), got {len(self.received)}") from None
        return list(self.received)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    fake = CallbackReceiver()
    await fake.start()
    yield fake
    if fake.gate is not None:
        fake.gate.set()
    await fake.close()


@pytest.fixture
async def svc() -> AsyncIterator[StepService]:
    async with StepService() as service:
        yield service


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def dispatch(http: aiohttp.ClientSession, url: str, body: Any, callback_url: str | None,
                   **headers: str) -> tuple[int, Any]:
    """Call a step the way AETR does: JSON body, AETR-Callback header, run headers."""
    sent = {"AETR-Run-Id": "run-1", "AETR-Node-Id": "node-1", "AETR-Attempt": "1", **headers}
    if callback_url is not None:
        sent["AETR-Callback"] = callback_url
    async with http.post(url, data=orjson.dumps(body), headers=sent) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw) if raw else None


async def test_callback_answers_202_then_posts_fn_of_input_to_the_callback_url(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/ingest", callback(lambda x: {"items": [x["source"] + "-1"]}))
    assert await dispatch(http, svc.url("/ingest"), {"source": "acme"}, receiver.callback_url) == (202, None)
    (got,) = await receiver.wait_for(1)
    assert (got.path, got.json) == (CALLBACK_PATH, {"items": ["acme-1"]})
    assert await svc.wait_for_callback_answers("/ingest", 1) == [(200, {"accepted": True})]


async def test_a_call_records_path_method_headers_query_body_and_time(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/a", never())
    before = time.monotonic()
    await dispatch(http, svc.url("/a") + "?x=1", [1, 2], receiver.callback_url, **{"X-Tenant": "acme"})
    (call,) = await svc.wait_for_calls("/a", 1)
    assert (call.path, call.method, call.json, call.body) == ("/a", "POST", [1, 2], b"[1,2]")
    assert call.headers["x-tenant"] == "acme" and call.query["x"] == "1"
    assert (call.callback_url, call.run_id, call.node_id, call.attempt) == (receiver.callback_url, "run-1", "node-1", 1)
    assert before <= call.received_at <= time.monotonic()
    assert svc.calls() == [call] and svc.calls("/other") == []


async def test_callback_accepts_async_fn(svc: StepService, receiver: CallbackReceiver,
                                         http: aiohttp.ClientSession) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    svc.route("/double", callback(double))
    await dispatch(http, svc.url("/double"), 21, receiver.callback_url)
    assert [r.json for r in await receiver.wait_for(1)] == [42]


async def test_callback_waits_its_delay_before_calling_back(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/slow", callback(lambda x: x, delay=0.3))
    await dispatch(http, svc.url("/slow"), "v", receiver.callback_url)
    (got,) = await receiver.wait_for(1)
    (call,) = svc.calls("/slow")
    assert got.received_at - call.received_at >= 0.3


async def test_callback_url_falls_back_to_the_aetr_query_parameter(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/q", callback(lambda x: {"got": x}))
    url = svc.url("/q") + "?aetr=" + quote(receiver.callback_url, safe="")
    assert (await dispatch(http, url, 7, None))[0] == 202
    (got,) = await receiver.wait_for(1)
    assert (got.path, got.json) == (CALLBACK_PATH, {"got": 7})


async def test_a_call_without_callback_url_is_refused_with_400_and_says_why(
        svc: StepService, http: aiohttp.ClientSession) -> None:
    svc.route("/cb", callback(lambda x: x))
    status_code, body = await dispatch(http, svc.url("/cb"), 1, None)
    assert status_code == 400 and "AETR-Callback" in body["detail"]


async def test_fn_that_raises_is_reported_as_a_non_retryable_failure(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/boom", callback(lambda x: x["missing"]))
    await dispatch(http, svc.url("/boom"), {}, receiver.callback_url)
    (got,) = await receiver.wait_for(1)
    assert got.path == CALLBACK_PATH + "/fail"
    assert got.json == {"error": "KeyError: 'missing'", "retryable": False}


async def test_sync_answers_200_with_fn_of_input(svc: StepService, receiver: CallbackReceiver,
                                                 http: aiohttp.ClientSession) -> None:
    async def shout(x: str) -> dict[str, str]:
        return {"said": x.upper()}

    svc.route("/plain", sync(lambda x: {"doubled": x * 2}))
    svc.route("/async", sync(shout))
    assert await dispatch(http, svc.url("/plain"), 21, receiver.callback_url) == (200, {"doubled": 42})
    assert await dispatch(http, svc.url("/async"), "hi", receiver.callback_url) == (200, {"said": "HI"})
    assert receiver.received == []


async def test_fail_answers_202_then_posts_the_error_to_callback_fail(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/bad", fail("sku 9 is malformed", retryable=True))
    assert (await dispatch(http, svc.url("/bad"), {}, receiver.callback_url))[0] == 202
    (got,) = await receiver.wait_for(1)
    assert (got.path, got.json) == (CALLBACK_PATH + "/fail", {"error": "sku 9 is malformed", "retryable": True})
    assert await svc.wait_for_callback_answers("/bad", 1) == [(200, {"accepted": True})]


async def test_status_answers_that_status_and_body_and_never_calls_back(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/four", status(422, {"detail": "bad input"}))
    svc.route("/five", status(503))
    svc.route("/marker", callback(lambda x: "marker"))
    assert await dispatch(http, svc.url("/four"), {}, receiver.callback_url) == (422, {"detail": "bad input"})
    assert await dispatch(http, svc.url("/five"), {}, receiver.callback_url) == (503, None)
    # A callback sent afterwards is the only one to arrive: neither status route called back before it.
    await dispatch(http, svc.url("/marker"), {}, receiver.callback_url)
    await receiver.wait_for(1)
    await svc.wait_for_callback_answers("/marker", 1)
    assert [r.json for r in receiver.received] == ["marker"]
    assert svc.callback_answers("/four") == [] and svc.callback_answers("/five") == []


async def test_never_answers_202_and_does_not_call_back(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/mute", never())
    svc.route("/marker", callback(lambda x: "marker", delay=0.1))
    assert (await dispatch(http, svc.url("/mute"), {}, receiver.callback_url))[0] == 202
    await dispatch(http, svc.url("/marker"), {}, receiver.callback_url)
    await svc.wait_for_callback_answers("/marker", 1)
    assert [r.json for r in receiver.received] == ["marker"]


async def test_callback_before_answer_answers_only_after_aetr_answered_the_callback(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/early", callback_before_answer(lambda x: {"early": x}))
    receiver.gate = asyncio.Event()
    step_answer = asyncio.create_task(dispatch(http, svc.url("/early"), 1, receiver.callback_url))
    (got,) = await receiver.wait_for(1)
    assert got.json == {"early": 1}
    assert not step_answer.done()  # the callback is still unanswered, so the step must not have answered
    receiver.gate.set()
    assert await asyncio.wait_for(step_answer, 5.0) == (202, None)
    assert svc.callback_answers("/early") == [(200, {"accepted": True})]


async def test_callback_answers_record_what_aetr_refused(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    receiver.answer_status, receiver.answer_body = 409, {"detail": "node is cancelled"}
    svc.route("/late", callback(lambda x: x))
    await dispatch(http, svc.url("/late"), 1, receiver.callback_url)
    (answer,) = await svc.wait_for_callback_answers("/late", 1)
    assert answer.status == 409 and answer.json == {"detail": "node is cancelled"}


async def test_sequence_serves_its_behaviours_in_order_then_repeats_the_last(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    svc.route("/flaky", sequence(status(503), status(429), callback(lambda x: x + 1)))
    codes = [(await dispatch(http, svc.url("/flaky"), 1, receiver.callback_url))[0] for _ in range(4)]
    assert codes == [503, 429, 202, 202]
    assert [r.json for r in await receiver.wait_for(2)] == [2, 2]


async def test_a_custom_behaviour_can_heartbeat_then_call_back(
        svc: StepService, receiver: CallbackReceiver, http: aiohttp.ClientSession) -> None:
    async def work(request: StepRequest) -> None:
        await request.send_heartbeat()
        await request.send_output({"done": request.input})

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        request.later(work(request))
        return web.Response(status=202)

    svc.route("/long", behaviour)
    await dispatch(http, svc.url("/long"), "x", receiver.callback_url)
    got = await receiver.wait_for(2)
    assert [(r.path, r.json) for r in got] == [(CALLBACK_PATH + "/heartbeat", None), (CALLBACK_PATH, {"done": "x"})]


async def test_an_unrouted_path_answers_404_naming_the_routes_and_is_recorded(
        svc: StepService, http: aiohttp.ClientSession) -> None:
    svc.route("/known", never())
    status_code, body = await dispatch(http, svc.url("/nope"), {}, None)
    assert status_code == 404 and "/nope" in body["detail"] and "/known" in body["detail"]
    assert len(svc.calls("/nope")) == 1


async def test_a_behaviour_that_raises_answers_500_and_is_reported(
        svc: StepService, http: aiohttp.ClientSession) -> None:
    svc.route("/buggy", sync(lambda x: 1 / 0))
    status_code, body = await dispatch(http, svc.url("/buggy"), {}, None)
    assert status_code == 500 and "ZeroDivisionError" in body["detail"]
    assert any("ZeroDivisionError" in e for e in svc.errors)


async def test_wait_for_calls_times_out_with_a_clear_message(svc: StepService) -> None:
    with pytest.raises(TimeoutError, match=r"expected 2 request\(s\) to /x within 0.05s, got 0"):
        await svc.wait_for_calls("/x", 2, timeout=0.05)


async def test_an_unreachable_callback_url_is_reported_by_the_wait(
        svc: StepService, http: aiohttp.ClientSession) -> None:
    gone = CallbackReceiver()
    await gone.start()
    url = gone.callback_url
    await gone.close()
    svc.route("/a", callback(lambda x: x))
    await dispatch(http, svc.url("/a"), 1, url)
    with pytest.raises(TimeoutError, match=r"errors in the step service: .*ClientConnectorError"):
        await svc.wait_for_callback_answers("/a", 1, timeout=2.0)


async def test_close_cancels_pending_callbacks_at_once(receiver: CallbackReceiver,
                                                      http: aiohttp.ClientSession) -> None:
    service = StepService()
    await service.start()
    service.route("/later", callback(lambda x: x, delay=60.0))
    await dispatch(http, service.url("/later"), 1, receiver.callback_url)
    await service.wait_for_calls("/later", 1)
    async with asyncio.timeout(5.0):
        await service.close()
    # The delayed callback was cancelled, not left pending behind the closed service.
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert receiver.received == []


async def test_paths_must_start_with_a_slash(svc: StepService) -> None:
    with pytest.raises(ValueError, match="starts with '/'"):
        svc.url("ingest")
    with pytest.raises(ValueError, match="starts with '/'"):
        svc.route("ingest", never())


async def test_port_zero_gives_each_service_its_own_port() -> None:
    async with StepService() as one, StepService() as two:
        assert one.port != two.port and one.port > 0
        assert one.url("/a") == f"http://127.0.0.1:{one.port}/a"
