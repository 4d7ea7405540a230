"""Ready-made behaviours for `StepService.route`: how a fake step answers, and how it calls back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from aetr.testing.step_service import CALLBACK_HEADER, CALLBACK_QUERY, Behaviour, StepRequest, call_fn

__all__ = ["callback", "callback_before_answer", "fail", "never", "sequence", "status", "sync"]

StepFn = Callable[[Any], Any]  # input -> output, sync or async


def _accepted() -> web.Response:
    return web.Response(status=202)


def _no_callback_url(request: StepRequest) -> web.Response | None:
    """A 400 when AETR gave no callback URL, so a misconfigured step fails at once and says why."""
    if request.call.callback_url is not None:
        return None
    detail = f"no {CALLBACK_HEADER} header nor ?{CALLBACK_QUERY}= query parameter: cannot call back"
    return web.Response(status=400, body=orjson.dumps({"detail": detail}), content_type="application/json")


async def _output_or_failure(request: StepRequest, fn: StepFn) -> None:
    """Send fn(input) as the output, or a non-retryable failure naming the exception fn raised."""
    try:
        output = await call_fn(fn, request.input)
    except Exception as exc:
        await request.send_failure(f"{type(exc).__name__}: {exc}", retryable=False)
        return
    await request.send_output(output)


def callback(fn: StepFn, delay: float = 0.0) -> Behaviour:
    """Answer 202, then after `delay` seconds POST fn(input) to the callback URL (or /fail if fn raises)."""

    async def later(request: StepRequest) -> None:
        await asyncio.sleep(delay)
        await _output_or_failure(request, fn)

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        if (refused := _no_callback_url(request)) is not None:
            return refused
        request.later(later(request))
        return _accepted()

    return behaviour


def callback_before_answer(fn: StepFn) -> Behaviour:
    """POST fn(input) to the callback URL, wait for AETR's answer, and only then answer 202."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        if (refused := _no_callback_url(request)) is not None:
            return refused
        await _output_or_failure(request, fn)
        return _accepted()

    return behaviour


def sync(fn: StepFn) -> Behaviour:
    """Answer 200 with fn(input) as the JSON body (a `mode: sync` step); 500 if fn raises."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        output = await call_fn(fn, request.input)
        return web.Response(status=200, body=orjson.dumps(output), content_type="application/json")

    return behaviour


def fail(error: str, retryable: bool = False, delay: float = 0.0) -> Behaviour:
    """Answer 202, then after `delay` seconds POST `{"error", "retryable"}` to `<callback>/fail`."""

    async def later(request: StepRequest) -> None:
        await asyncio.sleep(delay)
        await request.send_failure(error, retryable)

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        if (refused := _no_callback_url(request)) is not None:
            return refused
        request.later(later(request))
        return _accepted()

    return behaviour


def status(code: int, body: Any = None) -> Behaviour:
    """Answer with HTTP status `code`, and `body` as JSON when given; never call back."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        if body is None:
            return web.Response(status=code)
        return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")

    return behaviour


def never() -> Behaviour:
    """Answer 202 and never call back (for deadlines, heartbeats and cancellation)."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        return _accepted()

    return behaviour


def sequence(*behaviours: Behaviour) -> Behaviour:
    """Use the k-th behaviour for the k-th request, the last one from then on (e.g. a 503, then success)."""
    if not behaviours:
        raise ValueError("sequence() needs at least one behaviour")
    served = 0

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        nonlocal served
        chosen = behaviours[min(served, len(behaviours) - 1)]
        served += 1
        return await chosen(request)

    return behaviour
