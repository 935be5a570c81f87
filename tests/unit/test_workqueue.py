"""controller.workqueue: dedupe, exclusive processing, backoff, delays, shutdown."""

from __future__ import annotations

import asyncio
import random

import pytest

from controller.workqueue import ShutDown, WorkQueue


async def get_now(q: WorkQueue, timeout: float = 1.0):
    return await asyncio.wait_for(q.get(), timeout)


async def test_add_dedupes_queued_keys() -> None:
    q = WorkQueue()
    for key in ["a", "b", "a", "a", "c", "b"]:
        q.add(key)
    assert len(q) == 3
    assert [await get_now(q) for _ in range(3)] == ["a", "b", "c"]
    assert len(q) == 0
    assert q.adds == 3


async def test_processing_key_not_handed_out_twice_and_requeued_after_done() -> None:
    q = WorkQueue()
    q.add("a")
    assert await get_now(q) == "a"
    assert q.processing == 1
    q.add("a")  # added while processing: remembered, not queued
    q.add("a")
    assert len(q) == 0
    second = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    assert not second.done()  # "a" is not handed to a second worker
    q.done("a")
    assert await asyncio.wait_for(second, 1) == "a"
    assert q.processing == 1
    q.done("a")
    assert q.processing == 0 and len(q) == 0


async def test_done_without_new_add_does_not_requeue() -> None:
    q = WorkQueue()
    q.add("a")
    await get_now(q)
    q.done("a")
    assert len(q) == 0
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(q.get(), 0.02)


async def test_other_keys_flow_while_one_is_processing() -> None:
    q = WorkQueue()
    q.add("a")
    assert await get_now(q) == "a"
    q.add("a")
    q.add("b")
    assert await get_now(q) == "b"


async def test_rate_limited_backoff_doubles_caps_and_forget_resets() -> None:
    q = WorkQueue(base_delay=0.5, max_delay=3.0)
    try:
        delays = [q.add_rate_limited("k") for _ in range(6)]
        assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
        assert q.failures("k") == 6
        assert q.retries == 6
        assert q.backoff("other") == 0.5  # per key
        q.forget("k")
        assert q.failures("k") == 0
        assert q.backoff("k") == 0.5
        assert q.add_rate_limited("k") == 0.5
    finally:
        q.shut_down()


async def test_rate_limited_key_comes_back_after_its_delay() -> None:
    q = WorkQueue(base_delay=0.03)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert q.add_rate_limited("k") == 0.03
    assert len(q) == 0
    assert await get_now(q) == "k"
    assert loop.time() - t0 >= 0.025


async def test_add_after_fires_later() -> None:
    q = WorkQueue()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    q.add_after("k", 0.05)
    await asyncio.sleep(0.01)
    assert len(q) == 0
    assert await get_now(q) == "k"
    assert loop.time() - t0 >= 0.045


async def test_add_after_zero_adds_now() -> None:
    q = WorkQueue()
    q.add_after("k", 0)
    assert len(q) == 1


