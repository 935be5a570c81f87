"""The outbox's signal (desired/wakeup.py): every raise wakes every subscriber and every waiter that
took the event before it; a NOTIFY of this process's own writes is not heard twice."""

from __future__ import annotations

import asyncio

from desired.wakeup import Signal


async def test_a_raise_wakes_every_subscriber_and_the_waiters_that_took_the_event_before_it():
    signal, woken = Signal(), []
    signal.subscribe(lambda: woken.append("relay"))
    signal.subscribe(lambda: woken.append("clock"))
    before = signal.next()
    waiter = asyncio.create_task(before.wait())
    signal.fire()
    await asyncio.wait_for(waiter, 1)
    assert woken == ["relay", "clock"] and signal.raised == 1
    after = signal.next()
    assert after is not before and not after.is_set()  # a later waiter waits for the next raise
    signal.fire()
    assert after.is_set() and woken == ["relay", "clock"] * 2


def test_a_notify_from_another_process_raises_it_and_its_own_does_not():
    signal, other = Signal(), Signal()
    assert signal.origin != other.origin
    signal.heard(signal.origin)  # this process's commit raised it already
    assert signal.raised == 0
    signal.heard(other.origin)
    assert signal.raised == 1
