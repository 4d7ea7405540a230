"""Step trees over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yarl

from aetr.api.schemas import ParallelIn, flatten
from aetr.client import Client
from aetr.domain.kinds import ApiSpec, ParallelSpec
from aetr.domain.steps import Link, StepConfig, StepDef
from aetr.store import Store, open_store
from aetr.store.store import count_round_trips
from tests.integration.conftest import Server, running_server

API = {"kind": "api", "url": "http://127.0.0.1:1/x"}


def api(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, **API, **kw}


async def test_put_creates_then_replaces_and_bumps_the_version(aetr: Server) -> None:
    status, body = await aetr.call("PUT", "/api/v1/steps/ingest", api("ingest"))
    assert status == 201
    assert body["version"] == 1 and body["kind"] == "api" and body["retry"]["max_attempts"] == 3
    status, body = await aetr.call("PUT", "/api/v1/steps/ingest", api("ingest", timeout_s=5))
    assert status == 200
    assert body["version"] == 2 and body["timeout_s"] == 5


async def test_inline_children_are_stored_as_steps_and_mappers_stay_on_the_link(aetr: Server) -> None:
    await aetr.put_step(api("a"))
    tree = {"name": "pipe", "kind": "sequential", "children": [
        {"step": "a", "mapper": "(x) => x + 1"},
        {"step": {"name": "fan", "kind": "parallel", "reducer": "merge",
                  "children": [{"step": api("b")}, {"step": "a"}]}},
        {"step": "a"},
    ]}
    status, body = await aetr.call("PUT", "/api/v1/steps/pipe", tree)
    assert status == 201
    kids = body["children"]
    assert [k["mapper"] for k in kids] == ["(x) => x + 1", None, None]
    assert kids[1]["step"]["reducer"] == "merge"
    assert [k["step"]["name"] for k in kids[1]["step"]["children"]] == ["b", "a"]
    status, b = await aetr.call("GET", "/api/v1/steps/b")
    assert status == 200 and b["url"] == API["url"]
    status, parents = await aetr.call("GET", "/api/v1/steps/a/parents")
    assert parents == ["fan", "pipe"]


async def test_get_rebuilds_the_tree_in_one_round_trip(aetr: Server) -> None:
    leaves = [{"step": api(f"leaf{i}")} for i in range(20)]
    await aetr.put_step({"name": "deep", "kind": "sequential", "children": [
        {"step": {"name": "mid", "kind": "parallel", "children": leaves}}, {"step": "leaf0"}]})
    status, body = await aetr.call("GET", "/api/v1/steps/deep")
    assert status == 200
    assert len(body["children"][0]["step"]["children"]) == 20
    with count_round_trips() as statements:
        tree = await aetr.engine.store.get_step_tree("deep")
    assert tree is not None and tree.to_json() == body and len(statements) == 1
    status, by_id = await aetr.call("GET", f"/api/v1/steps/{body['id']}")
    assert by_id == body


async def test_children_by_name_must_exist_and_nothing_is_stored_otherwise(aetr: Server) -> None:
    status, body = await aetr.call("PUT", "/api/v1/steps/p", {
        "name": "p", "kind": "sequential", "children": [{"step": api("new-inline")}, {"step": "ghost"}]})
    assert status == 422
    assert "ghost" in body["detail"]
    _, steps = await aetr.call("GET", "/api/v1/steps")
    assert steps == []


async def test_a_cycle_through_stored_trees_is_refused_with_its_path(aetr: Server) -> None:
    await aetr.put_step(api("leaf"))
    await aetr.put_step({"name": "inner", "kind": "sequential", "children": [{"step": "leaf"}]})
    await aetr.put_step({"name": "outer", "kind": "parallel", "children": [{"step": "inner"}]})
    status, body = await aetr.call("PUT", "/api/v1/steps/inner", {
        "name": "inner", "kind": "sequential", "children": [{"step": "leaf"}, {"step": "outer"}]})
    assert status == 422
    assert "inner → outer → inner" in body["detail"]
    _, inner = await aetr.call("GET", "/api/v1/steps/inner")
    assert inner["version"] == 1 and len(inner["children"]) == 1
    status, body = await aetr.call("PUT", "/api/v1/steps/self", {
        "name": "self", "kind": "sequential", "children": [{"step": {"name": "self", "kind": "sequential"}}]})
    assert status == 422


async def test_if_match_makes_the_change_conditional(aetr: Server) -> None:
    await aetr.put_step(api("s"))
    status, body = await aetr.call("PUT", "/api/v1/steps/s", api("s", method="PUT"), headers={"If-Match": "7"})
    assert status == 412 and "version 1" in body["detail"]
    status, body = await aetr.call("PUT", "/api/v1/steps/s", api("s", method="PUT"), headers={"If-Match": "1"})
    assert status == 200 and body["version"] == 2 and body["method"] == "PUT"


async def test_delete_is_refused_while_a_parent_uses_the_step(aetr: Server) -> None:
    await aetr.put_step(api("used"))
    await aetr.put_step({"name": "user", "kind": "sequential", "children": [{"step": "used"}]})
    status, body = await aetr.call("DELETE", "/api/v1/steps/used")
    assert status == 409 and "user" in body["detail"]
    assert (await aetr.call("DELETE", "/api/v1/steps/user"))[0] == 204
    assert (await aetr.call("DELETE", "/api/v1/steps/used"))[0] == 204
    assert (await aetr.call("GET", "/api/v1/steps/used"))[0] == 404
    assert (await aetr.call("DELETE", "/api/v1/steps/used"))[0] == 404


async def test_list_is_sorted_by_name(aetr: Server) -> None:
    for name in ("zeta", "alpha", "mid"):
        await aetr.put_step(api(name))
    _, steps = await aetr.call("GET", "/api/v1/steps")
    assert [s["name"] for s in steps] == ["alpha", "mid", "zeta"]
    assert set(steps[0]) == {"id", "name", "kind", "version", "updated_at"}


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("malformed JSON", b"{not json", "JSON"),
    ("wrong type", {"name": "s", "kind": "api", "url": "http://h/x", "timeout_s": "soon"}, "timeout_s"),
    ("unknown kind", {"name": "s", "kind": "lambda"}, "kind"),
    ("extra field", {"name": "s", "kind": "api", "url": "http://h/x", "colour": "red"}, "colour"),
    ("missing url", {"name": "s", "kind": "api"}, "url"),
    ("bad url", {"name": "s", "kind": "api", "url": "ftp://h/x"}, "url"),
    ("relative url", {"name": "s", "kind": "api", "url": "/x"}, "url"),
    ("name differs from path", {"name": "other", "kind": "api", "url": "http://h/x"}, "name"),
    ("bad child name", {"name": "s", "kind": "sequential", "children": [{"step": "no spaces"}]}, "step"),
    ("mapper does not compile", {"name": "s", "kind": "sequential",
                                 "children": [{"step": api("k"), "mapper": "(x) => {"}]}, "mapper"),
    ("reducer does not compile", {"name": "s", "kind": "parallel", "reducer": "not js ("}, "reducer"),
    ("zero attempts", {"name": "s", "kind": "api", "url": "http://h/x", "retry": {"max_attempts": 0}}, "max_attempts"),
    ("header with newline", {"name": "s", "kind": "api", "url": "http://h/x", "headers": {"X": "a\nb"}}, "headers"),
    ("not an object", [1, 2], "body"),
    ("framing header", {"name": "s", "kind": "api", "url": "http://h/x", "headers": {"content-length": "5"}},
     "content-length may not be set"),
    ("hop-by-hop headers", {"name": "s", "kind": "api", "url": "http://h/x",
                            "headers": {"X-Ok": "1", "Transfer-Encoding": "chunked", "HOST": "h"}},
     "Transfer-Encoding, HOST may not be set"),
    ("url host that cannot be encoded", {"name": "s", "kind": "api", "url": "http://ü" + "a" * 70 + "/x"}, "url"),
]


@pytest.mark.parametrize(("case", "body", "mentions"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_step_bodies_get_a_4xx_naming_the_problem_and_change_nothing(
        aetr: Server, case: str, body: Any, mentions: str) -> None:
    await aetr.put_step(api("s"))
    if isinstance(body, bytes):
        status, answer = await aetr.call("PUT", "/api/v1/steps/s", data=body,
                                         headers={"Content-Type": "application/json"})
    else:
        status, answer = await aetr.call("PUT", "/api/v1/steps/s", body)
    assert 400 <= status < 500, answer
    assert isinstance(answer["detail"], str) and mentions in answer["detail"], answer
    _, steps = await aetr.call("GET", "/api/v1/steps")
    assert [(s["name"], s["version"]) for s in steps] == [("s", 1)]


async def test_bad_path_names_are_refused(aetr: Server) -> None:
    status, body = await aetr.call("PUT", "/api/v1/steps/bad%20name", {"name": "bad name", **API})
    assert status == 422 and "name" in body["detail"]
    assert (await aetr.call("GET", "/api/v1/steps/nope"))[0] == 404
    assert (await aetr.call("GET", "/api/v1/steps/nope/parents"))[0] == 404


async def test_if_match_on_a_step_that_does_not_exist_says_so_and_creates_nothing(aetr: Server) -> None:
    status, body = await aetr.call("PUT", "/api/v1/steps/new", api("new"), headers={"If-Match": "1"})
    assert status == 412, body
    assert "'new' does not exist" in body["detail"] and "without If-Match" in body["detail"]
    assert (await aetr.call("GET", "/api/v1/steps/new"))[0] == 404
    status, body = await aetr.call("PUT", "/api/v1/steps/new", api("new"))
    assert status == 201 and body["version"] == 1


async def test_two_changes_made_at_once_never_store_a_cycle_between_them(aetr: Server) -> None:
    # Each change alone is fine; together they would make a cycle. Whichever comes second must see the first.
    for i in range(10):
        a, b = f"a{i}", f"b{i}"
        await aetr.put_step(api(a))
        await aetr.put_step(api(b))
        answers = await asyncio.gather(
            aetr.call("PUT", f"/api/v1/steps/{a}", {"name": a, "kind": "sequential", "children": [{"step": b}]}),
            aetr.call("PUT", f"/api/v1/steps/{b}", {"name": b, "kind": "sequential", "children": [{"step": a}]}))
        assert sorted(status for status, _ in answers) == [200, 422], answers
        refused = next(body for status, body in answers if status == 422)
        assert "may not contain itself" in refused["detail"], refused


# ---- step names --------------------------------------------------------------------------------------------


async def call_raw_path(aetr: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON) of a request whose path is sent as written: '..' and '%2E' are not resolved away."""
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    async with aetr.http.request(method, yarl.URL(aetr.base_url + path, encoded=True), **kw) as resp:
        return resp.status, await resp.json() if resp.content_type == "application/json" else None


