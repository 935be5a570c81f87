"""Red-team, stop 45: the cleanup TTL (a removal for good: the game_id can never be started again).

* After a restore of the database, the record's ``stopped_at`` was the backup's: a game stopped minutes ago
  (started and stopped again in the lost hour, on the same container) was removed because the record said
  it had been stopped for a day. The TTL now counts from the engine's own stop too (its container's
  ``FinishedAt``), whichever is later.
* A kill between the cleanup's removal and its record left the game ``stopped`` with no container for ever:
  the next look cleared the container from the record and then had nothing to clean up. The game is never
  ``removed``, its state never disposed of, and its game_id may still be started. A stopped record past the
  TTL that names a container that is gone is now cleaned up as if its container were still there."""

from __future__ import annotations

from datetime import timedelta

from desired.model import JobKind, Status
from tests.support.world import World, started


async def _stopped(tmp_path) -> World:
    w = World(tmp_path, RTMANAGER_CLEANUP_TTL="86400")
    await started(w)
    await w.job(JobKind.STOP, "g1")
    assert (await w.sync("g1")).status is Status.STOPPED
    return w


async def test_the_ttl_counts_from_the_engines_own_stop_when_it_is_later_than_the_records(tmp_path) -> None:
    w = await _stopped(tmp_path)
    c = w.backend.by_name("galaxy-game-g1")
    assert c is not None
    w.store.clock.advance(86400 + 600)
    # the database restored from a backup: the container was started and stopped again since (10 minutes ago)
    c.finished_at = w.store.clock.now() - timedelta(minutes=10)
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and w.backend.by_name("galaxy-game-g1") is not None, rec
    w.store.clock.advance(86400)
    rec = await w.sync("g1")
    assert rec.status is Status.REMOVED and w.backend.by_name("galaxy-game-g1") is None


async def test_a_cleanup_cut_after_its_removal_is_finished(tmp_path) -> None:
    w = await _stopped(tmp_path)
    w.store.clock.advance(86400 + 60)
    real = w.store.cleaned_up

    async def killed(*args, **kwargs):
        raise RuntimeError("killed between the removal and its record")

    w.store.cleaned_up = killed
    try:
        await w.sync("g1")
    except RuntimeError:
        pass
    assert w.backend.by_name("galaxy-game-g1") is None and w.store.records["g1"].status is Status.STOPPED
    w.store.cleaned_up = real
    for _ in range(3):
        rec = await w.sync("g1")
    assert rec.status is Status.REMOVED and rec.removed_at is not None, rec


async def test_a_stopped_game_whose_container_went_before_the_ttl_is_not_removed_early(tmp_path) -> None:
    w = await _stopped(tmp_path)
    c = w.backend.by_name("galaxy-game-g1")
    assert c is not None
    w.backend.containers.pop(c.id)  # removed from outside an hour after the stop
    w.store.clock.advance(3600)
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED


def test_a_stopped_swarm_service_says_when_it_was_scaled_to_zero() -> None:
    """Review of the fix: on a Swarm a stopped game's service is scaled to 0 and its tasks are soon forgotten,
    so its unit had no exit time and the TTL still counted from a restored record's stop. The time of the
    scale to 0 (the service's UpdatedAt: never earlier than the stop) stands in for it."""
    from observed.swarm import SwarmBackend
    from tests.unit.test_swarm_nodes import service

    b = SwarmBackend(instance="i", network="net")
    stopped = {**service(replicas=0), "PreviousSpec": {"Name": "galaxy-game-g1"}, "UpdatedAt": "2026-12-06T10:00:00.5Z"}
    seen = b._observe(stopped, [])
    assert seen.state == "exited" and seen.finished_at is not None
    assert seen.finished_at.isoformat().startswith("2026-12-06T10:00:00")
    assert b._observe({**service(replicas=1), "UpdatedAt": "2026-12-06T10:00:00Z"}, []).finished_at is None


async def test_a_daemon_clock_a_little_ahead_or_far_ahead_does_not_delay_the_cleanup(tmp_path) -> None:
    """Review of the fix: the daemon's FinishedAt is on the daemon's clock. A few seconds ahead of the
    database's delayed every cleanup (and said "restored from an older backup?"); one far in the future
    held it until then. Within 2 minutes of the record's stop it is that stop; ahead of now it is ignored."""
    for ahead in (timedelta(seconds=30), timedelta(days=30)):
        w = await _stopped(tmp_path / str(ahead.total_seconds()))
        c = w.backend.by_name("galaxy-game-g1")
        assert c is not None
        stopped_at = w.store.records["g1"].stopped_at
        c.finished_at = stopped_at + ahead
        w.store.clock.advance(86400 + 60)
        rec = await w.sync("g1")
        assert rec.status is Status.REMOVED, (ahead, rec)
