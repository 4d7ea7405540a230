"""The server does what its OpenAPI document says, and every bad request gets 4xx and a `detail`, never a 500:
schemathesis with all its checks over the whole API (generated cases, the coverage phase, and stateful sequences
that follow the document's links), then the bad-input classes a fuzzer rarely reaches, each checked to leave
stored steps and runs as they were."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
import schemathesis.engine
import schemathesis.engine.events
from hypothesis import strategies as st

from aetr.api.app import create_app
from aetr.config import Settings
from aetr.domain.jsonvalue import MAX_JSON_DEPTH, MAX_TREE_DEPTH
from aetr.testing import StepService
from aetr.testing.behaviours import never
from tests.integration.conftest import Server, running_server

MAX_EXAMPLES = 10  # cases per operation in the fuzzing phase (the coverage phase adds its own): keeps the module fast
START_TIMEOUT_S = 30.0  # seconds the fuzz server may take to start and be seeded
REQUEST_TIMEOUT_S = 20.0  # seconds one fuzzed request may take (a `?wait=` is capped far below this)
MAX_FUZZ_WAIT_S = 0.05  # seconds: `GET /runs/{id}?wait=N` on a run that never ends would otherwise hold N seconds
STATEFUL_SCENARIOS = 25  # sequences of calls that follow the document's links (a created run to its routes...)
STATEFUL_STEPS = 6  # calls in one sequence at most

HOLD = "/hold"  # the step service accepts calls on this path and never calls back: those nodes stay executing
CALLBACK_ROUTES = ("/api/v1/callbacks/{token}", "/api/v1/callbacks/{token}/fail", "/api/v1/callbacks/{token}/heartbeat")


# ---- the fuzzer: the app's own OpenAPI document, against one real server for the whole module -------------------

# schemathesis.pytest.from_fixture (a schema loaded from the running server) fails on pytest 9, whose nodes have no
# `_nodeid` any more; the document is the app's own, so it is built here, and a test below checks the server
# serves the same one.
SPEC = create_app(Settings()).openapi()
SEED_STEPS = ["seed-api", "seed-fan", "seed-chain", "seed-empty"]
# A stored leaf that generated trees refer to by name; no generated request targets it, so it stays a leaf and a
# tree that uses it can never make a cycle.
LEAF = "seed-leaf"
BUILTIN_REDUCERS = ("array", "last", "merge")
CONFIG: dict[str, Any] = {
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    # How fast cases are generated depends on the machine's load, not on the API: not a reason to fail.
    "suppress-health-check": ["too_slow"],
    "phases": {"stateful": {"max-steps": STATEFUL_STEPS}},
    # The coverage phase makes about 1,200 variants of the recursive step-tree body and takes longer than all other
    # operations together: PUT /steps/{name} gets twice the fuzzed cases instead, and explicit tests below.
    "operations": [{"include-name": "PUT /api/v1/steps/{name}", "phases": {"coverage": {"enabled": False}},
                    "generation": {"max-examples": 2 * MAX_EXAMPLES},
                    # Loosened: an If-Match of the right form names a version, and whether it is the stored one is
                    # the server's state (the stateful phase replays requests after others changed the step).
                    "checks": {"positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "404", "409", "412", "429"]}}},
                   # Loosened, on purpose: a run names its step, and whether a step of that name is stored is the
                   # server's state, not the request's shape; the document declares that 422 for this operation.
                   {"include-operation-id": "start_run", "checks": {"positive_data_acceptance": {
                       "expected-statuses": ["2xx", "401", "404", "409", "422", "429"]}}},
                   # Loosened too: a schedule names its step (server state), and whether a cron expression that
                   # matches its pattern ever comes (0 0 31 2 *) or an IANA zone name is known is croniter's and
                   # zoneinfo's to say; the document declares that 422.
                   {"include-operation-id": "put_schedule", "checks": {"positive_data_acceptance": {
                       "expected-statuses": ["2xx", "401", "422", "429"]}}}],
    "request-timeout": REQUEST_TIMEOUT_S,
    "dictionaries": {"steps": {"values": SEED_STEPS}},
    "parameters": {key: {"dictionary": "steps", "probability": 0.5}
                   for key in ("path.name", "query.step", "body.step")},
}
# Copies: schemathesis adds to the document it is given.
schema = schemathesis.openapi.from_dict(copy.deepcopy(SPEC), config=schemathesis.Config.from_dict(CONFIG))


@dataclass(frozen=True)
class Seeds:
    """What the server stored before fuzzing that only exists at run time: ids and callback tokens."""

    step_id: str
    runs: list[str]  # a run still executing, one of its nodes, and a run that is complete
    tokens: dict[str, str]  # for each callback route, the genuine token of an attempt still executing


@dataclass(frozen=True)
class FuzzServer:
    base_url: str
    seeds: Seeds


_seeds: list[Seeds] = []  # the running fuzz server's, for the hooks below (hooks cannot take fixtures)


async def seed(server: Server, service: StepService) -> Seeds:
    """Steps of every kind; a run still executing and one complete, for the run routes; and, apart from those (so
    that cancelling or retrying them voids no token), one waiting run of an api step per callback route."""
    service.route(HOLD, never())
    api = await server.put_step({"name": "seed-api", "kind": "api", "url": service.url(HOLD)})
    await server.put_step({"name": LEAF, "kind": "api", "url": service.url(HOLD)})
    await server.put_step({"name": "seed-fan", "kind": "parallel", "reducer": "merge", "children": [
        {"step": "seed-api"},
        {"step": "seed-api", "mapper": "(x, ctx) => ({...x, index: ctx.index})"},
        {"step": {"name": "seed-chain", "kind": "sequential", "children": [{"step": "seed-api"}]}},
    ]})
    await server.put_step({"name": "seed-empty", "kind": "sequential"})
    running = await server.start("seed-fan", {"n": 1})
    done = await server.start("seed-empty", {"n": 2})
    waiting = {route: await server.start("seed-api", {"route": route}) for route in CALLBACK_ROUTES}
    calls = {call.run_id: call for call in await service.wait_for_calls(HOLD, 3 + len(waiting))}
    _, tree = await server.call("GET", f"/api/v1/runs/{running}")
    return Seeds(step_id=str(api["id"]), runs=[running, tree["children"][2]["id"], done],
                 tokens={route: str(calls[run].callback_url).rsplit("/", 1)[1] for route, run in waiting.items()})


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    """A real AETR on a SQLite file, started once, serving from its own thread so the synchronous fuzzer can call it."""
    database_url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'aetr.db'}"
    ready: Future[tuple[FuzzServer, asyncio.AbstractEventLoop, asyncio.Event]] = Future()

    async def serve() -> None:
        stop = asyncio.Event()
        async with StepService() as service, running_server(database_url) as server:
            seeds = await seed(server, service)
            ready.set_result((FuzzServer(server.base_url, seeds), asyncio.get_running_loop(), stop))
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            if not ready.done():  # the test thread is waiting for the server: hand it the reason
                ready.set_exception(exc)
                return
            raise

    thread = threading.Thread(target=run, name="aetr-fuzz-server")
    thread.start()
    server, loop, stop = ready.result(timeout=START_TIMEOUT_S)
    _seeds.append(server.seeds)
    try:
        yield server
    finally:
        _seeds.clear()
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=START_TIMEOUT_S)
        assert not thread.is_alive(), "the fuzz server did not stop"


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One connection pool for every fuzzed request."""
    with requests.Session() as session:
        yield session


