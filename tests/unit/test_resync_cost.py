"""What a resync queues (controller/triggers.py ``Resync.once``). Issue 25: at 1,000 games every resync
queued every game with a turn in flight, though each one's next poll was already due within a second:
a record read, a claim and an engine status request each, for nothing the poll would not do anyway.
A game whose next look is already due within the resync interval is not queued again; one with no
look due (a lost wake), or with one due later than the interval, is."""

from __future__ import annotations

import asyncio

from controller.triggers import Resync
from desired.model import JobKind
from tests.support.world import IMG, World, started


async def _ready() -> bool:
    return True


async def _in_flight(tmp_path) -> tuple[World, Resync]:
    w = World(tmp_path)
    w.engine.admin[IMG] = "slow"  # the turn stays generating: the game stays not converged
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await asyncio.wait_for(w.sync("g1"), 30)  # asks for the turn, and plans its poll
    assert not w.store.records["g1"].converged
    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue,
                    metrics=w.reconciler.metrics, interval=30, retention_days=7, ready_check=_ready)
    return w, resync


async def test_a_game_whose_poll_is_due_is_not_queued_again(tmp_path):
    w, resync = await _in_flight(tmp_path)
    assert w.queue.due_within("g1", 30)
    assert await resync.once() == 0
    assert len(w.queue) == 0


async def test_a_game_with_no_look_planned_is_queued(tmp_path):
    w, resync = await _in_flight(tmp_path)
    w.queue.reset()  # its poll is lost (a wake that never came)
    assert not w.queue.due_within("g1", 30)
    assert await resync.once() == 1
    assert len(w.queue) == 1


async def test_a_game_whose_next_look_is_later_than_the_interval_is_queued(tmp_path):
    w, resync = await _in_flight(tmp_path)
    w.queue.reset()
    w.queue.add_after("g1", 100)  # a backoff longer than the resync interval
    assert not w.queue.due_within("g1", 30)
    assert await resync.once() == 1


async def test_a_game_being_worked_on_is_marked_to_be_worked_on_again(tmp_path):
    """The resync's list may be newer than what the worker under way read: it is looked at once more."""
    w, resync = await _in_flight(tmp_path)
    w.queue.reset()
    w.queue.add("g1")
    assert await w.queue.get() == "g1"  # a worker has it
    assert not w.queue.due_within("g1", 30)
    assert await resync.once() == 1
    w.queue.done("g1")
    assert len(w.queue) == 1


async def test_a_unit_the_list_shows_otherwise_is_queued_at_once_even_with_a_look_due(tmp_path):
    """Review: a finding (a missed event: the engine exited) is looked at now, not at the poll's time."""
    w, resync = await _in_flight(tmp_path)
    assert w.queue.due_within("g1", 30)
    w.backend.containers[w.store.records["g1"].current_container_id].state = "exited"
    assert await resync.once() == 1
    assert len(w.queue) == 1
