"""Bearer-token access to the API (callbacks excepted) and idempotent starts under concurrency."""

from __future__ import annotations

import asyncio

from aetr.testing import StepService, callback
from tests.integration.conftest import Server, running_server

TOKEN = "s3cret-token"


async def test_with_a_token_every_api_route_but_callbacks_needs_it(database_url: str,
                                                                   steps_service: StepService) -> None:
    steps_service.route("/a", callback(lambda x: {"got": x}))
    step = {"name": "a", "kind": "api", "url": steps_service.url("/a")}
    async with running_server(database_url, api_token=TOKEN) as aetr:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for method, path, body in [("GET", "/api/v1/steps", None), ("PUT", "/api/v1/steps/a", step),
                                   ("POST", "/api/v1/runs", {"step": "a"}), ("GET", "/api/v1/runs", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                status, answer = await aetr.call(method, path, body, headers=headers)
                assert status == 401, (method, path, headers)
                assert "AETR_API_TOKEN" in answer["detail"]
        _, steps = await aetr.call("GET", "/api/v1/steps", headers=auth)
        assert steps == []  # the refused PUT stored nothing
        assert (await aetr.call("PUT", "/api/v1/steps/a", step, headers=auth))[0] == 201
        status, run = await aetr.call("POST", "/api/v1/runs", {"step": "a", "input": 1}, headers=auth)
        assert status == 201
        # The step service calls back with no Authorization header: callbacks carry their own signed token.
        _, done = await aetr.call("GET", f"/api/v1/runs/{run['id']}?wait=10", headers=auth)
        assert done["state"] == "complete" and done["output"] == {"got": 1}
        assert (await aetr.call("GET", "/healthz"))[0] == 200


async def test_twenty_identical_starts_with_one_key_make_one_run(aetr: Server) -> None:
    await aetr.put_step({"name": "e", "kind": "sequential"})

    async def start() -> tuple[int, str]:
        status, body = await aetr.call("POST", "/api/v1/runs", {"step": "e", "input": 1},
                                       headers={"Idempotency-Key": "batch-42"})
        return status, body["id"]

    answers = await asyncio.gather(*(start() for _ in range(20)))
    assert len({run_id for _, run_id in answers}) == 1
    assert sorted(status for status, _ in answers) == [200] * 19 + [201]
    _, page = await aetr.call("GET", "/api/v1/runs")
    assert len(page["runs"]) == 1
