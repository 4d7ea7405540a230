"""The callback window: a process makes new step calls only while few of its recent ones have yet to call back.

A step that answers its call at once and calls back soon after brings its callback back as fast as the calls
go out. Made as soon as they are due, a burst of such calls comes back as a burst of callbacks, more than the
process can answer at once, and each callback then waits behind all the others: a step service with a
client time-out of a second sends it again. The window keeps that queue short and lets calls wait instead (in
the process, their work rows leased, before any time-out of theirs starts), so that callbacks are answered
first.

A callback-mode call holds a place in the window from when it is made until its callback is answered, its
call fails, or `HOLD_S` passes (a long-running step stops counting then: only quick steps come back in the
same burst). The window's size follows how long callbacks take to answer, measured in the process from the
handler's start to its answer, averaged over each `TICK_S`:

- above the target, the window shrinks by a tenth (never below `MIN_SIZE`);
- under 0.7 of it while calls wait for a place, it grows by an eighth, and by half under half of it (a fan-out
  of quick steps reaches the few hundred calls in flight it needs within a few ticks);
- in a tick with calls waiting and no callback answered here, it grows by half: nothing says the process is
  behind (the steps are slow, or their callbacks land on another process of the same port);
- the target is `target_s` (AETR_CALLBACK_TARGET_MS), or twice the quickest average seen lately when the
  database alone is slower than that: a slow disk is not a queue, and a smaller window would not speed it up.

Calls waiting for a place cost a parked coroutine each; their work rows stay leased (the worker renews the
lease), and a call made more than a second after it was due has its deadlines count from the call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Final

from aetr.engine import metrics
from aetr.engine.background import Background

TICK_S: Final = 0.05  # seconds between two judgements of the window's size
HOLD_S: Final = 0.2  # seconds a call counts in the window at most
MIN_SIZE: Final = 8  # places the window keeps however slow callbacks are: calls never stop
START_SIZE: Final = 32
GROW: Final = 1 / 8  # of the size, added after a tick with callbacks under 0.7 of the target and calls waiting
GROW_FAST: Final = 1 / 2  # added instead when callbacks took under half the target, or none was answered
MAX_SIZE: Final = 65536  # a bound for the arithmetic only: calls in flight are bounded by AETR_MAX_IN_FLIGHT
SHRINK: Final = 0.9  # of the size, kept after a tick with slow callbacks
BASELINE_WINDOWS: Final = 200  # judgements (10 s) over which the quickest average is remembered

Key = tuple[str, int]  # (node id, attempt)


class CallbackWindow:
    """At most `size` recent callback-mode calls without their callback; the others wait (see the module)."""

    def __init__(self, target_s: float, max_size: int = MAX_SIZE, *, size: int = START_SIZE,
                 hold_s: float = HOLD_S, min_size: int = MIN_SIZE) -> None:
        self.target_s = target_s
        self.hold_s = hold_s
        self.min_size = min(min_size, size)
        self.max_size = max(self.min_size, max_size)
        self.size = min(size, self.max_size)
        self._out: dict[Key, float] = {}  # calls in the window: when each stops counting
        self._waiting: collections.deque[tuple[asyncio.Future[None], Key]] = collections.deque()
        self._answered = 0  # callbacks answered since the last judgement
        self._answer_s = 0.0  # the time they took, in all
        self._quickest: collections.deque[float] = collections.deque(maxlen=BASELINE_WINDOWS)
        self._judging = Background("aetr-callback-window")
        self.waited = 0  # calls that waited for a place, since the start

    @property
    def outstanding(self) -> int:
        """Calls in the window now."""
        return len(self._out)

    @property
    def queued(self) -> int:
        """Calls waiting for a place now."""
        return len(self._waiting)

    def start(self) -> None:
        """Start judging the window's size (and freeing places whose time is up)."""
        self._judging.start(self._judge_every_tick)

    async def stop(self) -> None:
        """Stop judging; calls still waiting are not made (their leases expire, and whoever runs next makes them)."""
        await self._judging.stop()
        while self._waiting:
            fut, _ = self._waiting.popleft()
            fut.cancel()

    async def enter(self, key: Key) -> None:
        """Return once the call `key` has a place in the window (at once while there is room)."""
        if not self._waiting and len(self._out) < self.size:
            self._out[key] = time.monotonic() + self.hold_s
            return
        self.waited += 1
        metrics.WINDOW_WAITS.inc()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((fut, key))
        try:
            await fut
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiting.remove((fut, key))
            self.leave(key)
            raise

    def leave(self, key: Key) -> None:
        """The call `key` is over (it failed, or its callback came): its place goes to the next waiting call."""
        if self._out.pop(key, None) is not None:
            self._admit()

    def answered(self, key: Key, seconds: float) -> None:
        """The callback of `key` was answered, `seconds` after its handler started."""
        self._answered += 1
        self._answer_s += seconds
        self.leave(key)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and len(self._out) < self.size:
            fut, key = self._waiting.popleft()
            if not fut.done():
                self._out[key] = now + self.hold_s
                fut.set_result(None)

    def judge(self, now: float) -> None:
        """Free the places whose time is up, and size the window by the callbacks answered since last time."""
        if self._out:
            # Places are taken in time order, each for the same hold: the first one whose time is not up ends
            # the scan (a fan-out holds thousands, and this runs every tick).
            expired = []
            for key, until in self._out.items():
                if until > now:
                    break
                expired.append(key)
            for key in expired:
                del self._out[key]
        if self._answered:
            mean = self._answer_s / self._answered
            self._quickest.append(mean)
            target = max(self.target_s, 2 * min(self._quickest))
            if mean > target:
                self.size = max(self.min_size, int(self.size * SHRINK))
            elif self._waiting and mean < target * 0.7:
                self._grow(GROW_FAST if mean < target / 2 else GROW)
            self._answered, self._answer_s = 0, 0.0
        elif self._waiting:
            # No callback came back in a whole tick while calls wait: the window holds slow steps, or the
            # callbacks go to another process. Nothing says the process is behind.
            self._grow(GROW_FAST)
        self._admit()
        metrics.WINDOW_SIZE.set(self.size)
        metrics.WINDOW_QUEUED.set(len(self._waiting))

    def _grow(self, share: float) -> None:
        self.size = min(self.max_size, self.size + max(1, int(self.size * share)))

    async def _judge_every_tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.judge(time.monotonic())