@pytest.mark.parametrize("name", [".", "..", "...", "." * 200])
async def test_a_name_made_of_dots_alone_is_refused_wherever_it_is_given(aetr: Server, name: str) -> None:
    await aetr.put_step(api("leaf"))
    rule = "not dots alone"
    for path in (f"/api/v1/steps/{name}", f"/api/v1/steps/{name.replace('.', '%2E')}"):
        status, answer = await call_raw_path(aetr, "PUT", path, api(name))
        assert status == 422 and rule in answer["detail"], (path, answer)
    status, answer = await aetr.call("PUT", "/api/v1/steps/p", {"name": "p", "kind": "sequential", "children": [
        {"step": "leaf"}, {"step": api(name)}]})
    assert status == 422 and "children.1.step" in answer["detail"] and rule in answer["detail"], answer
    status, answer = await aetr.call("PUT", "/api/v1/steps/p", {"name": "p", "kind": "parallel", "children": [
        {"step": name}]})
    assert status == 422 and "children.0.step" in answer["detail"] and rule in answer["detail"], answer
    _, steps = await aetr.call("GET", "/api/v1/steps")
    assert [s["name"] for s in steps] == ["leaf"]


async def test_names_with_dots_and_something_else_are_accepted(aetr: Server) -> None:
    for name in (".a", "a.", "..a..", "-", "_", "v1.2.3"):
        status, body = await aetr.call("PUT", f"/api/v1/steps/{name}", api(name))
        assert status == 201 and body["name"] == name, body
        assert (await aetr.call("GET", f"/api/v1/steps/{name}"))[1]["name"] == name


