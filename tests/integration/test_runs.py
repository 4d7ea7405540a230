"""Runs end to end over real HTTP: AETR calls step services on loopback and they call back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from aetr.api.render import nest
from aetr.store.store import count_round_trips
from aetr.testing import StepRequest, StepService, callback, callback_before_answer, fail, never, sequence, status, sync
from tests.integration.conftest import Server, running_server, wait_no_work


def api(svc: StepService, name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), **kw}


def by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    stack = [run]
    while stack:
        node = stack.pop()
        out[node["step"]["name"]] = node
        stack.extend(node["children"])
    return out


async def test_catalog_pipeline_flows_data_through_mappers_and_reducer(aetr: Server,
                                                                       steps_service: StepService) -> None:
    svc = steps_service
    svc.route("/ingest", callback(lambda x: {"items": [{"id": 1}, {"id": 2}], "source": x["source"]}))
    svc.route("/normalize", callback(lambda x: {"skus": [f"sku-{i}" for i in x["ids"]]}))
    svc.route("/images", callback(lambda x: {"images": len(x["skus"])}, delay=0.05))
    svc.route("/metadata", callback(lambda x: {"meta": x["skus"][0]}))
    svc.route("/index", sync(lambda x: {"indexed": x}))
    await aetr.put_step({"name": "catalog", "kind": "sequential", "children": [
        {"step": api(svc, "ingest")},
        {"step": api(svc, "normalize"), "mapper": "(input, ctx) => ({ids: input.items.map(i => i.id), "
                                                  "src: ctx.run.input.source})"},
        {"step": {"name": "enrich", "kind": "parallel", "reducer": "merge",
                  "children": [{"step": api(svc, "images")}, {"step": api(svc, "metadata")}]}},
        {"step": api(svc, "index", mode="sync")},
    ]})
    run = await aetr.wait_run(await aetr.start("catalog", {"source": "acme"}))
    assert run["state"] == "complete", run
    nodes = by_name(run)
    assert nodes["normalize"]["input"] == {"ids": [1, 2], "src": "acme"}
    assert nodes["enrich"]["output"] == {"images": 2, "meta": "sku-1"}
    assert run["output"] == {"indexed": {"images": 2, "meta": "sku-1"}}
    assert all(n["state"] == "complete" and n["completed_at"] for n in nodes.values())


async def test_a_call_carries_the_callback_url_and_the_run_headers(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", callback(lambda x: x))
    await aetr.put_step(api(steps_service, "a", headers={"X-Tenant": "acme"}))
    run_id = await aetr.start("a", {"k": [1, 2]})
    run = await aetr.wait_run(run_id)
    (call,) = steps_service.calls("/a")
    assert call.json == {"k": [1, 2]}
    assert call.headers["X-Tenant"] == "acme"
    assert call.headers["AETR-Run-Id"] == run_id and call.headers["AETR-Node-Id"] == run_id
    assert call.headers["AETR-Attempt"] == "1"
    assert call.headers["AETR-Callback"].startswith(aetr.base_url + "/api/v1/callbacks/")
    assert call.query["aetr"] == call.headers["AETR-Callback"]
    assert call.headers["traceparent"].startswith("00-" + run_id.replace("-", ""))
    assert run["output"] == {"k": [1, 2]}


async def test_get_run_loads_the_whole_tree_in_one_query(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/x", never())
    await aetr.put_step({"name": "wide", "kind": "parallel", "children": [
        {"step": api(steps_service, "x")} for _ in range(30)]})
    run_id = await aetr.start("wide")
    _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    child = run["children"][7]["id"]
    status, same = await aetr.call("GET", f"/api/v1/runs/{child}")
    assert status == 200 and same["id"] == run_id and len(same["children"]) == 30
    with count_round_trips() as statements:  # the read behind GET /runs/{id}
        body = await aetr.engine.store.get_run_json(child)
    assert body is not None and orjson.loads(body) == run and len(statements) == 1
    with count_round_trips() as statements:  # the dict form the live view uses
        view = await aetr.engine.store.get_run_view(child)
    assert len(view) == 31 and len(statements) == 1


async def test_the_database_built_answer_matches_the_one_built_in_python(
        aetr: Server, steps_service: StepService) -> None:
    # GET /runs/{id} has the database write each node's JSON; the live view, cancel and an idempotent start
    # answer from rows decoded in Python. Both must say the same, times and odd values included.
    steps_service.route("/done", callback(lambda x: {"echo": x, "big": 2**63, "neg": -(2**63), "f": 0.1,
                                                     "text": "é\u2028\"q\"", "none": None}))
    steps_service.route("/fails", status(400, {"detail": "no"}))
    await aetr.put_step({"name": "mixed", "kind": "parallel", "children": [
        {"step": api(steps_service, "done")}, {"step": api(steps_service, "done2"), "mapper": "(x) => [x, 1.5e300]"}]})
    steps_service.route("/done2", callback(lambda x: x))
    await aetr.put_step(api(steps_service, "fails", retry={"max_attempts": 1}))
    for step in ("mixed", "fails"):
        run_id = await aetr.start(step, {"n": [1, 2.5, "x"], "deep": {"a": {"b": []}}})
        ended = await aetr.wait_run(run_id)
        body = await aetr.engine.store.get_run_json(run_id)
        assert body is not None
        # The view passes stored JSON through as orjson fragments: compare what each sends.
        in_python = orjson.loads(orjson.dumps(nest(await aetr.engine.store.get_run_view(run_id))))
        assert orjson.loads(body) == ended == in_python
        if step == "mixed":
            assert ended["state"] == "complete" and ended["children"][0]["output"]["big"] == 2**63
        else:
            assert ended["state"] == "error" and ended["error"]["kind"] == "http"


async def test_a_run_keeps_the_tree_it_started_with(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    steps_service.route("/b", callback(lambda x: x))
    await aetr.put_step({"name": "p", "kind": "sequential", "children": [
        {"step": api(steps_service, "a")}, {"step": api(steps_service, "b"), "mapper": "(x) => x * 2"}]})
    run_id = await aetr.start("p", 1)
    await steps_service.wait_for_calls("/a", 1)
    await aetr.put_step({"name": "p", "kind": "sequential", "children": [
        {"step": api(steps_service, "a")}, {"step": api(steps_service, "b"), "mapper": "(x) => x * 100"}]})
    (call,) = steps_service.calls("/a")
    async with aetr.http.post(call.headers["AETR-Callback"], json=5) as resp:
        assert resp.status == 200
    run = await aetr.wait_run(run_id)
    assert run["output"] == 10


async def test_sync_mode_completes_with_the_answer_body(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/s", sync(lambda x: {"doubled": x * 2}))
    await aetr.put_step(api(steps_service, "s", mode="sync"))
    run = await aetr.wait_run(await aetr.start("s", 21))
    assert run["output"] == {"doubled": 42}


async def test_a_callback_that_arrives_before_the_answer_completes_the_node(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/early", callback_before_answer(lambda x: {"early": x}))
    await aetr.put_step(api(steps_service, "early"))
    run = await aetr.wait_run(await aetr.start("early", 1))
    assert run["state"] == "complete" and run["output"] == {"early": 1}
    (answer,) = steps_service.callback_answers("/early")
    assert answer[0] == 200


async def test_duplicate_late_and_forged_callbacks(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    await aetr.put_step(api(steps_service, "a"))
    run_id = await aetr.start("a")
    (call,) = await steps_service.wait_for_calls("/a", 1)
    url = call.headers["AETR-Callback"]
    assert (await aetr.call("POST", url.removeprefix(aetr.base_url), {"v": 1})) == (200, {"accepted": True})
    assert (await aetr.call("POST", url.removeprefix(aetr.base_url), {"v": 1})) == (
        200, {"accepted": False, "duplicate": True})
    status, body = await aetr.call("POST", url.removeprefix(aetr.base_url), {"v": 2})
    assert status == 409 and "complete" in body["detail"]
    forged = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    assert (await aetr.call("POST", forged.removeprefix(aetr.base_url), {"v": 3}))[0] == 404
    assert (await aetr.call("POST", "/api/v1/callbacks/not-a-token", {}))[0] == 404
    run = await aetr.wait_run(run_id)
    assert run["output"] == {"v": 1}
    _, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
    outcomes = [e["data"]["outcome"] for e in events if e["kind"] == "callback"]
    assert outcomes == ["accepted", "duplicate", "refused"]


async def test_a_misspelt_callback_token_is_unknown_and_changes_nothing(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    await aetr.put_step(api(steps_service, "a"))
    run_id = await aetr.start("a")
    (call,) = await steps_service.wait_for_calls("/a", 1)
    path = call.headers["AETR-Callback"].removeprefix(aetr.base_url)
    prefix, token = path.rsplit("/", 1)
    letter = next(i for i, c in enumerate(token) if c.isalpha())
    # Each spelling decoded to the genuine token before: Python's base64 decoder skips '!' and takes '+' for '-'.
    variants = [token[:10] + "!" + token[10:], token + "=", token + "==", token + "A",
                token[:letter] + token[letter].swapcase() + token[letter + 1:],
                token.replace("-", "+").replace("_", "/") if "-" in token or "_" in token else token + "+"]
    _, before = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    for variant in variants:
        for suffix, body in (("", {"v": "forged"}), ("/fail", {"error": "x", "retryable": False}),
                             ("/heartbeat", None)):
            status, answer = await aetr.call("POST", f"{prefix}/{variant}{suffix}", body)
            assert status == 404, (variant, suffix, status, answer)
    assert (await aetr.call("GET", f"/api/v1/runs/{run_id}"))[1] == before
    _, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
    assert not [e for e in events if e["kind"].startswith("callback")]
    assert (await aetr.call("POST", path, {"v": 1})) == (200, {"accepted": True})
    assert (await aetr.wait_run(run_id))["output"] == {"v": 1}


async def test_a_failure_callback_fails_the_run_and_cancels_unfinished_siblings(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/bad", fail("sku 9 is malformed", retryable=False))
    steps_service.route("/slow", never())
    await aetr.put_step({"name": "p", "kind": "parallel", "children": [
        {"step": api(steps_service, "slow")}, {"step": api(steps_service, "bad")}]})
    run = await aetr.wait_run(await aetr.start("p"))
    nodes = by_name(run)
    assert run["state"] == "error"
    assert run["error"] == {"message": "sku 9 is malformed", "kind": "callback", "node_id": nodes["bad"]["id"],
                            "step": "bad"}
    assert nodes["slow"]["state"] == "cancelled"
    (slow_call,) = steps_service.calls("/slow")
    async with aetr.http.post(slow_call.headers["AETR-Callback"], json=1) as resp:
        assert resp.status == 409


async def test_a_4xx_answer_fails_at_once_and_a_5xx_is_retried(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/four", status(400, {"detail": "bad input"}))
    steps_service.route("/five", status(503))
    retry = {"max_attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}
    await aetr.put_step(api(steps_service, "four", retry=retry))
    await aetr.put_step(api(steps_service, "five", retry=retry))
    four = await aetr.wait_run(await aetr.start("four"))
    assert four["state"] == "error" and four["error"]["kind"] == "http" and "400" in four["error"]["message"]
    assert len(steps_service.calls("/four")) == 1
    five = await aetr.wait_run(await aetr.start("five"))
    assert five["state"] == "error" and "503" in five["error"]["message"] and five["attempt"] == 3
    assert [c.headers["AETR-Attempt"] for c in steps_service.calls("/five")] == ["1", "2", "3"]


async def test_an_unreachable_step_fails_after_its_attempts(aetr: Server) -> None:
    await aetr.put_step({"name": "gone", "kind": "api", "url": "http://127.0.0.1:9/x",
                         "retry": {"max_attempts": 2, "backoff_s": 0.01}})
    run = await aetr.wait_run(await aetr.start("gone"))
    assert run["state"] == "error" and run["error"]["kind"] == "http" and run["attempt"] == 2


async def test_a_step_that_never_calls_back_times_out(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/mute", never())
    # Long enough for the call's own 202 to come back on a loaded machine (else the call itself fails first).
    await aetr.put_step(api(steps_service, "mute", timeout_s=1.0, retry={"max_attempts": 1}))
    run = await aetr.wait_run(await aetr.start("mute"))
    assert run["state"] == "error" and run["error"]["kind"] == "timeout"


async def test_a_deadline_counts_from_the_call_not_from_the_wait_for_a_connection(
        database_url: str, steps_service: StepService) -> None:
    release = asyncio.Event()

    async def held(request: StepRequest) -> web.StreamResponse:
        await release.wait()
        return web.json_response(request.input)

    steps_service.route("/held", held)
    steps_service.route("/quick", sync(lambda x: x + 1))
    async with running_server(database_url, max_in_flight=1) as aetr:  # one call at a time
        await aetr.put_step(api(steps_service, "held", mode="sync"))
        await aetr.put_step(api(steps_service, "quick", mode="sync", timeout_s=0.3, retry={"max_attempts": 1}))
        await aetr.start("held", 0)
        await steps_service.wait_for_calls("/held", 1)
        queued = await aetr.start("quick", 1)
        # The clock is what is tested here: three deadlines pass while the call waits for the only slot.
        await asyncio.sleep(1.0)
        status, run = await aetr.call("GET", f"/api/v1/runs/{queued}")
        assert (status, run["state"], steps_service.calls("/quick")) == (200, "executing", []), run
        release.set()
        run = await aetr.wait_run(queued)
    assert (run["state"], run["output"], run["attempt"]) == ("complete", 2, 1), run


async def test_branches_advance_independently(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a1", callback(lambda x: x))
    steps_service.route("/a2", callback(lambda x: x))
    steps_service.route("/b", never())
    await aetr.put_step({"name": "p", "kind": "parallel", "children": [
        {"step": {"name": "s", "kind": "sequential", "children": [
            {"step": api(steps_service, "a1")}, {"step": api(steps_service, "a2")}]}},
        {"step": api(steps_service, "b")}]})
    run_id = await aetr.start("p", 0)
    await steps_service.wait_for_calls("/a2", 1)
    _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    nodes = by_name(run)
    assert nodes["a1"]["state"] == "complete" and nodes["b"]["state"] == "executing"


async def test_a_throwing_mapper_fails_only_its_node_and_the_server_keeps_serving(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", callback(lambda x: x))
    await aetr.put_step({"name": "loop", "kind": "sequential", "children": [
        {"step": api(steps_service, "a"), "mapper": "(x) => { while (true) {} }"}]})
    await aetr.put_step({"name": "throws", "kind": "sequential", "children": [
        {"step": "a", "mapper": "(x) => { throw new Error('bad sku ' + x) }"}]})
    await aetr.put_step({"name": "fine", "kind": "sequential", "children": [{"step": "a", "mapper": "(x) => x + 1"}]})
    runs = await asyncio.gather(*(aetr.start(n, 1) for n in ("loop", "throws", "fine")))
    loop, throws, fine = [await aetr.wait_run(r) for r in runs]
    assert loop["state"] == "error" and loop["error"]["kind"] == "mapper"
    assert "time limit" in loop["error"]["message"]
    assert throws["error"]["kind"] == "mapper" and "bad sku 1" in throws["error"]["message"]
    assert throws["error"]["node_id"] == throws["children"][0]["id"]
    assert fine["output"] == 2


async def test_a_run_that_fails_as_it_starts_calls_no_step_and_leaves_no_work(
        aetr: Server, steps_service: StepService) -> None:
    # The call and the timer of the children started before the sibling whose mapper throws end with the run.
    steps_service.route("/a", never())
    await aetr.put_step({"name": "a", "kind": "api", "url": steps_service.url("/a")})
    await aetr.put_step({"name": "later", "kind": "wait", "seconds": 3600})
    await aetr.put_step({"name": "p", "kind": "parallel", "children": [
        {"step": "a"}, {"step": "later"}, {"step": "a", "mapper": "(x) => { throw new Error('bad sku ' + x) }"}]})
    run = await aetr.wait_run(await aetr.start("p", 1))
    assert [c["state"] for c in run["children"]] == ["cancelled", "cancelled", "error"], run
    assert await wait_no_work(aetr, timeout=5) == 0
    assert steps_service.calls("/a") == []


async def test_empty_parents_complete_with_their_input_or_reducer(aetr: Server) -> None:
    await aetr.put_step({"name": "empty", "kind": "sequential", "children": [
        {"step": {"name": "none", "kind": "parallel", "reducer": "array"}}]})
    run = await aetr.wait_run(await aetr.start("empty", {"a": 1}))
    assert run["state"] == "complete" and run["output"] == []


async def test_a_parallel_of_parents_that_complete_as_they_start_reduces_over_their_outputs(aetr: Server) -> None:
    await aetr.put_step({"name": "inner", "kind": "parallel", "children": []})
    await aetr.put_step({"name": "eseq", "kind": "sequential", "children": []})
    await aetr.put_step({"name": "outer", "kind": "parallel", "children": [{"step": "inner"}, {"step": "inner"}]})
    await aetr.put_step({"name": "p5", "kind": "parallel", "children": [
        {"step": "eseq"}, {"step": "eseq", "mapper": "(x) => x.k + 1"}]})
    await aetr.put_step({"name": "counted", "kind": "parallel", "reducer": "(outs) => ({n: outs.length})",
                         "children": [{"step": "eseq"}, {"step": "inner"}]})
    for name, expected in (("outer", [[], []]), ("p5", [{"k": 1}, 2]), ("counted", {"n": 2})):
        run = await aetr.wait_run(await aetr.start(name, {"k": 1}))
        assert (run["state"], run["output"]) == ("complete", expected), name


async def test_a_long_poll_answers_as_soon_as_the_run_ends(database_url: str, steps_service: StepService) -> None:
    # A long poll re-reads every poll interval anyway: make that long, so that only being woken is fast.
    async with running_server(database_url, poll_s=5.0) as aetr:
        steps_service.route("/inc", sync(lambda x: x + 1))
        await aetr.put_step({"name": "chain", "kind": "sequential", "children": [
            {"step": api(steps_service, "inc", mode="sync")}, {"step": "inc"}, {"step": "inc"}]})
        late = []
        for i in range(30):
            status, run = await aetr.call("GET", f"/api/v1/runs/{await aetr.start('chain', i)}?wait=10")
            answered = datetime.now(UTC)
            assert status == 200 and run["output"] == i + 3, run
            late.append((answered - datetime.fromisoformat(run["completed_at"])).total_seconds())
        assert max(late) < 0.5, sorted(late)[-5:]


async def test_scripts_that_wait_for_other_scripts_in_one_event_see_their_results(
        aetr: Server, steps_service: StepService) -> None:
    # The start alone runs eleven mappers: the one above the parallel parent, then each box's, then each
    # leaf's, which reads what its box's returned; the last callback runs the reducer. (On SQLite an event
    # runs again once per level of scripts, see sqlite.Writer.)
    steps_service.route("/leaf", callback(lambda x: x))
    await aetr.put_step(api(steps_service, "leaf"))
    boxes = [{"step": {"name": f"box-{i}", "kind": "sequential", "children": [
                  {"step": "leaf", "mapper": "(x) => ({ ...x, w: x.v + 1 })"}]},
              "mapper": "(x, ctx) => ({ v: x.n * 10 + ctx.index, run: ctx.run.id })"} for i in range(5)]
    await aetr.put_step({"name": "levels", "kind": "sequential", "children": [
        {"step": {"name": "fan", "kind": "parallel", "children": boxes,
                  "reducer": "(outs, ctx) => ({ w: outs.map((o) => o.w), index: ctx.index })"},
         "mapper": "(x) => ({ n: x.n + 1 })"}]})
    run_id = await aetr.start("levels", {"n": 1})
    run = await aetr.wait_run(run_id)
    assert run["state"] == "complete", run
    assert run["output"] == {"w": [21, 22, 23, 24, 25], "index": 0}
    assert [box["output"] for box in run["children"][0]["children"]] == [
        {"v": 20 + i, "run": run_id, "w": 21 + i} for i in range(5)]
    assert sorted(c.json["v"] for c in steps_service.calls("/leaf")) == [20 + i for i in range(5)]


async def test_list_runs_filters_and_pages(aetr: Server) -> None:
    await aetr.put_step({"name": "e1", "kind": "sequential"})
    await aetr.put_step({"name": "e2", "kind": "sequential"})
    ids = [await aetr.start("e1", i) for i in range(5)] + [await aetr.start("e2")]
    _, page = await aetr.call("GET", "/api/v1/runs?step=e1&limit=2")
    seen = [r["id"] for r in page["runs"]]
    while page["next_cursor"]:
        _, page = await aetr.call("GET", f"/api/v1/runs?step=e1&limit=2&cursor={page['next_cursor']}")
        seen += [r["id"] for r in page["runs"]]
    assert seen == list(reversed(ids[:5]))
    _, done = await aetr.call("GET", "/api/v1/runs?state=complete")
    assert len(done["runs"]) == 6
    _, none = await aetr.call("GET", "/api/v1/runs?state=error")
    assert none["runs"] == []
    assert (await aetr.call("GET", "/api/v1/runs?state=bogus"))[0] == 422
    assert (await aetr.call("GET", "/api/v1/runs?cursor=garbage"))[0] == 422
    assert (await aetr.call("GET", "/api/v1/runs?limit=0"))[0] == 422


async def test_cancel_makes_later_callbacks_conflict(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    await aetr.put_step(api(steps_service, "a"))
    run_id = await aetr.start("a")
    (call,) = await steps_service.wait_for_calls("/a", 1)
    status, run = await aetr.call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status == 200 and run["state"] == "cancelled"
    async with aetr.http.post(call.headers["AETR-Callback"], json=1) as resp:
        assert resp.status == 409
    assert (await aetr.call("POST", f"/api/v1/runs/{run_id}/cancel"))[0] == 409


async def test_idempotency_key_returns_the_same_run(aetr: Server) -> None:
    await aetr.put_step({"name": "e", "kind": "sequential"})
    headers = {"Idempotency-Key": "order-17"}
    s1, r1 = await aetr.call("POST", "/api/v1/runs", {"step": "e", "input": 1}, headers=headers)
    s2, r2 = await aetr.call("POST", "/api/v1/runs", {"step": "e", "input": 1}, headers=headers)
    assert (s1, s2) == (201, 200) and r1["id"] == r2["id"]


async def test_bad_run_requests_get_4xx(aetr: Server, steps_service: StepService) -> None:
    assert (await aetr.call("POST", "/api/v1/runs", {"step": "nope"}))[0] == 422
    assert (await aetr.call("POST", "/api/v1/runs", {"input": 1}))[0] == 422
    assert (await aetr.call("POST", "/api/v1/runs", {"step": "x", "extra": 1}))[0] == 422
    assert (await aetr.call("GET", "/api/v1/runs/not-a-uuid"))[0] == 404
    assert (await aetr.call("GET", "/api/v1/runs/00000000-0000-0000-0000-000000000000"))[0] == 404
    assert (await aetr.call("GET", "/api/v1/runs/00000000-0000-0000-0000-000000000000/events"))[0] == 404
    assert (await aetr.call("GET", "/api/v1/runs/00000000-0000-0000-0000-000000000000?wait=61"))[0] == 422


async def test_an_oversized_callback_body_is_refused_and_changes_nothing(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url, max_payload_bytes=4096) as aetr:
        steps_service.route("/a", never())
        await aetr.put_step(api(steps_service, "a"))
        run_id = await aetr.start("a")
        (call,) = await steps_service.wait_for_calls("/a", 1)
        for chunked in (False, True):
            big = b'"' + b"x" * 5000 + b'"'
            body: Any = big if not chunked else _chunks(big)
            async with aetr.http.post(call.headers["AETR-Callback"], data=body,
                                      headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 413
                assert "AETR_MAX_PAYLOAD_BYTES" in (await resp.json())["detail"]
        _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
        assert run["state"] == "executing"
        async with aetr.http.post(call.headers["AETR-Callback"], data=b"plain text",
                                  headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 200
        assert (await aetr.wait_run(run_id))["output"] == "plain text"


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1000):
        yield data[i:i + 1000]


MIB = 1024 * 1024


async def _chunked(size: int, chunk: int = MIB) -> AsyncIterator[bytes]:
    """A body of `size` bytes sent chunked (aiohttp sends no Content-Length for a generator)."""
    for start in range(0, size, chunk):
        yield b"x" * min(chunk, size - start)


async def test_an_oversized_chunked_body_gets_413_on_every_route_and_changes_nothing(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/a", never())
    await aetr.put_step(api(steps_service, "a", heartbeat_s=30))
    run_id = await aetr.start("a")
    (call,) = await steps_service.wait_for_calls("/a", 1)
    callback_url = call.headers["AETR-Callback"]
    # 17 MiB against the default limit of 16 MiB, the size of a reported attack; most of these routes never read a body.
    for method, url in [("POST", f"{aetr.base_url}/api/v1/runs/{run_id}/cancel"),
                        ("POST", f"{aetr.base_url}/api/v1/runs/{run_id}/retry"),
                        ("POST", f"{callback_url}/heartbeat"), ("POST", f"{callback_url}/fail"),
                        ("POST", callback_url), ("POST", f"{aetr.base_url}/api/v1/runs"),
                        ("GET", f"{aetr.base_url}/api/v1/runs/{run_id}"), ("GET", f"{aetr.base_url}/healthz"),
                        ("POST", f"{aetr.base_url}/no/such/route")]:
        async with aetr.http.request(method, url, data=_chunked(17 * MIB),
                                     headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413, (method, url, resp.status, await resp.text())
            assert "AETR_MAX_PAYLOAD_BYTES" in (await resp.json())["detail"]
    _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert run["state"] == "executing"
    _, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
    assert not [e for e in events if "heartbeat" in orjson.dumps(e).decode()], events
    _, page = await aetr.call("GET", "/api/v1/runs")
    assert [r["id"] for r in page["runs"]] == [run_id]
    # Small chunked bodies are read as before, on the same routes.
    async with aetr.http.post(f"{callback_url}/heartbeat", data=_chunked(10)) as resp:
        assert resp.status == 200, await resp.text()
    _, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
    assert [e for e in events if "heartbeat" in orjson.dumps(e).decode()], events
    async with aetr.http.post(f"{aetr.base_url}/api/v1/runs", data=_chunks(b'{"step": "a"}'),
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 201, await resp.text()
    async with aetr.http.post(f"{aetr.base_url}/api/v1/runs/{run_id}/cancel", data=_chunked(10)) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["state"] == "cancelled"


async def test_retry_runs_failed_nodes_again_and_keeps_completed_ones(aetr: Server,
                                                                     steps_service: StepService) -> None:
    steps_service.route("/first", callback(lambda x: x + 1))
    steps_service.route("/flaky", sequence(fail("disk full", retryable=False), callback(lambda x: x * 10)))
    await aetr.put_step({"name": "p", "kind": "sequential", "children": [
        {"step": api(steps_service, "first")}, {"step": api(steps_service, "flaky")}]})
    run_id = await aetr.start("p", 1)
    failed = await aetr.wait_run(run_id)
    assert failed["state"] == "error" and failed["error"]["message"] == "disk full"
    status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/retry")
    # The answer shows the run once the redrive committed: the step may have been called back already.
    assert status == 200 and body["state"] in ("executing", "complete"), body
    done = await aetr.wait_run(run_id)
    assert done["state"] == "complete" and done["output"] == 20
    assert len(steps_service.calls("/first")) == 1
    assert [c.headers["AETR-Attempt"] for c in steps_service.calls("/flaky")] == ["1", "2"]
    status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/retry")
    assert status == 409 and "complete" in body["detail"]


async def test_a_start_answers_alike_whichever_path_serves_it(aetr: Server, steps_service: StepService) -> None:
    # A plain start is served below FastAPI (FastStarts); one with an Idempotency-Key, or one refused, by the
    # route. A user sees no difference.
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "pair", "kind": "sequential", "children": [{"step": api(steps_service, "leaf")},
                                                                         {"step": api(steps_service, "leaf2")}]})
    fast = await aetr.http.post(f"{aetr.base_url}/api/v1/runs", json={"step": "pair", "input": {"n": 1}})
    routed = await aetr.http.post(f"{aetr.base_url}/api/v1/runs", json={"step": "pair", "input": {"n": 1}},
                                  headers={"Idempotency-Key": "k-1"})
    assert (fast.status, routed.status) == (201, 201)
    assert fast.headers["Content-Type"] == routed.headers["Content-Type"]
    a, b = await fast.json(), await routed.json()
    assert fast.headers["Location"] == f"/api/v1/runs/{a['id']}"

    def shape(run: dict[str, Any]) -> Any:
        return {k: (v if k not in ("id", "root_id", "parent_id", "created_at", "started_at") else type(v).__name__)
                for k, v in run.items() if k != "children"}, [shape(c) for c in run["children"]]

    assert shape(a) == shape(b)
    for body, status_code in (({"step": "nope"}, 422), ({"step": "pair", "extra": 1}, 422), ({"input": 1}, 422)):
        async with aetr.http.post(f"{aetr.base_url}/api/v1/runs", json=body) as resp:
            assert resp.status == status_code, (body, await resp.text())
            assert "detail" in await resp.json()
    async with aetr.http.post(f"{aetr.base_url}/api/v1/runs", data=b'{"step": "pair"',
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 422 and "detail" in await resp.json()


async def test_a_run_started_after_a_step_changed_runs_the_new_definition(aetr: Server,
                                                                          steps_service: StepService) -> None:
    # Starts reuse the step tree they built while it is unchanged: a change must reach the very next start.
    steps_service.route("/old", callback(lambda x: {"by": "old"}))
    steps_service.route("/new", callback(lambda x: {"by": "new"}))
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/old")})
    await aetr.put_step({"name": "pipe", "kind": "sequential", "children": [{"step": "leaf"}]})
    first = await aetr.wait_run(await aetr.start("pipe", {"n": 1}))
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/new")})
    second = await aetr.wait_run(await aetr.start("pipe", {"n": 2}))
    assert first["output"] == {"by": "old"} and second["output"] == {"by": "new"}
    assert [c.json for c in steps_service.calls("/old")] == [{"n": 1}]
    assert [c.json for c in steps_service.calls("/new")] == [{"n": 2}]
    assert first["children"][0]["step"]["version"] == 1 and second["children"][0]["step"]["version"] == 2


# Characters each layer of a write escapes its own way (JSON inside JSON on PostgreSQL, where an event's rows go
# out as one JSON parameter): quotes, backslashes, control characters, a line separator, one outside the BMP,
# text that reads as JSON or as an escape sequence.
AWKWARD = ['"q"', "back\\slash", "\\u0041 is not A", "tab\tnew\nline", "\u2028", "😀 é ß", '{"a": 1}', "null", ""]


async def test_every_character_a_run_carries_is_kept_exactly(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/echo", callback(lambda value: {"got": value, "awkward": AWKWARD}))
    steps_service.route("/refuse", fail(" | ".join(AWKWARD)))
    await aetr.put_step(api(steps_service, "echo"))
    await aetr.put_step(api(steps_service, "refuse", retry={"max_attempts": 1}))
    before = datetime.now(UTC)
    run_input = {s: s for s in AWKWARD}
    done = await aetr.wait_run(await aetr.start("echo", run_input))
    assert done["state"] == "complete"
    assert done["input"] == run_input and done["output"] == {"got": run_input, "awkward": AWKWARD}
    # Times go through the same write: in UTC, as they happened, to the microsecond.
    started, completed = (datetime.fromisoformat(done[k]) for k in ("started_at", "completed_at"))
    assert before - timedelta(seconds=1) <= started <= completed <= datetime.now(UTC)

    failed = await aetr.wait_run(await aetr.start("refuse", AWKWARD))
    assert failed["state"] == "error" and failed["input"] == AWKWARD
    assert " | ".join(AWKWARD) in failed["error"]["message"]
    _, events = await aetr.call("GET", f"/api/v1/runs/{failed['id']}/events")
    said = [e for e in events if e["kind"] == "callback.fail"]
    assert said and said[0]["data"]["error"] == " | ".join(AWKWARD), said
