"""The tutorial's catalog step services: ingest, normalize, images, metadata, index (callback mode)."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from aetr.domain.ids import RUN_TIME_CHARS
from aetr.testing import Behaviour, StepRequest, StepService

__all__ = [
    "EXAMPLE_PORT",
    "SERVICES",
    "ExampleService",
    "StepInputError",
    "build_example_services",
    "images",
    "index",
    "ingest",
    "metadata",
    "normalize",
    "run_example_services",
]

EXAMPLE_PORT: Final = 8001
IMAGE_BASE_URL: Final = "https://images.example.com"
NOUNS: Final = ("widget", "gadget", "gizmo", "sprocket", "doohickey")
CATEGORIES: Final = ("tools", "garden", "kitchen", "toys")
MAX_ITEMS: Final = 100
LOG_INPUT_CHARS: Final = 80


class StepInputError(ValueError):
    """The input of an example service is not the shape it documents."""


def _object(value: Any, step: str, shape: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StepInputError(f"{step} expects {shape}; got {_short(value)}")
    return value


def _products(value: dict[str, Any], step: str, shape: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    products = value.get("products")
    if not isinstance(products, list) or not all(isinstance(p, dict) and all(f in p for f in fields) for p in products):
        raise StepInputError(f"{step} expects {shape}; got {_short(value)}")
    return products


def ingest(input: Any) -> dict[str, Any]:
    """`{"source": "acme", "count": 3}` → the raw items of that source: `{"source", "items": [...]}`."""
    shape = '{"source": "<name>", "count": <1-100, default 3>}'
    data = _object(input, "ingest", shape)
    source, count = data.get("source", "demo"), data.get("count", 3)
    if not isinstance(source, str) or not source:
        raise StepInputError(f"ingest expects {shape}; got source {_short(source)}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_ITEMS:
        raise StepInputError(f"ingest expects {shape}; got count {_short(count)}")
    items = [
        {
            "id": f"sku-{i}",
            # Untidy on purpose: `normalize` has something to do.
            "name": f"  {source} {NOUNS[(i - 1) % len(NOUNS)]}  ",
            "price": f"{Decimal('4.99') + 5 * i}",
            "currency": "usd",
        }
        for i in range(1, count + 1)
    ]
    return {"source": source, "items": items}


def normalize(input: Any) -> dict[str, Any]:
    """`{"source", "products": [{sku, title, price, currency}]}` → tidy titles, prices in cents."""
    shape = '{"source": ..., "products": [{"sku", "title", "price", "currency"}]}'
    data = _object(input, "normalize", shape)
    products = []
    for raw in _products(data, "normalize", shape, ("sku", "title", "price", "currency")):
        try:
            cents = int((Decimal(str(raw["price"])) * 100).to_integral_value())
        except InvalidOperation:
            raise StepInputError(f"normalize: price {raw['price']!r} of {raw['sku']} is not a number") from None
        products.append(
            {
                "sku": raw["sku"],
                "title": " ".join(str(raw["title"]).split()).title(),
                "price_cents": cents,
                "currency": str(raw["currency"]).upper(),
            }
        )
    return {"source": data.get("source"), "products": products}


def images(input: Any) -> dict[str, Any]:
    """Normalized products → `{"images": {sku: image url}}`."""
    shape = '{"source": ..., "products": [{"sku", ...}]}'
    data = _object(input, "images", shape)
    source = data.get("source") or "demo"
    return {
        "images": {
            p["sku"]: f"{IMAGE_BASE_URL}/{source}/{p['sku']}.jpg" for p in _products(data, "images", shape, ("sku",))
        }
    }


def metadata(input: Any) -> dict[str, Any]:
    """Normalized products → the same products with a `category` and `tags`."""
    shape = '{"source": ..., "products": [{"sku", ...}]}'
    data = _object(input, "metadata", shape)
    products = []
    for product in _products(data, "metadata", shape, ("sku",)):
        # crc32, not hash(): the category of a sku must not change between processes.
        category = CATEGORIES[zlib.crc32(str(product["sku"]).encode()) % len(CATEGORIES)]
        tags = [t for t in (data.get("source"), category) if isinstance(t, str)]
        products.append({**product, "category": category, "tags": tags})
    return {"source": data.get("source"), "products": products}


def index(input: Any) -> dict[str, Any]:
    """Enriched products and images → the search documents written to `catalog-<source>`."""
    shape = '{"source": ..., "products": [{"sku", "title", ...}], "images": {sku: url}}'
    data = _object(input, "index", shape)
    found = data.get("images")
    image_of = found if isinstance(found, dict) else {}
    documents = [
        {
            "sku": p["sku"],
            "title": p["title"],
            "price_cents": p.get("price_cents"),
            "currency": p.get("currency"),
            "category": p.get("category"),
            "image": image_of.get(p["sku"]),
        }
        for p in _products(data, "index", shape, ("sku", "title"))
    ]
    return {
        "index": f"catalog-{data.get('source') or 'demo'}",
        "indexed": len(documents),
        "documents": documents,
    }


@dataclass(frozen=True, slots=True)
class ExampleService:
    """One example step service: its path, what it computes, and how long it "works" before calling back."""

    path: str
    fn: Callable[[Any], dict[str, Any]]
    delay_s: float


SERVICES: Final = (
    ExampleService("/ingest", ingest, 0.5),
    ExampleService("/normalize", normalize, 0.2),
    ExampleService("/images", images, 0.4),
    ExampleService("/metadata", metadata, 0.3),
    ExampleService("/index", index, 0.3),
)


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= LOG_INPUT_CHARS else text[: LOG_INPUT_CHARS - 1] + "…"


def _behaviour(service: ExampleService, log: Callable[[str], None]) -> Behaviour:
    """Answer 202, then call back with service.fn(input) after its delay; log the call and any trouble."""
    name = service.path.lstrip("/")

    async def call_back(request: StepRequest) -> None:
        await asyncio.sleep(service.delay_s)
        try:
            try:
                output = service.fn(request.input)
            except Exception as exc:
                # A bad input is the caller's mistake: report it as a failure that a retry would not fix.
                error = str(exc) if isinstance(exc, StepInputError) else f"{type(exc).__name__}: {exc}"
                answer = await request.send_failure(error, retryable=False)
                log(f"{_clock()} {name:<9} failed: {error} (AETR answered {answer.status})")
                return
            answer = await request.send_output(output)
        except aiohttp.ClientError as exc:
            log(f"{_clock()} {name:<9} cannot call back {request.call.callback_url}: {exc}")
            return
        if answer.status != 200:
            log(f"{_clock()} {name:<9} callback refused: AETR answered {answer.status} {_short(answer.json)}")

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        call = request.call
        # The millisecond the run was made tells runs apart where their first 8 characters, its minute, do not;
        # `aetr runs show` takes it as it is.
        run = (call.run_id or "-")[:RUN_TIME_CHARS]
        log(f"{_clock()} {name:<9} run {run} attempt {call.attempt or '-'} input {_short(call.json)}")
        if call.callback_url is None:
            detail = "no AETR-Callback header: this example service is called by AETR, in callback mode"
            return web.Response(status=400, body=orjson.dumps({"detail": detail}), content_type="application/json")
        request.later(call_back(request))
        return web.Response(status=202)

    return behaviour


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _print(line: str) -> None:
    print(line, flush=True)


def build_example_services(
    host: str = "127.0.0.1", port: int = EXAMPLE_PORT, *, log: Callable[[str], None] = _print
) -> StepService:
    """A StepService (not yet started) serving every example service, logging each call with `log`."""
    # Not recording: this server may run for the whole tutorial, and nobody reads the history.
    service = StepService(host, port, record=False)
    for example in SERVICES:
        service.route(example.path, _behaviour(example, log))
    return service


async def run_example_services(
    host: str = "127.0.0.1", port: int = EXAMPLE_PORT, *, log: Callable[[str], None] = _print
) -> None:
    """Serve the example step services until cancelled (Ctrl-C)."""
    async with build_example_services(host, port, log=log) as service:
        paths = " ".join(example.path for example in SERVICES)
        log(f"example step services listening on {service.base_url}: {paths} (Ctrl-C stops)")
        await asyncio.Event().wait()