async def test_a_step_stored_under_a_dots_only_name_before_the_rule_can_still_be_read_and_deleted(
        aetr: Server) -> None:
    # As an earlier version stored it: the store itself takes any name the API let through.
    await aetr.engine.store.put_steps([StepDef(StepConfig(name="..", spec=ApiSpec(url="http://127.0.0.1:1/x")))],
                                      None, datetime.now(UTC))
    status, body = await call_raw_path(aetr, "GET", "/api/v1/steps/%2E%2E")
    assert status == 200 and body["name"] == "..", body
    assert (await call_raw_path(aetr, "DELETE", "/api/v1/steps/%2E%2E"))[0] == 204
    assert (await aetr.call("GET", "/api/v1/steps"))[1] == []


# ---- how many nodes a tree resolves to ----------------------------------------------------------------------

SMALL_LIMIT = 1000  # AETR_MAX_TREE_NODES for these tests: the trees stay small enough to answer quickly


def fan(name: str, child: str, times: int) -> dict[str, Any]:
    """A parallel step of `times` links to `child`."""
    return {"name": name, "kind": "parallel", "children": [{"step": child}] * times}


@pytest.fixture
async def small(database_url: str) -> AsyncIterator[Server]:
    """A running server whose trees may resolve to SMALL_LIMIT nodes at most."""
    async with running_server(database_url, max_tree_nodes=SMALL_LIMIT) as server:
        await server.put_step(api("leaf"))
        yield server


