"""Security on the real process: no open port to the network without a token, and the token guards the API."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from aetr.testing import StepRequest, StepService, callback, fail, never, status
from tests.e2e.harness import Api, Launcher, cli, free_port
from tests.e2e.postgres import database_down, own_role

REFUSAL_TIMEOUT_S = 15.0  # seconds: refusing must not wait for anything (it takes the CLI's start-up time)


async def test_serve_refuses_a_non_loopback_host_without_a_token_and_says_how_to_fix_it(
        launcher: Launcher, tmp_path: Path) -> None:
    server = launcher.spawn("serve", "--host", "0.0.0.0", "--port", str(free_port()),
                            env={"AETR_DATABASE_URL": f"sqlite:///{tmp_path / 'aetr.db'}"})

    code = await server.wait_exit(REFUSAL_TIMEOUT_S)

    assert code != 0, server.log()
    message = server.log()
    assert "AETR_API_TOKEN" in message and "--insecure" in message, message


async def test_with_a_token_the_api_needs_it_but_callbacks_do_not(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    token = secrets.token_urlsafe(16)
    aetr = await launcher.serve(database_url, env={"AETR_API_TOKEN": token})
    anonymous, wrong, user = Api(http, aetr.url), Api(http, aetr.url, "not-" + token), Api(http, aetr.url, token)

    for api in (anonymous, wrong):
        status, body = await api.call("GET", "/api/v1/steps")
        assert status == 401 and "Authorization: Bearer" in body["detail"], (status, body)
        status, body = await api.call("POST", "/api/v1/runs", {"step": "echo", "input": 1})
        assert status == 401, (status, body)
    assert (await anonymous.call("GET", "/healthz"))[0] == 200

    async with StepService() as svc:
        svc.route("/echo", callback(lambda value: {"echoed": value}))
        await user.put_step({"name": "echo", "kind": "api", "url": svc.url("/echo"), "timeout_s": 10})
        assert (await anonymous.call("GET", "/api/v1/steps/echo"))[0] == 401

        run = await user.wait_run(await user.start_run("echo", {"n": 7}), timeout=15)

        assert run["state"] == "complete" and run["output"] == {"echoed": {"n": 7}}, run
        # The step's callback carried no Authorization header and was accepted; nor did AETR hand its
        # API token to the step service.
        assert await svc.wait_for_callback_answers("/echo", 1) == [(200, {"accepted": True})]
        assert all("Authorization" not in call.headers for call in svc.calls("/echo"))

        refused, allowed = await asyncio.gather(
            cli("--url", aetr.url, "run", "echo", "--input", "1", "--wait"),
            cli("--url", aetr.url, "run", "echo", "--input", "1", "--wait", env={"AETR_API_TOKEN": token}))
        assert refused.code == 2 and "pass --token or set AETR_API_TOKEN" in refused.stderr, refused
        assert allowed.code == 0 and allowed.stdout.split() == ['{', '"echoed":', '1', '}'], allowed


# --- no secret, API token or callback token in logs or answers -------------------------------------------

FAST_RETRY = {"max_attempts": 2, "backoff_s": 0.05, "max_backoff_s": 0.05}
RUN_TIMEOUT_S = 30.0  # seconds for one of these short runs to end


class Reader:
    """Every answer body the test got from the server, kept to search for what must never be in one."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.bodies: dict[str, bytes] = {}

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.send("GET", path)

    async def send(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else orjson.dumps(body)
        headers = {**self.api.headers, **({"Content-Type": "application/json"} if data is not None else {})}
        async with self.api.http.request(method, self.api.base_url + path, data=data, headers=headers) as response:
            raw = await response.read()
        assert response.status < 500, f"{method} {path}: HTTP {response.status} {raw[:300]!r}"
        self.bodies[f"{method} {path} -> {response.status}"] = raw
        return response.status, raw

    async def every_get_route(self, steps: list[str], runs: list[str]) -> None:
        """GET every route there is: the API's (from its own OpenAPI document), the UI's, the operations ones."""
        status, raw = await self.get("/openapi.json")
        assert status == 200
        paths = [p for p, ops in orjson.loads(raw)["paths"].items() if "get" in ops]
        paths += ["/api/v1/runs/{run_id}/stream", "/", "/docs", "/redoc"]  # outside the document
        for path in paths:
            params = re.findall(r"{(\w+)}", path)
            if not params:
                await self.get(path)
            elif params in (["name"], ["key"]):
                for name in steps:
                    await self.get(path.replace(f"{{{params[0]}}}", name))
            else:
                assert params == ["run_id"], f"a GET route this test does not know how to fill: {path}"
                for run_id in runs:
                    await self.get(path.replace("{run_id}", run_id))
        for state in ("complete", "error", "cancelled"):
            await self.get(f"/api/v1/runs?state={state}&limit=500")
        for run_id in runs:
            await self.get(f"/api/v1/runs/{run_id}?wait=1")
        index = self.bodies["GET / -> 200"].decode()
        for asset in sorted(set(re.findall(r'(?:href|src)="(/ui/[^"]+)"', index))):
            assert (await self.get(asset))[0] == 200, asset


def callback_tokens(svc: StepService) -> set[str]:
    """The token of every callback URL AETR gave the step services."""
    tokens = set()
    for call in svc.calls():
        assert call.callback_url is not None
        tokens.add(call.callback_url.rsplit("/callbacks/", 1)[1])
    return tokens


def assert_nowhere(secrets_: dict[str, str], places: dict[str, str | bytes]) -> None:
    """None of the secrets (name -> value) appears in any of the places (name -> text)."""
    texts = {place: text.decode(errors="replace") if isinstance(text, bytes) else text
             for place, text in places.items()}
    found = [f"{name} in {place}" for place, text in texts.items() for name, value in secrets_.items() if value in text]
    assert not found, f"leaked: {found}"


async def test_no_secret_api_token_or_callback_token_appears_in_the_logs_or_any_answer(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    secret, token = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    # AETR has no log-level setting (uvicorn logs at info, without an access log); this is the most it says.
    aetr = await launcher.serve(database_url, env={"AETR_SECRET": secret, "AETR_API_TOKEN": token})
    reader = Reader(Api(http, aetr.url, token))
    async with StepService() as svc:
        svc.route("/ok", callback(lambda value: {"ok": value}))
        svc.route("/bad", fail("disk full", retryable=False))
        svc.route("/busy", status(503, {"detail": "try later"}))
        svc.route("/mute", never())
        steps = {"ok": svc.url("/ok"), "bad": svc.url("/bad"), "busy": svc.url("/busy"), "mute": svc.url("/mute"),
                 "gone": f"http://127.0.0.1:{free_port()}/nothing-listens"}
        for name, url in steps.items():
            status_, raw = await reader.send("PUT", f"/api/v1/steps/{name}",
                                             {"name": name, "kind": "api", "url": url, "retry": FAST_RETRY})
            assert status_ == 201, raw
        await reader.send("PUT", "/api/v1/steps/pipe", {"name": "pipe", "kind": "sequential", "children": [
            {"step": "ok"}, {"step": "ok", "mapper": "(x) => ({again: x})"}]})
        runs = {name: orjson.loads((await reader.send("POST", "/api/v1/runs", {"step": name, "input": name}))[1])["id"]
                for name in ("pipe", "bad", "busy", "gone", "mute")}
        (muted,) = await svc.wait_for_calls("/mute", 1)
        assert muted.callback_url is not None
        real = muted.callback_url.removeprefix(aetr.url)
        # Callbacks with a wrong token, a cancel, and callbacks on the cancelled attempt's real token.
        assert (await reader.send("POST", real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB"), 1))[0] == 404
        assert (await reader.send("POST", "/api/v1/callbacks/" + secrets.token_urlsafe(32), 1))[0] == 404
        assert (await reader.send("POST", f"/api/v1/runs/{runs['mute']}/cancel"))[0] == 200
        assert (await reader.send("POST", real, {"late": True}))[0] == 409
        assert (await reader.send("POST", real + "/heartbeat"))[0] == 409
        ended = {name: await reader.api.wait_run(run_id, RUN_TIMEOUT_S) for name, run_id in runs.items()}
        assert {name: run["state"] for name, run in ended.items()} == {
            "pipe": "complete", "bad": "error", "busy": "error", "gone": "error", "mute": "cancelled"}
        assert ended["pipe"]["output"] == {"ok": {"again": {"ok": "pipe"}}}
        await reader.every_get_route([*steps, "pipe"], list(runs.values()))
        tokens = callback_tokens(svc)
    await aetr.stop()  # SIGTERM: whatever it logs on the way out is in the log too

    assert len(tokens) == 6, tokens  # pipe's two steps, bad, busy's two attempts, mute (gone is never reached)
    assert "Application startup complete" in aetr.log() and "Finished server process" in aetr.log()
    assert len(reader.bodies) > 30, list(reader.bodies)
    must_not_leak = {"AETR_SECRET": secret, "AETR_API_TOKEN": token,
                     **{f"callback token {t}": t for t in tokens}}
    assert_nowhere(must_not_leak, {"the server's output": aetr.log(), **reader.bodies})


async def test_a_step_url_that_redirects_in_a_loop_does_not_put_its_callback_token_in_the_run(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    aetr = await launcher.serve(database_url)
    reader = Reader(Api(http, aetr.url))

    async def elsewhere(request: StepRequest) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "/loop"})

    async with StepService() as svc:
        svc.route("/loop", elsewhere)
        await reader.api.put_step({"name": "loop", "kind": "api", "url": svc.url("/loop"),
                                   "retry": {"max_attempts": 1}})
        run_id = await reader.api.start_run("loop", 1)
        run = await reader.api.wait_run(run_id, RUN_TIMEOUT_S)
        tokens = callback_tokens(svc)

    assert run["state"] == "error" and run["error"]["kind"] == "http", run
    # The redirect is not followed (it would carry the input and the token elsewhere); the error says why.
    assert len(tokens) == 1 and "does not follow redirects" in run["error"]["message"], run
    await reader.get(f"/api/v1/runs/{run_id}")
    await reader.get(f"/api/v1/runs/{run_id}/events")
    assert_nowhere({f"callback token {t}": t for t in tokens}, dict(reader.bodies))


@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_a_callback_refused_while_the_database_is_down_is_logged_without_its_token(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    async with own_role(database_url) as (role, url):
        aetr = await launcher.serve(url)
        api = Api(http, aetr.url)
        try:
            async with StepService() as svc:
                svc.route("/mute", never())
                await api.put_step({"name": "mute", "kind": "api", "url": svc.url("/mute")})
                run_id = await api.start_run("mute", 1)
                (call,) = await svc.wait_for_calls("/mute", 1)
                assert call.callback_url is not None
                path = call.callback_url.removeprefix(aetr.url)
                # The outage: PostgreSQL drops the server's connections and refuses new ones (too many connections).
                async with database_down(role), http.post(call.callback_url, json={"done": True}) as response:
                    refused = (response.status, response.headers.get("Retry-After"), await response.text())
                # The step is told to try again shortly; when it does, nothing was lost.
                assert refused[:2] == (503, "1") and "database is unavailable" in refused[2], refused
                assert await api.call("POST", path, {"done": True}) == (200, {"accepted": True})
                run = await api.wait_run(run_id, RUN_TIMEOUT_S)
        finally:
            await aetr.stop()  # before its database goes, and so that what it logs on the way out is in the log

    assert run["state"] == "complete" and run["output"] == {"done": True}, run
    log = aetr.log()
    assert "the database is unavailable" in log, log
    assert_nowhere({"the callback token": path.rsplit("/", 1)[1]}, {"the server's output": log})
