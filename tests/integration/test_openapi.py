"""The OpenAPI document: the committed copy is the one the server serves, and the methods it lists are the ones
`Allow` names."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aetr.api.openapi import DOCUMENT_PATH, document_text, main
from tests.integration.conftest import Server, running_server

ROUTES = {
    "/api/v1/runs": "GET, POST, OPTIONS",
    "/api/v1/runs/01a23b06-0000-7000-8000-000000000000": "GET, DELETE, OPTIONS",
    "/api/v1/retention/purge": "POST, OPTIONS",
    "/api/v1/runs/01a23b06-0000-7000-8000-000000000000/cancel": "POST, OPTIONS",
    "/api/v1/steps": "GET, OPTIONS",
    "/api/v1/steps/some-step": "GET, PUT, DELETE, OPTIONS",
    "/api/v1/callbacks/some-token": "POST, OPTIONS",
    "/healthz": "GET, OPTIONS",
}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """The document and the routing do not depend on the database: SQLite only."""
    async with running_server(f"sqlite:///{tmp_path / 'aetr.db'}") as aetr:
        yield aetr


async def test_the_committed_document_is_the_one_the_server_serves(server: Server) -> None:
    status, served = await server.call("GET", "/openapi.json")
    assert status == 200
    committed = DOCUMENT_PATH.read_text(encoding="utf-8")
    assert json.loads(committed) == served and committed == document_text(served), (
        f"{DOCUMENT_PATH.name} differs from the server's /openapi.json: regenerate it with "
        "`python -m aetr.api.openapi` and commit the result")


def test_the_regeneration_command_writes_the_committed_document(tmp_path: Path) -> None:
    written = tmp_path / "openapi.json"
    assert main([str(written)]) == 0
    assert written.read_text(encoding="utf-8") == DOCUMENT_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize(("path", "allowed"), ROUTES.items())
async def test_options_names_every_method_the_path_serves(server: Server, path: str, allowed: str) -> None:
    async with server.http.options(server.base_url + path) as answer:
        assert (answer.status, answer.headers.get("Allow")) == (204, allowed)


@pytest.mark.parametrize(("path", "allowed"), ROUTES.items())
async def test_a_method_the_path_does_not_serve_is_405_naming_every_method_it_does(
        server: Server, path: str, allowed: str) -> None:
    async with server.http.request("PATCH", server.base_url + path) as answer:
        assert (answer.status, answer.headers.get("Allow")) == (405, allowed)
        assert f"use {allowed}" in (await answer.json())["detail"]