async def test_a_tree_resolving_to_more_nodes_than_the_limit_is_refused_with_the_count_and_not_kept(
        small: Server) -> None:
    await small.put_step(fan("b1", "leaf", 10))  # 11 nodes
    status, b2 = await small.call("PUT", "/api/v1/steps/b2", fan("b2", "b1", 10))  # 1 + 10 × 11 = 111 nodes
    assert status == 201, b2
    _, before = await small.call("GET", "/api/v1/steps")
    status, answer = await small.call("PUT", "/api/v1/steps/b3", fan("b3", "b2", 10))  # 1 + 10 × 111 = 1111 nodes
    assert status == 422, answer
    assert "'b3' would resolve to 1111 nodes" in answer["detail"] and "at most 1000" in answer["detail"]
    assert "AETR_MAX_TREE_NODES" in answer["detail"]
    assert (await small.call("GET", "/api/v1/steps/b3"))[0] == 404
    assert (await small.call("GET", "/api/v1/steps"))[1] == before
    # Inline children count as much as stored ones, and nothing of a refused body is kept.
    status, answer = await small.call("PUT", "/api/v1/steps/b3", {"name": "b3", "kind": "sequential", "children": [
        {"step": fan("new-fan", "b2", 9)}, {"step": "b2"}]})  # 1 + (1 + 9 × 111) + 111 = 1112
    assert status == 422 and "1112 nodes" in answer["detail"], answer
    assert (await small.call("GET", "/api/v1/steps"))[1] == before


async def test_growing_a_reused_tree_is_refused_when_a_tree_reusing_it_would_pass_the_limit(small: Server) -> None:
    await small.put_step(fan("b1", "leaf", 10))
    await small.put_step(fan("b2", "b1", 10))
    await small.put_step(fan("b3", "b2", 5))  # 1 + 5 × 111 = 556 nodes
    # b1 × 20 resolves to 21 nodes itself, but makes b2 211 and b3 1 + 5 × 211 = 1056.
    status, answer = await small.call("PUT", "/api/v1/steps/b1", fan("b1", "leaf", 20))
    assert status == 422, answer
    assert "'b3' would resolve to 1056 nodes" in answer["detail"] and "at most 1000" in answer["detail"]
    _, b1 = await small.call("GET", "/api/v1/steps/b1")
    assert b1["version"] == 1 and len(b1["children"]) == 10
    # Within the limit, the same kind of change goes through: b3 becomes 1 + 5 × (1 + 10 × 18) = 906.
    status, b1 = await small.call("PUT", "/api/v1/steps/b1", fan("b1", "leaf", 17))
    assert status == 200 and len(b1["children"]) == 17, b1


