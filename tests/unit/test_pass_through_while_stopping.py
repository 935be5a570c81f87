"""Red-team, stop 45: the gateway's pass-through kept forwarding players' requests to an engine during its
whole stop grace (the SIGTERM its save runs in): the record said ``running`` until the engine had stopped.
Orders acknowledged then could be lost, or change the state in the middle of its save. The stop now writes
that it is under way before the engine is asked to stop, and the pass-through refuses from then on."""

from __future__ import annotations

from controller.engine_proxy import closed
from desired.model import JobKind, Status
from tests.support.world import IMG, World, started


async def test_the_pass_through_is_closed_while_the_engine_saves_on_its_way_out(tmp_path) -> None:
    w = World(tmp_path)
    rec = await started(w)
    assert closed(rec) is None
    seen = []

    async def during() -> None:
        seen.append(closed(w.store.records["g1"], w.store.clock.now()))

    w.backend.while_stopping = during
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and len(seen) == 1
    assert seen[0] is not None and "stopping" in seen[0], seen
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and closed(rec) is None  # open again once it runs again


def test_a_stale_stopping_mark_does_not_close_the_pass_through() -> None:
    """Review of the fix (125): a replica of an older version (a rolling upgrade) never clears the mark. A mark
    older than the engine's start, or older than any grace, is not a stop under way."""
    from datetime import timedelta

    from desired.model import DesiredStatus
    from tests.support.job_records import NOW, rec

    up = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1, game_id="g1", current_container_id="c1",
             current_image_ref=IMG, started_at=NOW)
    now = NOW + timedelta(seconds=5)
    assert closed(up.replace(stopping_since=NOW + timedelta(seconds=1)), now) is not None
    assert closed(up.replace(stopping_since=NOW - timedelta(seconds=1)), now) is None  # before its engine started
    old = up.replace(started_at=NOW - timedelta(hours=3), stopping_since=NOW - timedelta(hours=2))
    assert closed(old, now) is None