class ManualTimers:
    """Timers on a clock the test moves: a timer that was not cancelled fires when its time comes."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback, *args):
        handle = asyncio.TimerHandle(when, callback, args, asyncio.get_running_loop())
        self.handles.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for h in sorted(self.handles, key=lambda h: h.when()):
            if h.when() <= self.now and not h.cancelled():
                self.handles.remove(h)
                h._run()


async def test_a_replaced_timer_never_fires() -> None:
    timers = ManualTimers()
    q = WorkQueue(timers=timers)
    q.add_after("k", 5.0)
    q.add_after("k", 0.02)  # earlier: replaces the 5 s timer
    q.add_after("k", 10.0)  # later: ignored
    timers.advance(0.02)
    assert await get_now(q) == "k"
    q.done("k")
    timers.advance(20.0)  # past both discarded timers
    assert len(q) == 0 and q.adds == 1


async def test_shut_down_cancels_every_timer() -> None:
    timers = ManualTimers()
    q = WorkQueue(timers=timers)
    q.add_after("b", 1.0)
    q.shut_down()
    assert all(h.cancelled() for h in timers.handles)


@pytest.mark.looptime  # virtual time: the 5 s and 10 s timers come due within the test
async def test_add_after_keeps_the_earliest_wakeup() -> None:
    """The same on the event loop's own timers, waited past both discarded ones."""
    q = WorkQueue()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    q.add_after("k", 5.0)
    q.add_after("k", 0.02)  # earlier: replaces
    q.add_after("k", 10.0)  # later: ignored
    assert await get_now(q) == "k"
    assert loop.time() - t0 == pytest.approx(0.02, abs=0.005)
    q.done("k")
    await asyncio.sleep(20.0)  # past the 5 s and 10 s wake-ups
    assert len(q) == 0 and q.adds == 1  # the replaced timers did not fire
    q.shut_down()


async def test_shut_down_makes_get_raise() -> None:
    q = WorkQueue()
    q.shut_down()
    with pytest.raises(ShutDown):
        await get_now(q)
    q.add("a")  # ignored after shutdown
    assert len(q) == 0


async def test_shut_down_wakes_every_waiting_worker() -> None:
    q = WorkQueue()
    waiters = [asyncio.ensure_future(q.get()) for _ in range(3)]
    await asyncio.sleep(0.01)
    q.shut_down()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1)
    assert all(isinstance(r, ShutDown) for r in results)


async def test_shut_down_drains_queued_keys_first_and_cancels_timers() -> None:
    q = WorkQueue()
    q.add("a")
    q.add_after("b", 0.02)
    q.shut_down()
    assert await get_now(q) == "a"
    await asyncio.sleep(0.05)
    with pytest.raises(ShutDown):
        await get_now(q)


async def test_cancelled_waiter_does_not_lose_a_wakeup() -> None:
    q = WorkQueue()
    w1 = asyncio.ensure_future(q.get())
    w2 = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    q.add("a")   # wakes w1 ...
    w1.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await w1
    assert await asyncio.wait_for(w2, 1) == "a"


async def test_on_change_called() -> None:
    seen: list[tuple[int, int]] = []
    q = WorkQueue(on_change=lambda wq: seen.append((len(wq), wq.processing)))
    q.add("a")
    await get_now(q)
    q.done("a")
    assert seen == [(1, 0), (0, 1), (0, 0)]


async def test_concurrent_workers_never_share_a_key() -> None:
    q = WorkQueue()
    keys = [f"k{i}" for i in range(5)]
    active: set[str] = set()
    overlaps: list[str] = []
    seq = 0
    last_add: dict[str, int] = {}
    last_start: dict[str, int] = {}
    processed = 0
    rnd = random.Random(7)

    async def worker() -> None:
        nonlocal seq, processed
        while True:
            try:
                key = await q.get()
            except ShutDown:
                return
            if key in active:
                overlaps.append(key)
            active.add(key)
            seq += 1
            last_start[key] = seq
            for _ in range(rnd.randint(0, 3)):
                await asyncio.sleep(0)
            active.discard(key)
            processed += 1
            q.done(key)

    workers = [asyncio.create_task(worker(), name=f"w{i}") for i in range(4)]
    for i in range(50):
        key = keys[i % 5] if i % 3 else rnd.choice(keys)
        seq += 1
        last_add[key] = seq
        q.add(key)
        if rnd.random() < 0.5:
            await asyncio.sleep(0)
    for _ in range(200):
        if len(q) == 0 and q.processing == 0:
            break
        await asyncio.sleep(0)
    q.shut_down()
    await asyncio.wait_for(asyncio.gather(*workers), 1)

    assert overlaps == []
    assert 5 <= processed <= 50
    # level-triggered: every key was worked on after its last add
    for key in keys:
        assert last_start[key] > last_add[key], key
