"""A copy of a state directory is on disk before what it stands for goes (red-team, stop 43: the archive's
resume trusted a complete-looking target after a host crash). Each copy (a replacement's copy, a restore, an
archive on another filesystem) was renamed into place, or its marker deleted, or the original deleted, with
its files' data still in the page cache: a host that lost power then had the name with empty or short files,
and nothing else. Every file and directory of the copy is now flushed (fsync) before that step, and the
directory holding the new name after it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from observed import statedir


class Journal:
    """What reached the disk, in order: ("fsync", path) and the renames and deletions the module makes."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink
        real_remove = statedir._remove

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

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
        monkeypatch.setattr(statedir.os, "rename", rename)
        monkeypatch.setattr(statedir.os, "unlink", unlink)
        monkeypatch.setattr(statedir, "_remove", remove)

    def synced_before(self, event: tuple[str, str]) -> set[str]:
        return {p for e, p in self.events[:self.events.index(event)] if e == "fsync"}


def tree(top: Path) -> set[str]:
    """Every regular file and directory under ``top``, and ``top``."""
    found = {str(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                found.add(p)
    return found


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
    synced = journal.synced_before(renamed)
    assert {p.replace(str(where / "t1"), str(tmp), 1) for p in tree(where / "t1")} <= synced
    assert ("fsync", str(where)) in journal.events[journal.events.index(renamed):]


def test_a_restore_is_on_disk_before_its_marker_goes(game, monkeypatch):
    root, state = game
    assert statedir.backup(str(root), str(state), "t1")
    (state / "status.json").write_text('{"turn": 42, "format": "new"}')
    journal = Journal(monkeypatch)
    assert statedir.restore(str(root), str(state), "t1")
    marker_gone = ("unlink", str(root / ".backups" / "g1" / "t1.restoring"))
    assert tree(state) <= journal.synced_before(marker_gone)
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
    synced = journal.synced_before(removed)
    assert {p.replace(str(target), str(target) + ".tmp", 1) for p in tree(target)} <= synced
    assert str(archive) in synced  # the new name itself
    assert (target / "engine" / "turn-41.sav").read_bytes() == b"x" * 100_000