async def test_a_tree_over_a_limit_lowered_since_it_was_stored_does_not_start(small: Server, database_url: str) -> None:
    # Stored by a process allowed bigger trees (or before the limit was lowered).
    other = open_store(database_url)
    try:
        for body in (fan("b1", "leaf", 10), fan("b2", "b1", 10), fan("b3", "b2", 10)):
            await other.put_steps(flatten(ParallelIn.model_validate(body)), None, datetime.now(UTC), 2000)
    finally:
        await other.close()
    for headers in ({}, {"Idempotency-Key": "k1"}):  # the plain start is served below FastAPI's routing
        status, answer = await small.call("POST", "/api/v1/runs", {"step": "b3"}, headers=headers)
        assert status == 422, answer
        assert "'b3' resolves to 1111 nodes" in answer["detail"] and "at most 1000" in answer["detail"], answer
    assert (await small.call("GET", "/api/v1/runs"))[1]["runs"] == []
    status, run = await small.call("POST", "/api/v1/runs", {"step": "b2"})
    assert status == 201 and len(run["children"]) == 10, run


async def test_the_default_limit_takes_a_parallel_step_of_100_000_children(store: Store) -> None:
    now = datetime.now(UTC)
    leaf = StepDef(StepConfig(name="leaf", spec=ApiSpec(url="http://127.0.0.1:1/x")))
    await store.put_steps([leaf], None, now)
    wide = StepDef(StepConfig(name="wide", spec=ParallelSpec()), (Link("leaf"),) * 100_000)
    created, tree = await store.put_steps([wide], None, now + timedelta(seconds=1))
    assert created and tree.node_count == 100_001


async def test_a_few_kilobytes_resolving_to_ten_million_nodes_are_refused_under_the_default_limit(
        aetr: Server) -> None:
    await aetr.put_step(api("leaf"))
    await aetr.put_step(fan("b1", "leaf", 1000))  # 1001 nodes
    status, _ = await aetr.call("PUT", "/api/v1/steps/b2", fan("b2", "b1", 100))  # 100,101 nodes
    assert status == 201
    status, answer = await aetr.call("PUT", "/api/v1/steps/b3", fan("b3", "b2", 100))
    assert status == 422, answer
    assert "10010101 nodes" in answer["detail"] and "at most 200000" in answer["detail"], answer
    assert (await aetr.call("GET", "/api/v1/steps/b3"))[0] == 404


async def put_applied(aetr: Server, spec: dict[str, Any], query: str = "") -> tuple[int, Any, dict[str, str]]:
    """(status, body, what the AETR-Applied header says of each step) of one PUT."""
    async with aetr.http.put(f"{aetr.base_url}/api/v1/steps/{spec['name']}{query}", json=spec) as resp:
        applied = dict(pair.split("=") for pair in resp.headers.get("AETR-Applied", "").split())
        return resp.status, await resp.json(), applied


PIPE = {"name": "pipe", "kind": "sequential", "children": [
    {"step": {"name": "fetch", **API, "timeout_s": 5}, "mapper": "(x) => x"},
    {"step": {"name": "store", **API}}]}


async def test_putting_the_same_definition_again_changes_nothing_and_says_unchanged(aetr: Server) -> None:
    status, first, applied = await put_applied(aetr, PIPE)
    assert status == 201 and applied == {"pipe": "created", "fetch": "created", "store": "created"}, applied
    _, before = await aetr.call("GET", "/api/v1/steps")
    status, again, applied = await put_applied(aetr, PIPE)
    assert status == 200 and applied == {"pipe": "unchanged", "fetch": "unchanged", "store": "unchanged"}
    assert again == first  # same versions, same ids
    assert (await aetr.call("GET", "/api/v1/steps"))[1] == before  # updated_at too


async def test_only_the_steps_whose_definition_differs_get_a_new_version(aetr: Server) -> None:
    await put_applied(aetr, PIPE)
    changed = {**PIPE, "children": [
        {"step": {"name": "fetch", **API, "timeout_s": 6}, "mapper": "(x) => x"}, PIPE["children"][1]]}
    _, body, applied = await put_applied(aetr, changed)
    assert applied == {"pipe": "unchanged", "fetch": "changed", "store": "unchanged"}, applied
    assert body["version"] == 1 and [c["step"]["version"] for c in body["children"]] == [2, 1], body
    # A new mapper is a change of the parent, whose link holds it.
    remapped = {**changed, "children": [{**changed["children"][0], "mapper": "(x) => x.y"}, PIPE["children"][1]]}
    _, body, applied = await put_applied(aetr, remapped)
    assert applied == {"pipe": "changed", "fetch": "unchanged", "store": "unchanged"}, applied
    assert body["version"] == 2, body


