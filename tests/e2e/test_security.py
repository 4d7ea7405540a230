"""Spec §6 on the real process: no open port to the network without a token, and the token guards the API."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp

from aetr.testing import StepService, callback
from tests.e2e.harness import Api, Launcher, cli, free_port

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