def seeded_ids(ctx: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    """Offer the seeded run ids, step id and callback token as well as generated ones."""
    if not _seeds or not isinstance(path_parameters, dict) or ctx.operation is None:
        return st.just(path_parameters)
    seeds = _seeds[0]
    token = seeds.tokens.get(ctx.operation.path)
    known = {"run_id": seeds.runs, "name": [seeds.step_id], "token": [token] if token else []}
    options = [st.just(path_parameters)]
    for name, values in known.items():
        if name in path_parameters and values:
            options.append(st.sampled_from(values).map(_replacing(path_parameters, name)))
    return st.one_of(options)


def _replacing(parameters: dict[str, Any], name: str) -> Callable[[str], dict[str, Any]]:
    return lambda value: {**parameters, name: value}


def put_under_its_own_name(_: schemathesis.HookContext, case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """A valid PUT names one step in path and body: align them, and make the tree one the server can store."""
    if (case.method == "PUT" and case.operation.path.endswith("/steps/{name}") and isinstance(case.body, dict)
            and case.path_parameters and case.meta is not None
            and case.meta.generation.mode is schemathesis.GenerationMode.POSITIVE):
        case.body["name"] = case.path_parameters["name"]
        storable(case.body, case.body["name"], iter(range(1, 1_000_000)))
    return case


def storable(step: dict[str, Any], name: str, numbers: Iterator[int]) -> None:
    """Rewrite a schema-valid step tree, in place, into one the server stores: what a JSON Schema cannot state.

    Its scripts become JavaScript that compiles (generated text rarely does), children named by reference name
    the stored leaf (a generated name rarely exists), and inline steps get names of their own (two inline steps
    generated under one name rarely agree, and a reference could close a cycle). Every field the schema does
    state (kinds, numbers, patterns, limits) is left as generated.
    """
    step["name"] = name
    for field, script in (("items", "(input) => []"), ("until", "() => 0")):
        if isinstance(step.get(field), str):
            step[field] = script
    if isinstance(step.get("reducer"), str) and step["reducer"] not in BUILTIN_REDUCERS:
        step["reducer"] = "(outputs) => outputs"
    links = step.get("children") if isinstance(step.get("children"), list) else []
    if isinstance(step.get("child"), dict):
        links = [step["child"]]
    for position, link in enumerate(links):
        if isinstance(link.get("mapper"), str):
            link["mapper"] = "(input) => input"
        if step.get("kind") == "choice" and (link.get("when") is not None or position < len(links) - 1):
            link["when"] = "(input) => true"  # only the last link of a choice may go without a condition
        if isinstance(link.get("step"), str):
            link["step"] = LEAF
        elif isinstance(link.get("step"), dict):
            storable(link["step"], f"{name[:190]}-{next(numbers)}", numbers)


def wait_briefly(_: schemathesis.HookContext, query: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep a valid `?wait=` short: the seeded run never ends, and each wait would hold for its full length."""
    wait = (query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= 60:
        return {**(query or {}), "wait": min(wait, MAX_FUZZ_WAIT_S)}
    return query


HOOKS = {"flatmap_path_parameters": seeded_ids, "map_case": put_under_its_own_name, "map_query": wait_briefly}
for _name, _hook in HOOKS.items():
    schema.hook(_name)(_hook)


@schema.parametrize()
def test_no_request_gets_a_5xx_or_an_answer_its_schema_does_not_declare(
        case: schemathesis.Case[Any], fuzz_server: FuzzServer, http: requests.Session) -> None:
    case.call_and_validate(base_url=fuzz_server.base_url, session=http)


def _answer(response: Any) -> str:
    """A failing case's answer, for the test's message."""
    if response is None:
        return "no answer"
    return f"answered {response.status_code} {response.content[:300]!r}"


def test_sequences_that_follow_the_links_get_the_answers_the_document_declares(fuzz_server: FuzzServer) -> None:
    """Sequences of calls that follow the document's links (a created run to its routes, a stored step to its
    tree, parents and runs), each answer checked with all checks: the stateful phase, run by schemathesis's own
    engine as its command line runs it (a sequence whose replay takes other links, because the first run changed
    the server's state, is not a failure there; under Hypothesis's pytest runner it would be)."""
    stateful = schemathesis.openapi.from_dict(copy.deepcopy(SPEC), config=schemathesis.Config.from_dict({
        **CONFIG, "base-url": fuzz_server.base_url,
        "generation": {**CONFIG["generation"], "max-examples": STATEFUL_SCENARIOS},
        "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}, "fuzzing": {"enabled": False},
                   "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS}}}))
    for name, hook in HOOKS.items():
        stateful.hook(name)(hook)
    problems: list[str] = []
    scenarios = 0
    for event in schemathesis.engine.from_schema(stateful).execute():
        if isinstance(event, schemathesis.engine.events.ScenarioFinished):
            scenarios += 1
            for case_id, checks in event.recorder.checks.items():
                problems += [f"{check.name}: {check.failure_info.failure.title} "
                             f"({event.recorder.cases[case_id].value.operation.label}): "
                             f"{check.failure_info.failure.message[:300]} "
                             f"{_answer(event.recorder.find_response(case_id=case_id))} "
                             f"to {str(event.recorder.cases[case_id].value.body)[:300]}"
                             for check in checks if check.failure_info is not None]
        elif isinstance(event, schemathesis.engine.events.NonFatalError | schemathesis.engine.events.FatalError):
            problems.append(f"{type(event).__name__}: {event.value!r}")
    assert scenarios > 0, "the stateful phase ran no scenario: does the document still declare its links?"
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_fuzzer_uses_the_document_the_server_serves(fuzz_server: FuzzServer, http: requests.Session) -> None:
    served = http.get(f"{fuzz_server.base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert served.status_code == 200 and served.json() == SPEC


# ---- the bad-input classes, one by one, on both backends ----------------------------------------------------------


def nested(depth: int) -> str:
    """JSON text of `depth` nested arrays around a 1."""
    return "[" * depth + "1" + "]" * depth


async def stored(aetr: Server) -> tuple[Any, ...]:
    """Everything a refused request must leave alone: the steps, the runs and every run tree."""
    _, steps = await aetr.call("GET", "/api/v1/steps")
    _, runs = await aetr.call("GET", "/api/v1/runs")
    trees = [(await aetr.call("GET", f"/api/v1/runs/{run['id']}"))[1] for run in runs["runs"]]
    return steps, runs, trees


async def refused(aetr: Server, method: str, path: str, body: bytes | None = None,
                  content_type: str | None = "application/json", headers: dict[str, str] | None = None) -> str:
    """The `detail` of a request that must be refused with 4xx."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    # Without this, aiohttp labels a body application/octet-stream itself.
    skip = () if content_type is not None else ("Content-Type",)
    status, answer = await aetr.call(method, path, data=body, headers=sent, skip_auto_headers=skip)
    assert 400 <= status < 500, f"{method} {path} {body!r:.80}: {status} {answer!r:.300}"
    assert isinstance(answer, dict) and isinstance(answer.get("detail"), str) and answer["detail"], answer
    detail: str = answer["detail"]
    return detail


async def raw_put(aetr: Server, path: str, body: bytes, header: bytes) -> tuple[int, Any]:
    """(status, JSON) of a PUT with one header written byte for byte, as no HTTP client library would send it."""
    address = urlsplit(aetr.base_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(b"PUT " + path.encode() + b" HTTP/1.1\r\nHost: aetr\r\nContent-Type: application/json\r\n"
                     + header + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                     + body)
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.fixture
async def seeded(aetr: Server) -> AsyncIterator[Server]:
    """A server holding a step tree and a run of it that waits, unchanging, for a callback that never comes."""
    async with StepService() as service:
        service.route(HOLD, never())
        await aetr.put_step({"name": "leaf", "kind": "api", "url": service.url(HOLD)})
        await aetr.put_step({"name": "pipe", "kind": "sequential", "children": [{"step": "leaf"}]})
        run_id = await aetr.start("pipe", {"n": 1})
        await service.wait_for_calls(HOLD, 1)
        # The step service has seen the call, but the engine records its 202 a moment later: wait for that, or a
        # test's "before" could be read without it and its "after" with it.
        deadline = asyncio.get_running_loop().time() + 10.0
        while True:
            status, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
            assert status == 200, events
            if any(e["kind"] == "dispatch" for e in events):
                break
            assert asyncio.get_running_loop().time() < deadline, f"the call's 202 was never recorded: {events}"
            await asyncio.sleep(0.02)
        yield aetr


async def test_malformed_json_is_refused_and_changes_nothing(seeded: Server) -> None:
    before = await stored(seeded)
    for body in (b'{"step": "pipe"', b'{"step": "pipe",}', b"{step: 'pipe'}", b"\xff\xfe{}", b"{} {}"):
        for method, path in (("POST", "/api/v1/runs"), ("PUT", "/api/v1/steps/pipe"),
                             ("POST", "/api/v1/sandbox/evaluate")):
            detail = await refused(seeded, method, path, body)
            assert "not valid JSON" in detail
    assert await stored(seeded) == before


async def test_a_body_sent_as_something_other_than_json_is_refused_with_415(seeded: Server) -> None:
    before = await stored(seeded)
    body = b'{"step": "pipe"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream", None):
        detail = await refused(seeded, "POST", "/api/v1/runs", body, content_type)
        assert "Content-Type: application/json" in detail
    status, _ = await seeded.call("POST", "/api/v1/runs", data=body, headers={"Content-Type": "text/plain"})
    assert status == 415
    assert await stored(seeded) == before


async def test_a_body_that_is_not_an_object_is_refused(seeded: Server) -> None:
    before = await stored(seeded)
    for body in (b"[]", b'[{"step": "pipe"}]', b'"pipe"', b"1", b"null", b"true"):
        for method, path in (("POST", "/api/v1/runs"), ("PUT", "/api/v1/steps/pipe"),
                             ("POST", "/api/v1/sandbox/evaluate")):
            assert "JSON object" in await refused(seeded, method, path, body)
    assert await stored(seeded) == before


async def test_a_run_input_json_cannot_carry_is_refused_and_says_where(seeded: Server) -> None:
    before = await stored(seeded)
    cases = {
        '{"big": [1, 18446744073709551616]}': '["big"][1] does not fit in 64 bits',
        "-9223372036854775809": "does not fit in 64 bits",
        "123456789012345678901234567890": "does not fit in 64 bits",
        "1e400": "Infinity",
        "NaN": "NaN",
        '{"x": -Infinity}': '["x"]',
        nested(MAX_JSON_DEPTH + 1): f"deeper than {MAX_JSON_DEPTH} levels",
        nested(100_000): "nests too deeply",
        '"\\ud800"': "surrogate",
        '{"\\udfff": 1}': "surrogate",
    }
    for run_input, expected in cases.items():
        body = f'{{"step": "pipe", "input": {run_input}}}'.encode()
        detail = await refused(seeded, "POST", "/api/v1/runs", body)
        assert expected in detail, (run_input[:40], detail)
        if run_input != nested(100_000):
            assert detail.startswith("input: "), detail
        evaluated = f'{{"source": "(x) => 1", "input": {run_input}}}'.encode()
        assert expected in await refused(seeded, "POST", "/api/v1/sandbox/evaluate", evaluated)
    assert await stored(seeded) == before


async def test_the_largest_inputs_that_fit_are_kept_exactly(seeded: Server) -> None:
    for run_input in ("18446744073709551615", "-9223372036854775808", "1.7976931348623157e308", nested(MAX_JSON_DEPTH)):
        body = f'{{"step": "pipe", "input": {run_input}}}'.encode()
        status, run = await seeded.call("POST", "/api/v1/runs", data=body,
                                        headers={"Content-Type": "application/json"})
        assert status == 201, run
        _, again = await seeded.call("GET", f"/api/v1/runs/{run['id']}")
        assert again["input"] == run["input"] and str(again["input"]) == str(run["input"])


async def test_unknown_names_and_ids_in_paths_are_404(seeded: Server) -> None:
    before = await stored(seeded)
    ghost = str(uuid.uuid4())
    for method, path in (("GET", "/api/v1/steps/ghost"), ("GET", f"/api/v1/steps/{ghost}"),
                         ("GET", "/api/v1/steps/ghost/parents"), ("DELETE", "/api/v1/steps/ghost"),
                         ("GET", f"/api/v1/runs/{ghost}"), ("GET", f"/api/v1/runs/{ghost}/events"),
                         ("POST", f"/api/v1/runs/{ghost}/cancel"), ("POST", f"/api/v1/runs/{ghost}/retry"),
                         ("POST", "/api/v1/callbacks/not-a-token"), ("POST", "/api/v1/callbacks/not-a-token/fail"),
                         ("POST", "/api/v1/callbacks/not-a-token/heartbeat")):
        status, answer = await seeded.call(method, path)
        assert status == 404 and isinstance(answer["detail"], str), (method, path, status, answer)
    assert "ghost" in await refused(seeded, "POST", "/api/v1/runs", b'{"step": "ghost"}')
    assert await stored(seeded) == before


async def test_run_ids_that_are_not_uuids_are_404_and_say_ids_are_uuids(seeded: Server) -> None:
    before = await stored(seeded)
    for run_id in ("not-a-uuid", "123", "%00", "'%20OR%201=1--", "%C3%A9", "0" * 5000):
        for method, suffix in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("POST", "/retry")):
            status, answer = await seeded.call(method, f"/api/v1/runs/{run_id}{suffix}")
            assert status == 404 and "UUID" in answer["detail"], (run_id[:20], suffix, status, answer)
    assert await stored(seeded) == before


async def test_step_names_with_odd_characters_are_refused(seeded: Server) -> None:
    before = await stored(seeded)
    odd = ("a%2Fb", "%C3%A9t%C3%A9", "%F0%9F%98%80", "%00", "a%20b", "..%2F..", "%ED%A0%80", "a" * 201)
    for name in odd:
        for method, path in (("GET", f"/api/v1/steps/{name}"), ("GET", f"/api/v1/steps/{name}/parents"),
                             ("DELETE", f"/api/v1/steps/{name}")):
            await refused(seeded, method, path)
        body = b'{"name": "x", "kind": "sequential"}'
        await refused(seeded, "PUT", f"/api/v1/steps/{name}", body)
        await refused(seeded, "GET", f"/api/v1/runs?step={name}")
    for name in ("été", "a/b", "a\u0000b", "a b", ""):
        detail = await refused(seeded, "POST", "/api/v1/runs", json.dumps({"step": name}).encode())
        assert detail.startswith("step: "), detail
        tree = {"name": "x", "kind": "sequential", "children": [{"step": name}]}
        detail = await refused(seeded, "PUT", "/api/v1/steps/x", json.dumps(tree).encode())
        assert "children.0.step" in detail, detail
    detail = await refused(seeded, "GET", "/api/v1/steps/%C3%A9")
    assert "letters, digits" in detail
    assert await stored(seeded) == before


async def test_step_fields_a_call_could_not_carry_are_refused(seeded: Server) -> None:
    before = await stored(seeded)
    api = '"name": "leaf", "kind": "api"'
    for fields, expected in (
        ('"url": "http://h/a b"', "spaces"),
        ('"url": "http://h/\\u0000"', "control"),
        ('"url": "http://h/", "headers": {"X-A": "1\\u0000"}', "control characters"),
        ('"url": "http://h/", "headers": {"X-A": "1\\r\\nX-B: 2"}', "control characters"),
        ('"url": "http://h/", "headers": {"X A": "1"}', "headers"),
        ('"url": "http://h/", "timeout_s": NaN', "timeout_s"),
        ('"url": "http://h/", "retry": [3]', "retry: must be a JSON object"),
    ):
        detail = await refused(seeded, "PUT", "/api/v1/steps/leaf", f"{{{api}, {fields}}}".encode())
        assert expected in detail, (fields, detail)
    mapper = b'{"name": "pipe", "kind": "sequential", "children": [{"step": "leaf", "mapper": "(x) => x\\u0000"}]}'
    assert "NUL" in await refused(seeded, "PUT", "/api/v1/steps/pipe", mapper)
    for tag in ("abc", "-1", "1.5", "9" * 19, "1" * 5000):
        detail = await refused(seeded, "PUT", "/api/v1/steps/pipe", b'{"name": "pipe", "kind": "sequential"}',
                               headers={"If-Match": tag})
        assert "If-Match" in detail
    # A Latin-1 digit such as "²" passes str.isdigit() but not int(); aiohttp would send it as UTF-8, so write it raw.
    status, answer = await raw_put(seeded, "/api/v1/steps/pipe", b'{"name": "pipe", "kind": "sequential"}',
                                   b"If-Match: \xb2")
    assert status == 400 and "If-Match" in answer["detail"]
    assert await stored(seeded) == before


async def test_a_step_tree_nested_deeper_than_the_limit_is_refused(seeded: Server) -> None:
    before = await stored(seeded)
    step: dict[str, Any] = {"name": "bottom", "kind": "sequential", "children": [{"step": "leaf"}]}
    for level in range(MAX_TREE_DEPTH, 0, -1):
        step = {"name": f"level{level}", "kind": "sequential", "children": [{"step": step}]}
    # Sent as json.dumps text: orjson, which Server.call uses, refuses to encode this depth itself.
    detail = await refused(seeded, "PUT", "/api/v1/steps/level1", json.dumps(step).encode())
    assert f"at most {MAX_TREE_DEPTH}" in detail
    assert await stored(seeded) == before


async def test_list_parameters_that_could_reach_the_database_oddly_are_refused(seeded: Server) -> None:
    before = await stored(seeded)
    forged = [["0001-01-01T00:00:00+14:00", "x"], ["9999-12-31T23:59:59-14:00", "x"],
              ["2020-01-01T00:00:00", "a\u0000"], ["2020-01-01", 5], [1, 2], {"at": "2020-01-01"}]
    cursors = [base64.urlsafe_b64encode(json.dumps(c).encode()).decode() for c in forged]
    not_ours = ["garbage", "1.abc", "12345678901234567.0123456789abcdef0123456789abcdef",
                "1.0123456789ABCDEF0123456789ABCDEF", "-1.0123456789abcdef0123456789abcdef"]
    for query in [*(f"cursor={c}" for c in not_ours + cursors), "limit=0", "limit=99999999999999999999",
                  "state=bogus", "step=%00", "step=%C3%A9"]:
        await refused(seeded, "GET", f"/api/v1/runs?{query}")
    assert await stored(seeded) == before


async def test_any_cursor_of_the_documented_form_starts_a_page_there(seeded: Server) -> None:
    """A cursor is a time and an id: one that no page gave is still a place to start from, not an error."""
    _, everything = await seeded.call("GET", "/api/v1/runs")
    (run,) = everything["runs"]
    for cursor, shown in (("0.00000000000000000000000000000000", []),  # 1970: nothing is older
                          ("9999999999999999.ffffffffffffffffffffffffffffffff", [run["id"]])):  # 2286: all is
        status, page = await seeded.call("GET", f"/api/v1/runs?cursor={cursor}")
        assert status == 200 and [r["id"] for r in page["runs"]] == shown and page["next_cursor"] is None, page


async def test_a_callback_output_too_deep_to_keep_is_refused_and_the_node_waits_on(aetr: Server) -> None:
    async with StepService() as service:
        service.route(HOLD, never())
        await aetr.put_step({"name": "leaf", "kind": "api", "url": service.url(HOLD)})
        run_id = await aetr.start("leaf")
        (call,) = await service.wait_for_calls(HOLD, 1)
        callback = str(call.callback_url).removeprefix(aetr.base_url)
        before = await stored(aetr)
        detail = await refused(aetr, "POST", callback, nested(MAX_JSON_DEPTH + 1).encode())
        assert detail.startswith("output: ") and "nothing was changed" in detail
        assert '{"error": "...", "retryable": false}' in await refused(aetr, "POST", callback + "/fail", b'["oops"]')
        assert await stored(aetr) == before
        status, answer = await aetr.call("POST", callback, {"ok": True})
        assert (status, answer) == (200, {"accepted": True})
        assert (await aetr.wait_run(run_id))["output"] == {"ok": True}


async def test_a_script_result_json_cannot_carry_is_a_script_failure_not_a_500(aetr: Server) -> None:
    for source in ("() => { let v = 1; for (let i = 0; i < 300; i++) v = [v]; return v; }", "() => '\\ud800'"):
        status, answer = await aetr.call("POST", "/api/v1/sandbox/evaluate", {"source": source})
        assert status == 200 and answer["ok"] is False and answer["error"]["kind"] == "not_json", answer


async def test_unknown_routes_and_methods_say_what_is_wrong(aetr: Server) -> None:
    assert "no route matches GET /api/v1/nothing" in await refused(aetr, "GET", "/api/v1/nothing")
    detail = await refused(aetr, "PATCH", "/api/v1/steps/x")
    assert "PATCH is not allowed" in detail and "PUT" in detail


# ---- limits enforced below the API: the store (tree depth) and the coordinator (script results) ---------


async def test_a_tree_made_too_deep_through_stored_children_is_refused(aetr: Server) -> None:
    def chain(top: str, levels: int, bottom: dict[str, Any]) -> dict[str, Any]:
        step = bottom
        for level in range(levels, 0, -1):
            step = {"name": f"{top}{level}", "kind": "sequential", "children": [{"step": step}]}
        return step

    # Sent as json.dumps text: orjson, which Server.call uses, refuses to encode these depths itself.
    inner = chain("inner", MAX_TREE_DEPTH - 4, {"name": "bottom", "kind": "sequential"})
    status, _ = await aetr.call("PUT", "/api/v1/steps/inner1", data=json.dumps(inner).encode(),
                                headers={"Content-Type": "application/json"})
    assert status == 201
    before = await stored(aetr)
    joint = {"name": "joint", "kind": "sequential", "children": [{"step": "inner1"}]}
    outer = chain("outer", MAX_TREE_DEPTH // 2, joint)
    await refused(aetr, "PUT", "/api/v1/steps/outer1", json.dumps(outer).encode())
    assert await stored(aetr) == before


async def test_a_first_mapper_whose_result_cannot_be_stored_fails_its_node_not_the_request(aetr: Server) -> None:
    async with StepService() as service:
        service.route(HOLD, never())
        await aetr.put_step({"name": "leaf", "kind": "api", "url": service.url(HOLD)})
        await aetr.put_step({"name": "pipe", "kind": "sequential", "children": [
            {"step": "leaf", "mapper": "() => { let v = 1; for (let i = 0; i < 300; i++) v = [v]; return v; }"}]})
        status, run = await aetr.call("POST", "/api/v1/runs", {"step": "pipe"})
        assert status == 201, run
        ended = await aetr.wait_run(run["id"])
        assert ended["state"] == "error" and ended["children"][0]["error"]["kind"] == "mapper"