def wide_inline(n: int, timeout_of: dict[int, int] | None = None) -> dict[str, Any]:
    """A parallel step `wide` of `n` inline api children `c-0000`, ... (child i's timeout from `timeout_of`)."""
    return {"name": "wide", "kind": "parallel", "children": [
        {"step": {"name": f"c-{i:04d}", **API, "timeout_s": (timeout_of or {}).get(i, 5)}} for i in range(n)]}


async def test_a_tree_of_thousands_of_inline_steps_says_what_fits_in_a_header_a_client_reads(
        aetr: Server) -> None:
    # Every pair would take 22 KB: common clients (aiohttp here) refuse a header line over 8 KB.
    async with aetr.http.put(f"{aetr.base_url}/api/v1/steps/wide", json=wide_inline(1500)) as resp:
        said = resp.headers["AETR-Applied"]
        assert resp.status == 201 and len((await resp.json())["children"]) == 1500
    pairs = said.split()
    assert len(said) <= 4096 and pairs[0] == "wide=created", said[:100]
    listed, (left_out, count) = pairs[:-1], pairs[-1].split("=")
    assert left_out == "+more" and len(listed) + int(count) == 1501, pairs[-1]
    assert all(pair.endswith("=created") for pair in listed)
    # Changed steps are said before unchanged ones, however far down the tree they are; the client counts the rest.
    async with Client(aetr.base_url) as client:
        applied = await client.apply_step(wide_inline(1500, {1400: 6}))
    assert list(applied.outcomes.items())[:2] == [("wide", "unchanged"), ("c-1400", "changed")], applied.outcomes
    assert len(applied.outcomes) + applied.unlisted == 1501 and applied.unlisted > 0


async def test_a_dry_run_answers_what_would_change_and_keeps_nothing(aetr: Server) -> None:
    status, body, applied = await put_applied(aetr, PIPE, "?dry_run=true")
    assert status == 200 and applied == {"pipe": "created", "fetch": "created", "store": "created"}, applied
    assert body["name"] == "pipe" and len(body["children"]) == 2
    assert (await aetr.call("GET", "/api/v1/steps"))[1] == []
    await put_applied(aetr, PIPE)
    changed = {**PIPE, "children": [PIPE["children"][0], {"step": {"name": "store", **API, "timeout_s": 9}}]}
    status, body, applied = await put_applied(aetr, changed, "?dry_run=true")
    assert applied == {"pipe": "unchanged", "fetch": "unchanged", "store": "changed"}, applied
    assert body["children"][1]["step"]["version"] == 2 and body["children"][1]["step"]["timeout_s"] == 9
    _, stored = await aetr.call("GET", "/api/v1/steps/store")
    assert stored["version"] == 1 and stored["timeout_s"] != 9, stored


async def test_a_mapper_that_does_not_parse_is_refused_with_its_own_line_and_column(aetr: Server) -> None:
    body = {"name": "s", "kind": "sequential", "children": [
        {"step": api("k"), "mapper": "(input) => ({\n  sku: input.id,\n  price: input.price +* 100,\n})"}]}
    status, answer = await aetr.call("PUT", "/api/v1/steps/s", body)
    assert status == 422, answer
    assert answer["detail"] == ("step 's', child 0 ('k') mapper does not compile (line 3, column 23 of the "
                                "script): SyntaxError: Unexpected token '*'"), answer
    body["children"][0]["mapper"] = "(input) => {"
    status, answer = await aetr.call("PUT", "/api/v1/steps/s", body)
    assert status == 422 and "(line 1, column 12 of the script)" in answer["detail"], answer
    assert "brace opened on line 1, column 12 is closed" in answer["detail"] and "')'" not in answer["detail"]
    assert (await aetr.call("GET", "/api/v1/steps/s"))[0] == 404

    status, answer = await aetr.call("POST", "/api/v1/sandbox/evaluate", {"source": "(input) => {", "input": 1})
    assert status == 200 and answer["ok"] is False, answer
    assert (answer["error"]["line"], answer["error"]["column"], answer["error"]["kind"]) == (1, 12, "syntax"), answer
