"""The state directory's lifecycle: the pure decisions (desired/storage.py) and the file operations
(observed/statedir.py) on a temporary directory, a planted symlink never followed."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

import pytest

from controller.config import Settings
from controller.metrics import Metrics
from controller.storage import StateKeeper
from controller.triggers import Readiness
from desired.errors import StorageFull
from desired.model import DesiredStatus
from desired.storage import MinFree, backup_tag, disposable, keep_backup, nearly_full, needs_backup, replacing
from observed import statedir
from observed.errors import Refused
from tests.support.transition_records import T0, S, rec

GiB = 1024**3


# ------------------------------------------------------------------ fullness
@pytest.mark.parametrize("raw, expected", [
    ("0", MinFree()), ("5%", MinFree(percent=5.0)), ("2.5%", MinFree(percent=2.5)), ("10g", MinFree(bytes=10 * GiB)),
    ("512M", MinFree(bytes=512 * 1024**2)), ("1t", MinFree(bytes=1024**4)), ("4096", MinFree(bytes=4096)),
])
def test_min_free_parses_bytes_or_a_percentage(raw, expected):
    assert MinFree.parse(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "5 %", "101%", "ten", "1e9", "5%%"])
def test_min_free_refuses_anything_else(raw):
    with pytest.raises(ValueError):
        MinFree.parse(raw)


@pytest.mark.parametrize("free, total, min_free, full", [
    (10 * GiB, 100 * GiB, MinFree(percent=5), False),
    (5 * GiB, 100 * GiB, MinFree(percent=5), False),       # exactly the threshold is enough
    (5 * GiB - 1, 100 * GiB, MinFree(percent=5), True),
    (1 * GiB, 100 * GiB, MinFree(bytes=2 * GiB), True),
    (0, 100 * GiB, MinFree(), False),                      # 0: no check
    (99 * GiB, 100 * GiB, MinFree(percent=100), True),     # above any free space: every new start refused
    (0, 0, MinFree(percent=5), False),                     # a filesystem that reports no size: no verdict
])
def test_nearly_full(free, total, min_free, full):
    reason = nearly_full(free, total, min_free)
    assert (reason is not None) is full
    if full:
        assert "RTMANAGER_STATE_MIN_FREE" in reason and str(free) in reason


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("path, ok", [
    ("/r/g1", True), ("/r/g1/", True), ("/r/../g1", False), ("/r/g1/x", False), ("/r/.backups", False),
    ("/r", False), ("/etc", False), ("r/g1", False), ("/r/./g1", True), ("/rr/g1", False),
])
def test_state_paths_are_direct_children_of_the_root(path, ok):
    assert statedir.state_name_ok("/r", path) is ok


def test_a_symlink_at_the_state_path_or_a_root_elsewhere_is_refused(tmp_path):
    root = tmp_path / "games"
    root.mkdir()
    os.symlink(tmp_path, root / "g1")
    with pytest.raises(Refused, match="symlink"):
        statedir.checked(str(root), str(root / "g1"))
    with pytest.raises(Refused):
        statedir.checked(str(root), str(root / "g1" / "games" / "g2"))
    assert statedir.checked(str(root), str(root / "g2")) == str(root / "g2")


# ------------------------------------------------------------------ decisions
def replacing_record(**kw):
    base = dict(rollback_image_ref="img:1", desired_image_ref="img:2", current_container_id="0123456789abcdef")
    base.update(kw)
    return rec(S.STARTING, **base)


def test_a_copy_is_needed_when_another_image_replaces_a_running_engine():
    r = replacing_record()
    assert replacing(r) and backup_tag(r) == "0123456789ab"
    assert needs_backup(r, "img:2")
    assert not needs_backup(r, "img:1")                               # a restart on the same image
    assert not needs_backup(replacing_record(rolling_back=True, desired_image_ref="img:1"), "img:1")
    assert not needs_backup(rec(S.STARTING), "img:2")                  # a new game or a crash restart
    assert not needs_backup(rec(S.RUNNING), "img:2")
    assert not needs_backup(replacing_record(current_container_id="../../etc"), "img:2")  # no odd names


def test_only_the_copy_of_the_replacement_under_way_is_kept():
    r = replacing_record()
    assert keep_backup(r, "0123456789ab")
    assert not keep_backup(r, "fedcba987654")                         # a leftover of an earlier replacement
    assert not keep_backup(rec(S.RUNNING, current_container_id="0123456789abcdef"), "0123456789ab")  # over
    assert not keep_backup(None, "0123456789ab")


def removed(**kw):
    base = dict(current_container_id=None, removed_at=T0 + timedelta(seconds=3), desired_status=DesiredStatus.REMOVED,
                last_op_at=T0 + timedelta(seconds=3))
    base.update(kw)
    return rec(S.REMOVED, **base)


@pytest.mark.parametrize("record, after, retention, unit, ok", [
    (removed(), 3600, 60, False, True),
    (removed(), 30, 60, False, False),                     # the retention has not passed
    (removed(), 3600, 60, True, False),                    # a unit of the game exists
    (removed(), 3600, 0, False, False),                    # retention 0: kept for ever
    (None, 3600, 60, False, False),                        # no record: not provably rtmanager's
    (removed(generation=4), 3600, 60, False, False),       # not converged
    (rec(S.STOPPED), 3600, 60, False, False),              # a live game (e.g. a record restored)
    (rec(S.RUNNING), 3600, 60, False, False),
])
def test_when_a_removed_games_directory_may_go(record, after, retention, unit, ok):
    now = T0 + timedelta(seconds=3 + after)
    assert disposable(record, now=now, retention=retention, unit_exists=unit) is ok


# ------------------------------------------------------------------ files
@pytest.fixture
def world(tmp_path):
    """A state root with one game's directory holding files, a subdirectory, and symlinks planted to
    a file and a directory outside the root."""
    root = tmp_path / "games"
    state = root / "g1"
    (state / "engine").mkdir(parents=True)
    (state / "engine" / "status.json").write_text('{"turn": 1}')
    (state / "marker").write_text("old")
    os.chown(state / "marker", 65534, 65534)
    os.chmod(state / "marker", 0o640)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    os.symlink(outside / "passwd", state / "to-file")
    os.symlink(outside, state / "engine" / "to-dir")
    return root, state, outside


def untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["passwd"]
    assert (outside / "passwd").read_text() == "root:x:0:0"


def test_backup_and_restore_keep_metadata_and_never_follow_a_symlink(world):
    root, state, outside = world
    inode = os.stat(state).st_ino
    assert statedir.backup(str(root), str(state), "c1")
    assert not statedir.backup(str(root), str(state), "c1")            # once per replacement
    copy = root / ".backups" / "g1" / "c1"
    assert os.readlink(copy / "to-file") == str(outside / "passwd")   # a symlink, not the file
    assert os.readlink(copy / "engine" / "to-dir") == str(outside)
    st = os.stat(copy / "marker")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    # The new engine rewrites its state, and plants more.
    (state / "marker").write_text("new")
    (state / "new-file").write_text("x")
    os.unlink(state / "to-file")
    os.symlink("/etc", state / "to-file")
    assert statedir.restore(str(root), str(state), "c1")
    assert (state / "marker").read_text() == "old" and not (state / "new-file").exists()
    assert os.readlink(state / "to-file") == str(outside / "passwd")
    assert os.stat(state / "marker").st_uid == 65534
    assert os.stat(state).st_ino == inode                               # restored in place
    assert sorted(os.listdir(root / ".backups" / "g1")) == ["c1"]      # the copy stays until dropped
    untouched(outside)
    assert not statedir.restore(str(root), str(state), "other")       # no such copy: nothing done


def test_a_restore_cut_short_is_done_again_in_place(world, monkeypatch):
    root, state, outside = world
    inode = os.stat(state).st_ino
    statedir.backup(str(root), str(state), "c1")
    (state / "marker").write_text("new")
    (state / "new-file").write_text("x")
    where = root / ".backups" / "g1"
    calls = []

    def killed(*args, **kw):  # the kill lands while the copy is put back
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(statedir, "_copy_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        statedir.restore(str(root), str(state), "c1")
    monkeypatch.undo()
    assert calls and statedir.pending_restore(str(root), "g1") == "c1"
    assert statedir.restore(str(root), str(state), "c1")
    assert statedir.pending_restore(str(root), "g1") is None
    assert (state / "marker").read_text() == "old" and not (state / "new-file").exists()
    assert os.stat(state).st_ino == inode                               # the same directory, refilled
    assert sorted(os.listdir(where)) == ["c1"]
    untouched(outside)


def test_a_copy_cut_short_is_made_again(world):
    root, state, _ = world
    partial = root / ".backups" / "g1" / "c1.tmp"
    partial.mkdir(parents=True)
    (partial / "half").write_text("x")
    assert statedir.backup(str(root), str(state), "c1")
    assert sorted(os.listdir(root / ".backups" / "g1")) == ["c1"]
    assert not (root / ".backups" / "g1" / "c1" / "half").exists()


def test_measure_counts_the_tree_not_the_symlinks_targets(world, tmp_path):
    root, state, outside = world
    (outside / "big").write_bytes(b"x" * (1 << 20))                    # 1 MiB behind a planted symlink
    size, complete = statedir.measure(str(root), str(state))
    assert complete and 0 < size < (1 << 20)
    assert statedir.measure(str(root), str(root / "g2")) is None
    size, complete = statedir.measure(str(root), str(state), max_entries=2)
    assert not complete


def test_deletion_and_archiving_stay_inside(world, tmp_path):
    root, state, outside = world
    statedir.backup(str(root), str(state), "c1")
    assert statedir.dispose(str(root), str(state), None, "g1-x") == "deleted"
    assert not state.exists() and not (root / ".backups" / "g1").exists()
    untouched(outside)
    assert statedir.dispose(str(root), str(state), None, "g1-x") == "absent"
    with pytest.raises(Refused):
        statedir.dispose(str(root), str(root / ".." / "outside"), None, "x")
    untouched(outside)


def test_archiving_moves_the_directory(world, tmp_path):
    root, state, outside = world
    archive = tmp_path / "archive"
    assert statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z") == "archived"
    assert (archive / "g1-20260101T000000Z" / "marker").read_text() == "old"
    assert not state.exists()
    untouched(outside)


def test_directories_left_without_write_permission_are_deleted_too(world):
    root, state, outside = world
    (state / "locked" / "inner").mkdir(parents=True)
    (state / "locked" / "inner" / "f").write_text("x")
    os.chmod(state / "locked" / "inner", 0o500)
    os.chmod(state / "locked", 0o500)
    assert statedir.dispose(str(root), str(state), None, "g1-x") == "deleted"
    assert not state.exists()
    untouched(outside)


# ------------------------------------------------------------------ room, on /readyz and before a new game
async def test_a_nearly_full_filesystem_refuses_new_games_not_existing_ones_and_readyz_says_why(tmp_path):
    root = tmp_path / "games"
    (root / "g1").mkdir(parents=True)
    settings = Settings.from_env({"RTMANAGER_STATE_ROOT": str(root), "RTMANAGER_STATE_MIN_FREE": "100%"})
    metrics = Metrics()
    keeper = StateKeeper(settings, metrics)
    with pytest.raises(StorageFull, match="RTMANAGER_STATE_MIN_FREE"):
        await keeper.check_room(rec(S.STARTING, game_id="g2", state_path=str(root / "g2")))
    await keeper.check_room(rec(S.STARTING, game_id="g1", state_path=str(root / "g1")))  # exists: no room needed
    checks = await Readiness({"state_storage": keeper.readiness}, metrics, ttl=0).check()
    assert checks["state_storage"].startswith("error: StorageFull: the state root's filesystem is nearly full")
    assert metrics.state_full._value.get() == 1

    ok = StateKeeper(Settings.from_env({"RTMANAGER_STATE_ROOT": str(root), "RTMANAGER_STATE_MIN_FREE": "0"}), metrics)
    await ok.check_room(rec(S.STARTING, game_id="g2", state_path=str(root / "g2")))
    assert (await Readiness({"state_storage": ok.readiness}, metrics, ttl=0).check())["state_storage"] == "ok"


@pytest.mark.parametrize("archive, ok", [
    ("", True), ("/srv/archive", True), ("/srv/games/.archive", True), ("/srv/gamesx", True),
    ("/srv/games/archive", False), ("/srv/games", False), ("/srv/games/", False), ("relative", False),
    ("/srv/games/.backups", False), ("/srv/games/.backups/archive", False),  # where copies are dropped
])
def test_the_archive_is_never_where_a_games_directory_could_be(archive, ok):
    env = {"RTMANAGER_STATE_ROOT": "/srv/games", "RTMANAGER_STATE_ARCHIVE_DIR": archive}
    if ok:
        assert Settings.from_env(env).storage.state_archive_dir == (os.path.normpath(archive) if archive else None)
    else:
        with pytest.raises(ValueError, match="RTMANAGER_STATE_ARCHIVE_DIR"):
            Settings.from_env(env)


async def test_a_copy_cancelled_mid_way_holds_its_game_until_its_thread_ends(tmp_path, monkeypatch):
    """Red-team finding: a copy runs in a thread, which a step-down or a shutdown cannot stop; cancelling
    the coroutine let the game's lock go while the thread still copied, and the next term's copy of the
    same game ran beside it (each deletes the other's half-made copy). The lock is now held until the
    thread ends."""
    import threading

    import observed.statedir as statedir_module

    root = tmp_path / "games"
    (root / "g1").mkdir(parents=True)
    keeper = StateKeeper(Settings.from_env({"RTMANAGER_STATE_ROOT": str(root)}), Metrics())
    release, started, running, most = threading.Event(), threading.Event(), [], []

    def slow_backup(state_root, state_path, tag):
        running.append(tag)
        started.set()
        most.append(len(running))
        release.wait(10)
        running.remove(tag)
        return True

    monkeypatch.setattr(statedir_module, "backup", slow_backup)
    record = rec(S.STARTING, game_id="g1", state_path=str(root / "g1"), current_container_id="a" * 64,
                 rollback_image_ref="galaxy/engine-stub:1.0")
    first = asyncio.create_task(keeper.backup(record))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        first.cancel()  # the term ended
        second = asyncio.create_task(keeper.backup(record))  # the next term's copy of the same game
        await asyncio.sleep(0.2)
        assert running == ["a" * 12] and not second.done()
    finally:
        release.set()
    await asyncio.wait_for(second, 10)
    with pytest.raises(asyncio.CancelledError):
        await first
    assert max(most) == 1


async def test_a_cancelled_file_operation_that_fails_is_still_a_cancellation():
    """Review: a caller cancelled while its thread ran got the thread's error instead (a Refused, caught and
    carried on with after its term had ended)."""
    import threading

    from controller.storage import in_thread

    release = threading.Event()

    def fails():
        release.wait(10)
        raise Refused("the directory went odd")

    task = asyncio.create_task(in_thread(fails))
    await asyncio.sleep(0.05)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_file_operation_waits_for_its_thread_only_so_long(monkeypatch):
    """Review: a step-down or a shutdown waited for a hung file operation (an NFS mount gone) for ever."""
    import threading

    import controller.storage as storage_module

    monkeypatch.setattr(storage_module, "CANCEL_WAIT", 0.2)
    release = threading.Event()
    task = asyncio.create_task(storage_module.in_thread(release.wait, 30))
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        release.set()


def _across_filesystems(monkeypatch, state: Path) -> None:
    """os.rename of the game's directory fails with EXDEV, as into an archive on another filesystem."""
    import errno
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.fspath(src) == str(state):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(statedir.os, "rename", rename)


