"""A copy of a state directory is on disk before what it stands for goes (red-team, stop 43: the archive's
resume trusted a complete-looking target after a host crash). Each copy (a replacement's copy, a restore, an
archive on another filesystem) was renamed into place, or its marker deleted, or the original deleted, with
its files' data still in the page cache: a host that lost power then had the name with empty or short files,
and nothing else. The copy, whole, is now flushed to disk (syncfs of its filesystem: one flush, not one
per file) before that step, and the directory holding the new name after it."""

from __future__ import annotations

import errno
import os

import pytest

from observed import statedir


class Journal:
    """What reached the disk, in order: ("fsync", path) of a directory, ("flush", path) of the filesystem a
    path is on (syncfs: every file written there), and the renames and deletions the module makes."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink
        real_remove, real_flush = statedir._remove, statedir._flush

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def flush(fd):
            self.events.append(("flush", os.readlink(f"/proc/self/fd/{fd}")))
            return real_flush(fd)

        def rename(src, dst, *a, **k):
            if not k.get("src_dir_fd"):
                self.events.append(("rename", os.fspath(src)))
            return real_rename(src, dst, *a, **k)

        def unlink(path, *a, **k):
            self.events.append(("unlink", os.fspath(path)))
            return real_unlink(path, *a, **k)

        def remove(path):
            self.events.append(("remove", os.fspath(path)))
            return real_remove(path)

        monkeypatch.setattr(statedir.os, "fsync", fsync)
        monkeypatch.setattr(statedir, "_flush", flush)
        monkeypatch.setattr(statedir.os, "rename", rename)
        monkeypatch.setattr(statedir.os, "unlink", unlink)
        monkeypatch.setattr(statedir, "_remove", remove)

    def synced_before(self, event: tuple[str, str]) -> set[str]:
        return {p for e, p in self.events[:self.events.index(event)] if e == "fsync"}

    def flushed_before(self, event: tuple[str, str]) -> set[str]:
        """The paths whose filesystem was flushed (after all the copy was written) before ``event``."""
        return {p for e, p in self.events[:self.events.index(event)] if e == "flush"}


@pytest.fixture
def game(tmp_path):
    root = tmp_path / "games"
    state = root / "g1"
    (state / "engine").mkdir(parents=True)
    (state / "engine" / "turn-41.sav").write_bytes(b"x" * 100_000)
    (state / "status.json").write_text('{"turn": 41}')
    return root, state


def test_a_replacements_copy_is_on_disk_before_it_takes_its_name(game, monkeypatch):
    root, state = game
    journal = Journal(monkeypatch)
    assert statedir.backup(str(root), str(state), "t1")
    where = root / ".backups" / "g1"
    tmp = where / "t1.tmp"
    renamed = ("rename", str(tmp))
    assert str(tmp) in journal.flushed_before(renamed)  # the whole copy written, then flushed, then named
    assert ("fsync", str(where)) in journal.events[journal.events.index(renamed):]


def test_a_restore_is_on_disk_before_its_marker_goes(game, monkeypatch):
    root, state = game
    assert statedir.backup(str(root), str(state), "t1")
    (state / "status.json").write_text('{"turn": 42, "format": "new"}')
    journal = Journal(monkeypatch)
    assert statedir.restore(str(root), str(state), "t1")
    marker_gone = ("unlink", str(root / ".backups" / "g1" / "t1.restoring"))
    assert str(state) in journal.flushed_before(marker_gone)
    assert (state / "status.json").read_text() == '{"turn": 41}'


def test_an_archive_on_another_filesystem_is_on_disk_before_the_directory_goes(game, tmp_path, monkeypatch):
    root, state = game
    archive = tmp_path / "archive"
    journal = Journal(monkeypatch)
    real_rename = statedir.os.rename

    def rename(src, dst, *a, **k):
        if os.fspath(src) == str(state):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(statedir.os, "rename", rename)
    assert statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z") == "archived"
    target = archive / "g1-20260101T000000Z"
    removed = ("remove", str(state))
    # review: the original is deleted on the copy's word, so every file is fsynced (syncfs tells no write error
    # before Linux 5.8, nor a FUSE archive's daemon), and an archive is not on a game's downtime
    tmp = str(target) + ".tmp"
    files = {os.path.join(dp, n).replace(str(target), tmp, 1) for dp, ds, fs in os.walk(target) for n in ds + fs}
    assert files | {tmp} <= journal.synced_before(removed)
    assert str(archive) in journal.synced_before(removed)  # the new name itself
    assert str(tmp_path) in journal.synced_before(removed)  # and the archive directory's, made by this archive
    assert (target / "engine" / "turn-41.sav").read_bytes() == b"x" * 100_000


def test_an_archive_resumed_after_a_cut_pass_puts_its_name_on_disk_before_the_original_goes(game, tmp_path,
                                                                                             monkeypatch):
    """Review, stop 44: a pass cut after the archive's rename but before its name was on disk (a kill, or the
    parent directory's fsync refused) left the next pass to delete the original with nothing flushed."""
    import shutil

    root, state = game
    archive = tmp_path / "archive"
    target = archive / "g1-20260101T000000Z"
    archive.mkdir()
    shutil.copytree(state, target)  # the earlier pass: copied and renamed, the original not deleted yet
    journal = Journal(monkeypatch)
    assert statedir.dispose(str(root), str(state), str(archive), "g1-20260101T000000Z") == "archived"
    removed = ("remove", str(state))
    assert {str(archive), str(tmp_path)} <= journal.synced_before(removed)
