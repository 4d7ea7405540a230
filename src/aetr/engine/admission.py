"""Admission of run starts: a few are handled at once, a bounded number wait for a place, the rest are refused.

A start inserts a whole run, and a burst of them would otherwise fill every turn of the event loop, so that a
step's callback (or a heartbeat, or /healthz) arriving meanwhile waited behind all of them. Starts that wait
for a place cost nothing but a parked coroutine; callbacks never pass through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StartsFull(Exception):
    """As many starts wait for a place as may: this one is refused, and nothing was changed."""


class StartGate:
    """Lets `at_once` starts through at a time, keeps at most `max_waiting` waiting, refuses the others."""

    def __init__(self, max_waiting: int, at_once: int) -> None:
        self.max_waiting = max_waiting
        self.at_once = at_once
        self.waiting = 0  # starts waiting for a place now
        self._places = asyncio.Semaphore(at_once)

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for one start (waiting for it first if all are taken); StartsFull when the queue is full."""
        if self._places.locked():
            if self.waiting >= self.max_waiting:
                raise StartsFull(f"{self.waiting} starts are waiting already")
            self.waiting += 1
            try:
                await self._places.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._places.acquire()
        try:
            yield
        finally:
            self._places.release()
