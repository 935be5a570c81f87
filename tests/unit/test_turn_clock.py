"""The turn clock's waking: results written wake it, a burst of them costs a few queries, and no
wake is lost, whether it comes while a tick runs or while the clock holds back between ticks."""

from __future__ import annotations

import asyncio

import pytest

from controller.metrics import Metrics
from controller.triggers import MIN_TICK, TurnClock
from tests.support import eventually

pytestmark = pytest.mark.looptime  # virtual time: the clock's waits are the event loop's


class DueTimes:
    """The store's one query the clock makes; nothing is due and nothing will be."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def ask_due_turns(self, limit, skip=()):
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return [], None, False


async def running(store: DueTimes):
    clock = TurnClock(store=store, admission=None, metrics=Metrics(), max_sleep=60.0)
    stopping = asyncio.Event()
    return clock, stopping, asyncio.create_task(clock.run(stopping))


async def test_a_wake_while_the_clock_holds_back_is_not_lost():
    store = DueTimes()
    clock, stopping, task = await running(store)
    await eventually(lambda: store.calls == 1, 5.0, interval=0.01)
    clock.wake.set()  # within MIN_TICK of the first tick: held back, then honoured
    await eventually(lambda: store.calls == 2, MIN_TICK + 2.0, interval=0.01)
    stopping.set()
    await task


async def test_a_wake_while_a_tick_runs_gives_another_tick():
    store = DueTimes()
    store.hold = asyncio.Event()
    clock, stopping, task = await running(store)
    await store.entered.wait()
    clock.wake.set()  # the query has been sent: what it returns may not include the new game
    store.hold.set()
    await eventually(lambda: store.calls == 2, MIN_TICK + 2.0, interval=0.01)
    stopping.set()
    await task


async def test_a_burst_of_wakes_costs_a_few_queries_not_one_each():
    store = DueTimes()
    clock, stopping, task = await running(store)
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.0
    wakes = 0
    while loop.time() < end:
        clock.wake.set()
        wakes += 1
        await asyncio.sleep(0.005)
    stopping.set()
    await task
    assert wakes > 50
    assert store.calls <= 1.0 / MIN_TICK + 2


class DenseDueTimes(DueTimes):
    """1,000 games on a 10 s interval: one is due every 10 ms, one asked a tick."""

    async def ask_due_turns(self, limit, skip=()):
        self.calls += 1
        return ["g"], 0.01, False


async def test_dense_due_times_cost_a_few_queries_a_second_not_one_each():
    """Issue 25: at 1,000 games the clock ticked 18 times a second, each tick asking for the one or two
    games due since the last, as it slept only until the next due time (10 ms away). Ticks are
    MIN_TICK apart unless a full page is due; a due game waits at most that long."""

    class Woken:
        def wake(self, game_id: str) -> None:
            pass

    store = DenseDueTimes()
    clock = TurnClock(store=store, admission=Woken(), metrics=Metrics(), max_sleep=60.0)
    stopping = asyncio.Event()
    task = asyncio.create_task(clock.run(stopping))
    await asyncio.sleep(1.0)
    stopping.set()
    await task
    assert 1.0 / MIN_TICK - 1 <= store.calls <= 1.0 / MIN_TICK + 2