def test_an_archive_filesystem_that_fills_up_keeps_no_partial_copy_and_says_which(world, tmp_path, monkeypatch):
    """Red-team, stop 43: a copy into an archive on another filesystem that ran out of room left its partial
    .tmp there (every storage round then filled that filesystem again), and the error blamed the state
    root's filesystem."""
    import errno

    root, state, outside = world
    archive = tmp_path / "archive"
    _across_filesystems(monkeypatch, state)
    real_copy = statedir._copy_tree

    def full(src, dst, **kw):
        real_copy(src, dst, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statedir, "_copy_tree", full)
    with pytest.raises(statedir.NoSpace, match="archive"):
        statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z")
    assert os.listdir(archive) == [] and (state / "marker").read_text() == "old"


def test_an_archive_of_a_tree_too_deep_keeps_no_partial_copy(world, tmp_path, monkeypatch):
    """Review: only an OSError removed the partial copy; a tree deeper than the copy goes (an engine can make
    one) left it, and every round copied it again."""
    root, state, outside = world
    archive = tmp_path / "archive"
    _across_filesystems(monkeypatch, state)
    real_copy = statedir._copy_tree

    def too_deep(src, dst, **kw):
        real_copy(src, dst, **kw)
        raise Refused("too deep")

    monkeypatch.setattr(statedir, "_copy_tree", too_deep)
    with pytest.raises(Refused):
        statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z")
    assert os.listdir(archive) == [] and (state / "marker").read_text() == "old"


def test_an_archive_a_kill_cut_before_the_source_was_deleted_is_finished(world, tmp_path, monkeypatch):
    """Red-team, stop 43: a kill after the complete copy was renamed into place and before the game's
    directory was deleted made every later round refuse the disposal ("cannot archive"): the record was
    never marked disposed and the half-deleted directory stayed."""
    root, state, outside = world
    archive = tmp_path / "archive"
    _across_filesystems(monkeypatch, state)
    real_remove = statedir._remove
    cut = []

    def killed(path):
        if os.fspath(path) == str(state) and not cut:
            cut.append(1)
            (state / "marker").unlink()  # half deleted, then the kill
            raise KeyboardInterrupt
        return real_remove(path)

    monkeypatch.setattr(statedir, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z")
    assert statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z") == "archived"
    assert not state.exists() and (archive / "g1-20260101T000000Z" / "marker").read_text() == "old"
    untouched(outside)
