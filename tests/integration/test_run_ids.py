"""Runs found by the start of their id (`GET /runs?id_prefix=`), as `aetr runs show 01a23b` needs them."""

from __future__ import annotations

from aetr.domain.ids import normal_prefix, prefix_bounds
from tests.integration.conftest import Server


def common_start(ids: list[str]) -> str:
    """The characters every id starts with."""
    first, last = min(ids), max(ids)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


async def runs_with_prefix(aetr: Server, prefix: str) -> list[str]:
    status, page = await aetr.call("GET", "/api/v1/runs", params={"id_prefix": prefix})
    assert status == 200, page
    return [run["id"] for run in page["runs"]]


async def test_a_prefix_finds_the_runs_whose_id_starts_with_it_and_no_other(aetr: Server) -> None:
    await aetr.put_step({"name": "e", "kind": "sequential", "children": [
        {"step": {"name": "inner", "kind": "sequential"}}]})
    ids = [await aetr.start("e", i) for i in range(4)]
    shared = common_start(ids)
    assert len(shared.replace("-", "")) >= 4  # made within minutes of each other

    # Ordered by id, newest first: by the millisecond each run was made, then (two runs made in the same
    # millisecond, as quick starts are) by the id's random digits. Children never.
    assert await runs_with_prefix(aetr, shared) == sorted(ids, reverse=True)
    assert [i[:13] for i in sorted(ids, reverse=True)] == [i[:13] for i in reversed(ids)]
    for run_id in ids:
        own = run_id[:23]  # past the millisecond, into the random digits
        assert await runs_with_prefix(aetr, own) == [run_id]
        # Hyphens may be left out, and capitals are the same digits.
        assert await runs_with_prefix(aetr, own.replace("-", "").upper()) == [run_id]
        assert await runs_with_prefix(aetr, run_id) == [run_id]
    # The next prefix up and the one below match nothing: the range is exactly the prefix's.
    low, high = prefix_bounds(normal_prefix(ids[0][:23]) or "")
    assert low == ids[0][:23] and high is not None and high > ids[0]
    assert ids[0] not in await runs_with_prefix(aetr, high)
    assert await runs_with_prefix(aetr, "ffff") == []
    assert await runs_with_prefix(aetr, "0000") == []


async def test_a_prefix_combines_with_the_other_filters_and_pages(aetr: Server) -> None:
    await aetr.put_step({"name": "a", "kind": "sequential"})
    await aetr.put_step({"name": "b", "kind": "sequential"})
    ids = [await aetr.start("a"), await aetr.start("b"), await aetr.start("a")]
    shared = common_start(ids)
    status, page = await aetr.call("GET", "/api/v1/runs", params={"id_prefix": shared, "step": "a", "limit": "1"})
    assert status == 200 and [r["id"] for r in page["runs"]] == [ids[2]], page
    status, page = await aetr.call("GET", "/api/v1/runs", params={
        "id_prefix": shared, "step": "a", "limit": "1", "cursor": page["next_cursor"]})
    assert status == 200 and [r["id"] for r in page["runs"]] == [ids[0]] and page["next_cursor"] is None, page


async def test_a_prefix_that_is_too_short_or_not_hex_is_refused_with_422(aetr: Server) -> None:
    for bad in ("", "abc", "01a-", "01az", "01a23b06 ", "x" * 40, "0" * 33, "%00%00%00%00"):
        status, body = await aetr.call("GET", f"/api/v1/runs?id_prefix={bad}")
        assert status == 422, (bad, body)
        assert body["detail"].startswith("query.id_prefix: "), body
    status, body = await aetr.call("GET", "/api/v1/runs?id_prefix=abc")
    assert "4 to 32 of its hex digits" in body["detail"], body
