"""The callback window: which calls wait, what lets them go, and how its size follows the callbacks' answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from aetr.engine.pacing import CallbackWindow

WAIT_S = 5.0


async def waiting_call(window: CallbackWindow, key: tuple[str, int]) -> asyncio.Task[None]:
    """A call that had to wait for a place (the test fails if it got one at once)."""
    task = asyncio.create_task(window.enter(key))
    await asyncio.sleep(0)  # one turn of the loop: enter() either returned or parked its future
    assert not task.done(), f"{key} got a place although the window was full"
    return task


async def test_calls_past_the_size_wait_and_each_answered_callback_lets_the_next_one_go_in_order() -> None:
    window = CallbackWindow(0.02, 256, size=2, hold_s=60)
    await window.enter(("a", 1))
    await window.enter(("b", 1))
    third = await waiting_call(window, ("c", 1))
    fourth = await waiting_call(window, ("d", 1))
    assert (window.outstanding, window.queued, window.waited) == (2, 2, 2)

    window.answered(("a", 1), 0.003)
    await asyncio.wait_for(third, WAIT_S)
    assert not fourth.done() and window.outstanding == 2

    window.leave(("b", 1))  # a call that failed frees its place as a callback does
    await asyncio.wait_for(fourth, WAIT_S)
    assert (window.outstanding, window.queued) == (2, 0)


async def test_a_callback_for_another_attempt_or_an_unknown_call_frees_nothing() -> None:
    window = CallbackWindow(0.02, 256, size=1, hold_s=60)
    await window.enter(("a", 2))
    second = await waiting_call(window, ("b", 1))
    window.answered(("a", 1), 0.003)  # the first attempt's late callback
    window.leave(("zzz", 1))
    await asyncio.sleep(0)
    assert not second.done() and window.outstanding == 1
    window.answered(("a", 2), 0.003)
    await asyncio.wait_for(second, WAIT_S)


async def test_a_call_stops_counting_once_its_hold_is_over_so_slow_steps_never_block_others() -> None:
    window = CallbackWindow(0.02, 1, size=1, hold_s=0.2)  # a window that cannot grow
    await window.enter(("slow", 1))  # a step that will not call back for hours
    second = await waiting_call(window, ("next", 1))
    window.judge(time.monotonic() + 0.1)
    await asyncio.sleep(0)
    assert not second.done(), "let go before the first call's hold was over"
    window.judge(time.monotonic() + 0.21)
    await asyncio.wait_for(second, WAIT_S)
    assert window.outstanding == 1  # the second call counts now, the first does not


async def test_each_call_stops_counting_when_its_own_hold_is_over_not_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("aetr.engine.pacing.time.monotonic", lambda: clock[0])
    window = CallbackWindow(0.02, 3, size=3, hold_s=0.2)
    await window.enter(("first", 1))  # held until 1000.2
    clock[0] = 1000.1
    window.judge(clock[0])  # a tick: nothing is over yet
    await window.enter(("second", 1))  # held until 1000.3
    await window.enter(("third", 1))
    window.leave(("second", 1))  # its callback came
    await window.enter(("fourth", 1))
    fifth = await waiting_call(window, ("fifth", 1))
    clock[0] = 1000.25
    window.judge(clock[0])  # the first call's hold is over, not the others'
    await asyncio.wait_for(fifth, WAIT_S)
    assert window.outstanding == 3  # third, fourth and fifth
    clock[0] = 1000.31
    window.judge(clock[0])
    assert window.outstanding == 1  # fifth, taken at 1000.25: held until 1000.45
    clock[0] = 1000.45
    window.judge(clock[0])
    assert window.outstanding == 0


async def test_a_cancelled_waiting_call_gives_its_turn_to_the_next() -> None:
    window = CallbackWindow(0.02, 256, size=1, hold_s=60)
    await window.enter(("a", 1))
    cancelled = await waiting_call(window, ("b", 1))
    third = await waiting_call(window, ("c", 1))
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    window.answered(("a", 1), 0.003)
    await asyncio.wait_for(third, WAIT_S)
    assert window.outstanding == 1 and window.queued == 0


def answers(window: CallbackWindow, mean_s: float, n: int = 10) -> None:
    for i in range(n):
        window.answered((f"x{i}", 1), mean_s)


async def test_slow_answers_shrink_the_window_down_to_its_floor_and_quick_ones_grow_it_while_calls_wait() -> None:
    window = CallbackWindow(0.02, 100, size=32, min_size=8)
    now = time.monotonic()
    answers(window, 0.004)  # the quickest seen: the database answers in 4 ms when nothing queues
    window.judge(now)
    assert window.size == 32, "nobody waits: a quick window leaves the size alone"

    sizes = []
    for _ in range(20):
        answers(window, 0.060)
        window.judge(now)
        sizes.append(window.size)
    assert sizes[0] == 28 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 8

    for i in range(8):
        await window.enter((f"busy{i}", 1))
    waiting = [await waiting_call(window, (f"w{i}", 1)) for i in range(5)]
    answers(window, 0.012)  # under 0.7 of the target: an eighth more
    window.judge(now)
    assert window.size == 9
    await asyncio.wait_for(waiting[0], WAIT_S)  # the grown window let one more call go
    answers(window, 0.005)  # under half the target: half as many again
    window.judge(now)
    assert window.size == 13
    await asyncio.wait_for(asyncio.gather(*waiting[1:]), WAIT_S)
    for _ in range(40):
        answers(window, 0.005)
        window.judge(now)
    assert window.size == 13, "grows only while calls wait: all 13 calls fit now"


async def test_a_database_slower_than_the_target_does_not_shrink_the_window() -> None:
    window = CallbackWindow(0.02, 100, size=32)
    now = time.monotonic()
    answers(window, 0.030)  # a slow disk: 30 ms per answer with nothing queued, above the 20 ms target
    window.judge(now)
    answers(window, 0.050)  # still under twice the quickest seen
    window.judge(now)
    assert window.size == 32
    answers(window, 0.080)  # queueing on top of it
    window.judge(now)
    assert window.size == 28


async def test_with_no_callbacks_answered_here_the_window_grows_while_calls_wait() -> None:
    # Several processes on one port: the callbacks of this one's calls land on the others.
    window = CallbackWindow(0.02, 40, size=8, hold_s=60)
    for i in range(8):
        await window.enter((f"a{i}", 1))
    waiting = [await waiting_call(window, (f"w{i}", 1)) for i in range(40)]
    for _ in range(20):
        window.judge(time.monotonic())
    assert window.size == 40, "bounded by the process's own limit on calls in flight"
    await asyncio.wait_for(asyncio.gather(*waiting[:32]), WAIT_S)
    assert window.queued == 8


async def test_stop_cancels_the_waiting_calls_rather_than_making_them() -> None:
    window = CallbackWindow(0.02, 256, size=1, hold_s=60)
    window.start()
    await window.enter(("a", 1))
    waiting = [await waiting_call(window, (f"w{i}", 1)) for i in range(3)]
    await window.stop()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), WAIT_S)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert window.queued == 0
