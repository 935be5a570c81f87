"""A record older than what runs (red-team finding: PostgreSQL restored from an older backup). The game
was stopped, the backup taken, then the game started again and ran for longer than the cleanup TTL.
Restored, its record says stopped, converged, since before the backup: the controller stopped the
engine, which is the record's wish, but kept the old ``stopped_at``, so the very next look removed the
container for good (the cleanup TTL had long passed), and Lobby's start sent again was refused as a
start of a removed game. The same happens to an engine started by hand beside a stopped record. A stop
of a running engine is now dated when it happens: the TTL counts from there."""

from __future__ import annotations

from desired.model import JobKind, Status
from tests.support.world import IMG, World


async def test_an_engine_stopped_because_the_record_says_stopped_is_not_removed_at_once(tmp_path):
    w = World(tmp_path, RTMANAGER_CLEANUP_TTL="3600")
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED
    w.store.clock.advance(2 * 3600)
    # The engine runs again (started after the backup, or by hand); the record still says stopped.
    [unit] = [c for c in w.backend.containers.values() if c.name == "galaxy-game-g1"]
    unit.state = "running"
    w.reconciler.units.touch("g1")
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and w.backend.ops("stop")
    assert rec.stopped_at == w.store.clock.now()
    w.reconciler.units.touch("g1")
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and not w.backend.ops("remove"), "removed right after its stop"
    w.store.clock.advance(3600)
    w.reconciler.units.touch("g1")
    assert (await w.sync("g1")).status is Status.REMOVED  # the TTL counts from the stop


async def test_an_engine_found_exited_keeps_the_time_it_stopped(tmp_path):
    """A stopped record that only finds its engine exited (MARK_STOPPED: here the unit was replaced from
    outside by another exited one) keeps the time the engine stopped."""
    from dataclasses import replace

    w = World(tmp_path)
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.STOP, "g1")
    first = (await w.sync("g1")).stopped_at
    w.store.clock.advance(60)
    [unit] = [c for c in w.backend.containers.values() if c.name == "galaxy-game-g1"]
    del w.backend.containers[unit.id]
    other = replace(unit, id="d" * 64)  # the same game's unit, another id: the record names no longer it
    w.backend.containers[other.id] = other
    w.reconciler.units.touch("g1")
    rec = await w.sync("g1")
    assert rec.current_container_id == other.id  # MARK_STOPPED ran: nothing was stopped
    assert [op for op in w.backend.ops("stop") if op[1] == other.id] == []
    assert rec.stopped_at == first


async def restored_while_generating(w):
    """A game restarted after the backup (its unit at the next spec revision) generates a turn; the database
    is then restored from the backup, whose record names the unit before the restart."""
    from desired.model import JobKind
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    backup = w.store.records["g1"]
    await w.job(JobKind.RESTART, "g1")
    rec = await w.sync("g1")
    assert rec.converged and rec.spec_revision == backup.spec_revision + 1
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    w.store.records["g1"] = backup.replace(row_version=w.store.records["g1"].row_version)
    w.store.ops = [o for o in w.store.ops if o.game_id != "g1" or o.op is JobKind.START]
    w.reconciler.units.touch("g1")


async def test_the_unit_a_restored_record_does_not_name_is_not_cut_mid_turn(tmp_path):
    """Red-team, stop 43: the record restored from an older backup names the unit before a restart; the
    unit that runs (the restart's) does not match its spec and is recreated, which went ahead at once,
    with no question to the engine: SIGTERM mid-turn. It now waits for the turn, as a disruption of the
    record's own engine does."""
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="600")
    await restored_while_generating(w)
    stops = len(w.backend.ops("stop"))
    for _ in range(3):
        await w.sync("g1")
        w.store.clock.advance(30)
        w.reconciler.units.touch("g1")
    assert len(w.backend.ops("stop")) == stops, "the engine was stopped while it generated a turn"
    w.engine.finish_generation("galaxy-game-g1")  # the turn ends: the replacement goes ahead
    await w.sync("g1")
    assert len(w.backend.ops("stop")) == stops + 1


async def test_the_wait_for_a_turn_of_a_unit_the_record_does_not_name_is_bounded(tmp_path):
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")
    await restored_while_generating(w)
    stops = len(w.backend.ops("stop"))
    for _ in range(4):
        await w.sync("g1")
        w.store.clock.advance(30)
        w.reconciler.units.touch("g1")
    assert len(w.backend.ops("stop")) == stops + 1  # RTMANAGER_DISRUPTION_WAIT passed: it goes ahead


async def test_a_stop_of_a_restored_game_whose_unit_the_record_does_not_name_is_not_held(tmp_path):
    """Review: a backup taken mid-turn (its record says generation_in_progress), a restart after it, the
    database restored, then a stop: the planner's wait for the turn went to the question for a unit the
    record does not name, which wrote nothing when the unit said idle, so the wait never ran out and the
    stop job was never answered. Only a replacement asks that question; a stop asks the engine as before."""
    from desired.model import JobKind
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="600")
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    backup = w.store.records["g1"]
    assert backup.status is Status.GENERATION_IN_PROGRESS and backup.disruption_wait_since is None
    w.engine.finish_generation("galaxy-game-g1")
    await w.sync("g1")
    await w.job(JobKind.RESTART, "g1")
    assert (await w.sync("g1")).converged
    w.store.records["g1"] = backup.replace(row_version=w.store.records["g1"].row_version)
    w.store.ops = [o for o in w.store.ops if o.game_id != "g1" or o.op is JobKind.START]
    await w.job(JobKind.STOP, "g1")
    for _ in range(5):
        w.reconciler.units.touch("g1")
        rec = await w.sync("g1")
        if rec.status is Status.STOPPED:
            break
        w.store.clock.advance(30)
    assert rec.status is Status.STOPPED and ("stop", "success", "") in w.results("g1")
