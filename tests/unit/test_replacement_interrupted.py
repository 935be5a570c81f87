"""A replacement interrupted by a job that asks for the image it replaced (red-team finding): a patch from
A to B took a copy of A's state, B started and changed the state, and before B answered healthy Lobby
asked for A again (a start with A, the patch answered superseded). A was started on the state B had
changed, and once A was healthy the copy was deleted: A's state, as A left it, was gone. Starting the
replaced image again is a rollback: the copy is put back first."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from desired.model import JobKind
from tests.support.world import IMG, World, started

MUTE = "galaxy/engine-stub:mute"  # runs, never answers healthy (tests/fakes.py)


async def patching(tmp_path):
    """A game running IMG whose state says "A-format", with a patch to MUTE admitted (not carried out yet)."""
    w = World(tmp_path, RTMANAGER_START_TIMEOUT="5")
    rec = await started(w)
    save = Path(rec.state_path) / "save"
    save.write_text("A-format")
    await w.job(JobKind.PATCH, "g1", MUTE)
    return w, rec, save


def during_the_rollback(w: World, save: Path, job) -> list:
    """The patch's engine (MUTE) half converts the state; once the rollback's old engine runs on the restored
    state it writes its boot, then ``job()`` is sent, once, during its health wait. The list fills when sent."""
    real, sent = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE:
            save.write_text("B-format (half converted)")
        elif c is not None and c.image == IMG and w.store.records["g1"].rolling_back and not sent:
            save.write_text("A-format, booted again")  # the old engine, started on the restored state
            sent.append(1)
            await job()
        return await real(host)

    w.engine.check = check
    return sent


def disk_full_at_the_stop(w: World, save: Path, monkeypatch, *jobs: JobKind, also=None):
    """During the patch's health wait the new engine half converts the state and ``jobs`` are sent (a stop
    first); the stop's restore then finds the disk full (``also()``, if given, breaks something more at that
    moment). Returns the list that fills when it happened, and a function that gives the room back (and the
    engine's health path as it was)."""
    import errno

    from observed import statedir
    real_copy, real_check, asked = statedir._copy_dir, w.engine.check, []

    def full(src, dst, depth):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not asked:
            asked.append(1)
            save.write_text("B-format (half converted)")
            monkeypatch.setattr(statedir, "_copy_dir", full)  # the stop's restore finds the disk full
            if also is not None:
                also()
            for job in jobs:
                await w.job(job, "g1")
        return await real_check(host)

    def give_room_back() -> None:
        monkeypatch.setattr(statedir, "_copy_dir", real_copy)
        w.engine.check = real_check

    w.engine.check = check
    return asked, give_room_back


async def synced_until(w: World, done, rounds: int):
    """Reconcile g1 until ``done(record)``, at most ``rounds`` times; the last record."""
    for _ in range(rounds):
        rec = await asyncio.wait_for(w.sync("g1"), 60)
        if done(rec):
            break
    return rec


async def test_asking_for_the_replaced_image_during_a_replacement_gives_it_its_state_back(tmp_path):
    w, rec, save = await patching(tmp_path)
    real, asked = w.engine.check, []

    async def check(host):  # B runs: it converts the state, and Lobby asks for A again meanwhile
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not asked:
            asked.append(1)
            save.write_text("B-format (half converted)")
            await w.job(JobKind.START, "g1", IMG)
        return await real(host)

    w.engine.check = check
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert asked, "the scenario did not happen"
    assert rec.converged and rec.current_image_ref == IMG and rec.status.value == "running"
    assert ("patch", "failure", "superseded") in w.results("g1") and w.results("g1")[-1] == ("start", "success", "")
    assert save.read_text() == "A-format"


async def test_a_stop_during_a_replacement_leaves_the_state_as_the_replaced_engine_left_it(tmp_path):
    """Review: a stop while the new engine had not answered healthy yet (the patch superseded) left the state
    as the new engine had changed it, and the copy was deleted as a leftover: a later start of the old
    image ran it on that. A replacement that did not complete leaves the state as the old engine left it."""
    w, rec, save = await patching(tmp_path)
    replaced = rec.current_container_id
    real, asked = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not asked:
            asked.append(1)
            save.write_text("B-format (half converted)")
            await w.job(JobKind.STOP, "g1")
        return await real(host)

    w.engine.check = check
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert asked and rec.converged and rec.status.value == "stopped"
    assert save.read_text() == "A-format"
    [note] = [o for o in w.store.ops if o.params.get("event") == "state_restore"]  # the operation log says so
    assert note.source.value == "reconciler" and note.params["copy"] == replaced[:12]
    await w.reconciler.states.drop(rec.game_id)  # the storage round may delete the copy now
    w.engine.check = real
    await w.job(JobKind.START, "g1", IMG)
    rec = await asyncio.wait_for(w.sync("g1"), 60)
    assert rec.status.value == "running" and rec.current_image_ref == IMG and save.read_text() == "A-format"


async def test_a_stop_during_the_rollback_before_its_restore_leaves_the_old_state(tmp_path):
    """Review: a stop that came after the patch failed (rolling back) and before the rollback's restore was
    skipped: the copy was then deleted as a leftover, and the state stayed as the new engine left it."""
    w, rec, save = await patching(tmp_path)
    real_check, real_fail = w.engine.check, w.store.fail_generation
    stopped = []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE:
            save.write_text("B-format (half converted)")
        return await real_check(host)

    async def fail_generation(*args, **kwargs):  # the patch fails; Lobby stops the game at once
        out = await real_fail(*args, **kwargs)
        if not stopped:
            stopped.append(1)
            await w.job(JobKind.STOP, "g1")
        return out

    w.engine.check, w.store.fail_generation = check, fail_generation
    rec = await synced_until(w, lambda r: r.converged and r.status.value == "stopped", 6)
    assert stopped and rec.status.value == "stopped"
    assert save.read_text() == "A-format"


async def test_a_stop_after_the_rollback_started_the_old_engine_keeps_what_it_wrote(tmp_path):
    """CI's chaos run (seed 25): a stop during the rollback's health wait restored the copy again over what
    the old engine, already started on it, had written (its boot): the state went back. Once the old
    image runs on the restored state, what it writes is its state."""
    w, rec, save = await patching(tmp_path)
    stopped = during_the_rollback(w, save, lambda: w.job(JobKind.STOP, "g1"))
    rec = await synced_until(w, lambda r: r.converged and r.status.value == "stopped", 8)
    assert stopped and rec.status.value == "stopped"
    assert save.read_text() == "A-format, booted again"


async def test_the_unit_stopped_is_told_by_its_spec_hash_not_its_image_name(tmp_path):
    """Review: compared by image name, a Swarm service (its image shown without the digest) of a patch to
    the same tag pinned by digest looked like the replaced image's own engine: the restore was skipped
    and the copy deleted, leaving the new engine's state."""
    import dataclasses

    w = World(tmp_path, RTMANAGER_START_TIMEOUT="5")
    await started(w)
    await w.job(JobKind.PATCH, "g1", MUTE)
    real, seen = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not seen:
            seen.append((w.store.records["g1"], w.backend._observe(c)))
        return await real(host)

    w.engine.check = check
    await asyncio.wait_for(w.sync("g1"), 60)
    [(replacing, new)] = seen
    assert replacing.rollback_image_ref == IMG
    shown = dataclasses.replace(new, image=IMG)  # the new engine, shown under the old image's name
    assert w.reconciler._runs_replaced(replacing, shown) is False
    old_hash = w.reconciler.specs.want_hash(replacing.replace(desired_image_ref=IMG))
    restarted = dataclasses.replace(new, labels={**new.labels, "com.galaxy.spec-hash": old_hash})
    assert w.reconciler._runs_replaced(replacing, restarted) is True


async def test_a_second_patch_during_the_rollback_copies_what_the_old_engine_wrote_since(tmp_path):
    """Stop 41's open finding: a patch failed, the rollback started the old engine again on its restored state
    and it wrote (its boot), and a second patch came before it answered healthy. That patch found the first
    copy under the same name and took none, so when it failed too, its rollback put back the state from
    before the first patch: what the old engine wrote in between was lost."""
    w, rec, save = await patching(tmp_path)
    patched = during_the_rollback(w, save, lambda: w.job(JobKind.PATCH, "g1", MUTE))  # the second patch
    rec = await synced_until(w, lambda r: r.converged and len(w.results("g1")) >= 3, 12)
    assert patched and w.results("g1") == [("start", "success", ""), ("patch", "failure", "engine_unhealthy"),
                                           ("patch", "failure", "engine_unhealthy")]
    assert rec.converged and rec.status.value == "running" and rec.current_image_ref == IMG  # rolled back again
    assert save.read_text() == "A-format, booted again"


@pytest.mark.parametrize("restarts", [1, 5])
async def test_a_restart_during_the_rollback_keeps_what_the_old_engine_wrote_since(tmp_path, restarts):
    """Review of the test above's fix: a restart (a new spec revision, the same image) during the rollback's
    health wait was not taken for a job replacing the rollback's engine (its spec hash was compared at the new
    revision), and the first copy was put back over what that engine had written."""
    w, rec, save = await patching(tmp_path)

    async def restart():
        for _ in range(restarts):  # review: five spec revisions past the engine's took it for another image's
            await w.job(JobKind.RESTART, "g1")

    restarted = during_the_rollback(w, save, restart)
    rec = await synced_until(w, lambda r: r.converged and len(w.results("g1")) >= 3, 12)
    assert restarted and w.results("g1")[-1] == ("restart", "success", "")
    assert rec.converged and rec.status.value == "running" and rec.current_image_ref == IMG
    assert save.read_text() == "A-format, booted again"


async def test_a_restore_at_stop_that_failed_is_finished_before_the_engine_starts_again(tmp_path, monkeypatch):
    """Red-team, stop 43: a stop during a patch's health wait restores the copy of the replaced engine's state;
    when that restore failed (the disk full: it needs room for the copy while the replaced content is kept
    aside), the game was recorded stopped on a half-emptied directory, the restore left pending. A start that
    reused the stopped unit skipped the pending restore (only a new unit finished it), the engine ran on what
    was left, and once it answered healthy the copy and the pending restore were deleted: the state was gone
    for good. A pending restore is now finished before any unit starts, and a copy whose restore is pending
    is never deleted."""
    from datetime import timedelta

    from observed import statedir
    w, rec, save = await patching(tmp_path)
    asked, give_room_back = disk_full_at_the_stop(w, save, monkeypatch, JobKind.STOP)
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert asked and rec.status.value == "stopped"
    root = w.settings.storage.state_root
    tag = statedir.pending_restore(root, "g1")
    assert tag is not None  # it failed: pending
    # This host's clock an hour behind the database's: the marker says which engine run it is for, so no
    # comparison of the two clocks can give it up.
    marker = Path(root) / ".backups" / "g1" / (tag + statedir.RESTORING)
    old = (w.store.clock.now() - timedelta(hours=1)).timestamp()
    os.utime(marker, (old, old))
    give_room_back()
    w.backend.behaviour[MUTE] = "ok"
    await w.job(JobKind.START, "g1", MUTE)  # Lobby starts the game again, on the patch's image
    started_on = []
    real_start = w.backend.start

    async def start(unit_id):
        started_on.append(save.read_text() if save.exists() else None)
        return await real_start(unit_id)

    w.backend.start = start
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert rec.status.value == "running" and rec.current_image_ref == MUTE
    assert started_on == ["A-format"]  # the restore was finished before the engine started
    assert statedir.pending_restore(w.settings.storage.state_root, "g1") is None


async def test_a_copy_whose_restore_is_pending_is_never_dropped(tmp_path):
    from observed import statedir
    w, rec, save = await patching(tmp_path)
    root = w.settings.storage.state_root
    statedir.backup(root, rec.state_path, "abc")
    marker = Path(root) / ".backups" / "g1" / ("abc" + statedir.RESTORING)
    marker.touch()  # a restore begun and not finished
    await w.reconciler.states.drop("g1")
    assert statedir.pending_restore(root, "g1") == "abc"


async def test_a_removal_during_a_replacement_keeps_the_state_the_replaced_engine_left(tmp_path):
    """Red-team, stop 43: Lobby's cancel (a stop, then a cleanup) during a patch's health wait removed the
    unit without the restore a stop makes: the removed game's directory, kept for the retention, held the
    new engine's half-converted state, and the next storage round deleted the copy of the good one."""
    w, rec, save = await patching(tmp_path)
    real, asked = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not asked:
            asked.append(1)
            save.write_text("B-format (half converted)")
            await w.job(JobKind.STOP, "g1")
            await w.job(JobKind.CLEANUP, "g1")
        return await real(host)

    w.engine.check = check
    rec = await synced_until(w, lambda r: r.converged, 8)
    assert asked and rec.status.value == "removed"
    assert save.read_text() == "A-format"


async def test_a_restore_left_pending_before_the_game_ran_healthy_again_is_given_up(tmp_path, monkeypatch):
    """Review: a restore left pending (a full disk at a stop) and a game that then ran healthy for weeks on
    a path that did not finish it (an engine started outside rtmanager, or an older rtmanager): the next
    plain stop and start finished the old restore, putting the copy of weeks ago over everything since.
    An engine that answered healthy after the restore began makes the restore stale: it is given up."""
    from datetime import timedelta

    from observed import statedir
    w, rec, save = await patching(tmp_path)
    root = w.settings.storage.state_root
    statedir.backup(root, rec.state_path, "abc")
    marker = Path(root) / ".backups" / "g1" / ("abc" + statedir.RESTORING)
    marker.touch()  # a restore begun and not finished...
    old = (w.store.clock.now() - timedelta(days=21)).timestamp()
    os.utime(marker, (old, old))  # ...three weeks ago; the record says its engine started since
    save.write_text("B-format, 3 weeks of turns since")
    await w.job(JobKind.STOP, "g1")  # the patch is superseded; a plain stop, then a start
    await synced_until(w, lambda r: r.converged, 6)
    await w.job(JobKind.START, "g1", IMG)
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert rec.status.value == "running" and save.read_text() == "B-format, 3 weeks of turns since"
    assert statedir.pending_restore(root, "g1") is None


async def test_a_removal_cut_after_the_unit_went_still_keeps_the_replaced_engines_state(tmp_path):
    """Review: the restore of a removal came after the unit's removal; cut between the two (a kill, a blip
    of Postgres), the next look found no unit and recorded the removal without it."""
    from desired.errors import StoreUnavailable
    w, rec, save = await patching(tmp_path)
    real, asked = w.engine.check, []
    real_restore, cut = w.reconciler.states.restore_at_stop, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == MUTE and not asked:
            asked.append(1)
            save.write_text("B-format (half converted)")
            await w.job(JobKind.STOP, "g1")
            await w.job(JobKind.CLEANUP, "g1")
        return await real(host)

    async def restore_at_stop(record, runs_replaced):
        if not cut and not w.backend.by_name("galaxy-game-g1"):
            cut.append(1)
            raise StoreUnavailable("postgres: the connection was lost")  # right after the unit went
        return await real_restore(record, runs_replaced)

    w.engine.check = check
    w.reconciler.states.restore_at_stop = restore_at_stop
    for _ in range(8):
        try:
            rec = await asyncio.wait_for(w.sync("g1"), 60)
        except StoreUnavailable:
            continue
        if rec.converged:
            break
    assert asked and cut and rec.status.value == "removed"
    assert save.read_text() == "A-format"


async def test_a_restore_marked_for_an_earlier_run_is_given_up(tmp_path, monkeypatch):
    """The marker says which engine run the restore is for (the record's started_at when it began): once the
    record says an engine answered healthy since, the restore is stale, whatever the two clocks say."""
    from datetime import timedelta

    from observed import statedir
    w, rec, save = await patching(tmp_path)
    _, give_room_back = disk_full_at_the_stop(w, save, monkeypatch, JobKind.STOP)
    await synced_until(w, lambda r: r.converged, 6)
    give_room_back()
    root = w.settings.storage.state_root
    assert statedir.pending_restore(root, "g1") is not None
    # An engine of the game ran healthy since, on a path that did not finish the restore (an engine started
    # outside rtmanager, an older rtmanager): the record says so; it wrote weeks of turns.
    cur = w.store.records["g1"]
    w.store.records["g1"] = cur.replace(started_at=cur.started_at + timedelta(seconds=5),
                                        stopped_at=cur.stopped_at + timedelta(seconds=10))
    save.write_text("weeks of turns since")
    await w.job(JobKind.START, "g1", IMG)
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert rec.status.value == "running" and save.read_text() == "weeks of turns since"
    assert statedir.pending_restore(root, "g1") is None


@pytest.mark.parametrize("room_again", [True, False, "short of the minimum"])
async def test_a_removed_game_whose_restore_is_pending_is_not_disposed_of_without_it(tmp_path, monkeypatch,
                                                                                     room_again):
    """Review: a removal during a replacement whose restore failed (a full disk) left the directory half
    restored; past the retention, the disposal archived what was there and then deleted the copies (the
    replaced engine's state and the new engine's files set aside): neither was kept. The round now finishes
    the restore first; while it cannot, it disposes of nothing."""

    from controller.metrics import Metrics
    from controller.storage import StorageRound
    from observed import statedir
    archive = tmp_path / "archive"
    w, rec, save = await patching(tmp_path)
    _, give_room_back = disk_full_at_the_stop(w, save, monkeypatch, JobKind.STOP, JobKind.CLEANUP)
    rec = await synced_until(w, lambda r: r.converged, 8)
    root = w.settings.storage.state_root
    assert rec.status.value == "removed" and statedir.pending_restore(root, "g1") is not None
    if room_again:
        give_room_back()
    import dataclasses
    config = dataclasses.replace(w.settings.storage, state_archive_dir=str(archive))
    attempts = []
    if room_again == "short of the minimum":
        # Review: the restore was tried at every round whatever the room, and each attempt filled the state
        # root (the content set aside is not freed until it succeeds), where running engines save their
        # turns. It is tried only when it leaves RTMANAGER_STATE_MIN_FREE.
        free = statedir.free_space(root)[0]
        monkeypatch.setattr(statedir, "measure_copy", lambda *a: free)
        real_restore = statedir.restore
        monkeypatch.setattr(statedir, "restore", lambda *a, **k: attempts.append(a) or real_restore(*a, **k))
    storage_round = StorageRound(config=config, store=w.store, backend=w.backend, reconciler=w.reconciler,
                                 keeper=w.reconciler.states, metrics=Metrics())
    w.store.clock.advance(config.state_retention + 60)
    budget = w.reconciler.dispose_budget
    await storage_round.dispose_removed()
    copies = Path(root) / ".backups" / "g1"
    if room_again == "short of the minimum":  # not tried: nothing archived, no removal spent
        assert attempts == [] and "g1" not in w.store.disposed and w.reconciler.dispose_budget == budget
        assert statedir.pending_restore(root, "g1") is not None
    elif room_again:  # restored, then archived: the state the replaced engine left
        [kept] = os.listdir(archive)
        assert (archive / kept / "save").read_text() == "A-format" and not copies.exists()
    else:  # nothing disposed of: the copy and what was set aside stay, and no removal was spent on it
        assert not archive.exists() or os.listdir(archive) == []
        assert statedir.pending_restore(root, "g1") is not None and "g1" not in w.store.disposed
        assert w.reconciler.dispose_budget == budget
        # Without an archive everything goes anyway: no restore is needed first.
        storage_round.config = dataclasses.replace(config, state_archive_dir=None)
        await storage_round.dispose_removed()
        assert "g1" in w.store.disposed and not copies.exists() and not save.exists()


@pytest.mark.parametrize("case", ["an older database", "no room for the marker's text"])
async def test_a_restore_that_must_be_finished_is_not_taken_for_stale(tmp_path, monkeypatch, case):
    """Review: the marker's run compared for equality gave up a restore when a database restored from an
    older backup said an earlier run (no engine had run on the directory since); and a full disk left the
    marker without its text, to be judged by this host's clock. Only a later run makes it stale, and the
    marker's time is the run's own (it needs no room)."""
    import errno
    from datetime import timedelta

    from observed import statedir
    w, rec, save = await patching(tmp_path)
    real_write = os.write

    def write(fd, data):
        if data.startswith(b"started_at="):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def no_room_for_text() -> None:
        if case == "no room for the marker's text":
            monkeypatch.setattr(statedir.os, "write", write)

    _, give_room_back = disk_full_at_the_stop(w, save, monkeypatch, JobKind.STOP, also=no_room_for_text)
    await synced_until(w, lambda r: r.converged, 6)
    give_room_back()
    monkeypatch.setattr(statedir.os, "write", real_write)
    root = w.settings.storage.state_root
    assert statedir.pending_restore(root, "g1") is not None
    if case == "an older database":
        cur = w.store.records["g1"]
        w.store.records["g1"] = cur.replace(created_at=cur.created_at - timedelta(seconds=60),
                                            started_at=cur.started_at - timedelta(seconds=30))
    await w.job(JobKind.START, "g1", IMG)
    rec = await synced_until(w, lambda r: r.converged, 6)
    assert rec.status.value == "running" and save.read_text() == "A-format"
