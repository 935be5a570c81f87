"""State directories on the host's filesystem: copy, restore, delete, archive and measure them.

Blocking calls (run them in a thread). Every path is checked to be a game's directory directly
under the state root (resolved, and not a symlink), and every walk goes from directory file
descriptors opened with O_NOFOLLOW: an engine can write anything into its state directory,
symlinks to /etc included, and nothing here follows one or touches anything outside the root.
Symlinks are copied as symlinks; ownership, mode and times are kept (the engine runs as a
configured uid). Devices, sockets and fifos are not copied.

Layout under the state root ``R`` (no game_id starts with a dot):

    R/GAME                       the state directory, bind-mounted into the engine
    R/.backups/GAME/TAG          the copy taken before a replacement (TAG: the old container)
    R/.backups/GAME/TAG.tmp      a copy being made (renamed to TAG once complete)
    R/.backups/GAME/TAG.restoring  a restore from TAG under way (R/GAME is emptied, then filled
                                   from the copy; the marker goes once it is whole)
    R/.backups/GAME/replaced     what a restore moved out of R/GAME (deleted next)
    R/.rtmanager-instance        the instance the root belongs to (``claim_root``)

OSError is translated here: no space left -> ``NoSpace``; anything else -> ``Refused``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import TracebackType

from observed.errors import Refused, StateBusy

log = logging.getLogger("rtmanager.statedir")

BACKUPS = ".backups"
LOCKS = ".locks"  # R/.locks/GAME: the file a game's file operations hold locked (``exclusive``)
OWNER = ".rtmanager-instance"
MAX_DEPTH = 128             # directories deeper than this are refused (copy) or not counted (size)
MEASURE_MAX_ENTRIES = 200_000  # entries one measure looks at, at most: the size is then a lower bound
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NoSpace(Refused):
    """The filesystem of the state root is full."""


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except Refused:
        raise
    except RecursionError as exc:
        raise Refused(f"{what}: too deep") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"{what}: no space left on the state root's filesystem") from exc
        raise Refused(f"{what}: {exc.strerror or exc}") from exc


def state_name_ok(root: str, path: str) -> bool:
    """``path`` is ``root``/NAME (both absolute, normalised): no deeper, no ``..``, and NAME is not one
    of the root's own directories (``.backups``; no game_id starts with a dot)."""
    if not os.path.isabs(root) or not os.path.isabs(path):
        return False
    root, path = os.path.normpath(root), os.path.normpath(path)
    parent, name = os.path.split(path)
    return parent == root and bool(name) and not name.startswith(".")


def checked(root: str, path: str) -> str:
    """``path`` as a game's directory directly under the (resolved) state root; Refused otherwise.
    The path itself may not exist; if it does, it must not be a symlink."""
    real_root = os.path.realpath(root)
    path = os.path.abspath(path)
    if not state_name_ok(os.path.abspath(root), path):
        raise Refused(f"state path {path} is not a game's directory directly under {root}")
    inside = os.path.join(real_root, os.path.basename(path))
    if os.path.realpath(os.path.dirname(path)) != real_root:
        raise Refused(f"state path {path} resolves outside {real_root}")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(inside).st_mode):
            raise Refused(f"state path {path} is a symlink")
    return inside


def _real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    """Delete a tree without following a symlink in it (shutil.rmtree is fd-based on Linux); a
    symlink or file at ``path`` itself is unlinked, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        assert shutil.rmtree.avoids_symlink_attacks
        shutil.rmtree(path, onerror=_writable_and_again)
    else:
        os.unlink(path)


def _writable_and_again(func: Callable[..., object], path: str,
                        exc_info: tuple[type[BaseException], BaseException, TracebackType]) -> None:
    """An engine may leave a directory without write permission (0500): when rtmanager is not root
    its entries cannot be deleted until the directory is made writable for its owner again."""
    exc = exc_info[1]
    if not isinstance(exc, PermissionError) or func not in (os.unlink, os.rmdir, os.open, os.scandir, os.lstat):
        raise exc
    parent = path if func in (os.open, os.scandir) else os.path.dirname(path)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o700 == 0o700:
        raise exc  # not a permission of the owner's that can be given back
    os.chmod(parent, 0o700)
    if func in (os.unlink, os.rmdir):
        func(path)
    else:
        shutil.rmtree(path, onerror=_writable_and_again)


def _own(path_or_fd: int | str, st: os.stat_result, *, dir_fd: int | None = None, link: bool = False) -> None:
    """Ownership, then mode and times, as ``st`` says (chown first: it clears setuid bits)."""
    try:
        if link:
            os.chown(path_or_fd, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.chown(path_or_fd, st.st_uid, st.st_gid)
    except PermissionError:
        if st.st_uid != os.getuid():
            raise
    if link:
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(path_or_fd, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        return
    os.chmod(path_or_fd, stat.S_IMODE(st.st_mode))
    os.utime(path_or_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir(src: int, dst: int, depth: int, each: bool = False) -> None:
    """Copy the entries of directory ``src`` into the empty directory ``dst`` (both fds). The caller flushes the
    copy to disk (``_flush``; or ``each``: every file and directory fsynced as it is written) before it gives
    it its name or deletes the state it copies: a host that loses power must not find a complete-looking copy
    of empty files."""
    if depth > MAX_DEPTH:
        raise Refused(f"the state directory is more than {MAX_DEPTH} directories deep")
    with os.scandir(src) as it:
        names = [e.name for e in it]
    for name in names:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            s = os.open(name, _DIR, dir_fd=src)
            try:
                d = os.open(name, _DIR, dir_fd=dst)
                try:
                    _copy_dir(s, d, depth + 1, each)
                    _own(d, st)
                    if each:
                        os.fsync(d)
                finally:
                    os.close(d)
            finally:
                os.close(s)
        elif stat.S_ISREG(st.st_mode):
            s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
            try:
                d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                            dir_fd=dst)
                try:
                    while os.sendfile(d, s, None, 1 << 24):
                        pass
                    _own(d, st)
                    if each:
                        os.fsync(d)
                finally:
                    os.close(d)
            finally:
                os.close(s)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            _own(name, st, dir_fd=dst, link=True)
        else:
            log.warning("state directory: not copying %s (neither a file, a directory nor a symlink)", name)


_libc = ctypes.CDLL(None, use_errno=True)


def _flush(fd: int) -> None:
    """Everything written on the filesystem of ``fd`` on disk: one syncfs(2) for a whole copy (a copy's files
    and directories, then its name or the deletion that gives it its meaning), where an fsync per file cost a
    journal commit each (8 times the copy's time for 2,000 small files), while the game is down."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:  # not glibc: every filesystem
        os.sync()
        return
    if syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sync_dir(path: str) -> None:
    """The directory's entries (a name just given) on disk."""
    fd = os.open(path, _DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _archive_named(target: str) -> None:
    """The archive ``target``'s name on disk: its directory's entries, and that directory's in its parent (the
    first archive made it); the parent's only as far as this process may open it."""
    _sync_dir(os.path.dirname(target))
    with contextlib.suppress(PermissionError):
        _sync_dir(os.path.dirname(os.path.dirname(target)))


def _copy_tree(source: str, target: str, each: bool = False) -> None:
    """``source`` (a real directory) to the new directory ``target``, with its metadata, on disk (``_copy_dir``)."""
    s = os.open(source, _DIR)
    try:
        st = os.fstat(s)
        os.mkdir(target, 0o700)
        d = os.open(target, _DIR)
        try:
            _copy_dir(s, d, 0, each)
            _own(d, st)
            if each:
                os.fsync(d)
            else:
                _flush(d)
        finally:
            os.close(d)
    finally:
        os.close(s)


def _backup_dir(root: str, game: str) -> str:
    """R/.backups/GAME, made 0700 (never through a symlink)."""
    real_root = os.path.realpath(root)
    backups = os.path.join(real_root, BACKUPS)
    where = os.path.join(backups, game)
    for d in (backups, where):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        if not _real_dir(d):
            raise Refused(f"{d} is not a directory")
    return where


_held = threading.local()  # the games this thread holds (``exclusive``): an operation within another takes none


@contextlib.contextmanager
def exclusive(root: str, game: str) -> Iterator[None]:
    """Hold ``game``'s state directory and copies against every other process on this state root (and every
    other thread of this one) for the operation in the block: a flock on R/.locks/GAME, which the kernel
    lets go of when the process dies. Held elsewhere: ``StateBusy`` at once, nothing touched. A leader that
    lost its term without dying (a fail-over, a paused process) keeps its file threads running while the
    next leader works: without it, both would archive, restore or copy one game at once."""
    real_root = os.path.realpath(root)
    if not state_name_ok(real_root, os.path.join(real_root, game)):
        raise Refused(f"not a game: {game}")
    games: set[str] = _held.__dict__.setdefault("games", set())
    if game in games:  # this thread holds it already (an operation made of others)
        yield
        return
    path = os.path.join(real_root, LOCKS, game)
    for _ in range(3):
        with _translated(f"lock of {game}'s state directory"):
            locks = os.path.dirname(path)
            with contextlib.suppress(FileExistsError):
                os.mkdir(locks, 0o700)
            if not _real_dir(locks):
                raise Refused(f"{locks} is not a directory")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            named = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except BlockingIOError:
            os.close(fd)
            raise StateBusy(f"the state directory of {game} is busy: another process's file operation holds "
                            "it (a replica that lost its leadership, still finishing)") from None
        except FileNotFoundError:
            named = False
        except OSError as exc:
            os.close(fd)
            raise Refused(f"lock of {game}'s state directory: {exc.strerror or exc}") from exc
        if named:
            break
        os.close(fd)  # the file was deleted (``_drop_lock``) after it was opened here: lock the one named now
    else:
        raise StateBusy(f"the lock of {game}'s state directory keeps being replaced")
    try:
        games.add(game)
        try:
            yield
        finally:
            games.discard(game)
    finally:
        os.close(fd)  # lets go of the lock


def _drop_lock(root: str, game: str) -> None:
    """Delete R/.locks/GAME, held by the caller (a disposal, the game's last file operation): a process that
    opened it before locks a file no longer named, sees it (``exclusive``) and locks the one named then."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(os.path.realpath(root), LOCKS, game))


def backup(root: str, path: str, tag: str) -> bool:
    """Copy the state directory to R/.backups/GAME/TAG (via TAG.tmp, renamed once complete).
    False when that copy exists already (a repeated call after a crash keeps the first copy)."""
    with _translated(f"copy of {path}"):
        path = checked(root, path)
    with exclusive(root, os.path.basename(path)), _translated(f"copy of {path}"):
        where = _backup_dir(root, os.path.basename(path))
        final, tmp = os.path.join(where, tag), os.path.join(where, tag + ".tmp")
        if _real_dir(final):
            return False
        _remove(tmp)  # a copy a crash cut short
        if not _real_dir(path):
            return False  # nothing to keep
        try:
            _copy_tree(path, tmp)
            os.rename(tmp, final)
            _sync_dir(where)
        except BaseException:
            with contextlib.suppress(OSError):
                _remove(tmp)
            raise
        return True


def drop_partial_backup(root: str, path: str, tag: str) -> bool:
    """Delete R/.backups/GAME/TAG.tmp, a copy a kill cut short (``backup`` deletes it first anyway): its
    room is free again before the next copy's room is measured. True when there was one."""
    with _translated(f"partial copy of {path}"):
        path = checked(root, path)
    with exclusive(root, os.path.basename(path)), _translated(f"partial copy of {path}"):
        tmp = os.path.join(os.path.realpath(root), BACKUPS, os.path.basename(path), tag + ".tmp")
        if not os.path.lexists(tmp):
            return False
        _remove(tmp)
        return True


RESTORING = ".restoring"  # R/.backups/GAME/TAG.restoring: a restore from TAG begun and not finished


def pending_restore(root: str, game: str) -> str | None:
    """The copy a restore was begun from and not finished (a kill), or None."""
    where = os.path.join(os.path.realpath(root), BACKUPS, game)
    with _translated(f"look at the copies of {game}"):
        if not _real_dir(where):
            return None
        for name in sorted(os.listdir(where)):
            if name.endswith(RESTORING) and _real_dir(os.path.join(where, name.removesuffix(RESTORING))):
                return name.removesuffix(RESTORING)
    return None


def marker_text(run_started: datetime | None) -> str:
    return f"started_at={run_started.isoformat() if run_started is not None else 'none'}"


def restore_marker(root: str, game: str, tag: str) -> tuple[str, datetime] | None:
    """The marker of the restore from TAG: what the restore wrote in it (``marker_text``; empty for a marker
    an earlier version made, or one a full disk left empty) and its time (the run it is for, or for a
    marker of an earlier version the time it was made, on this host's clock); None when there is none."""
    with _translated(f"look at the copies of {game}"):
        marker = os.path.join(os.path.realpath(root), BACKUPS, game, tag + RESTORING)
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            content = f.read(200).decode("utf-8", "replace").strip()
            begun = datetime.fromtimestamp(os.fstat(f.fileno()).st_mtime, UTC)
        return content, begun


def give_up_restore(root: str, game: str, tag: str) -> None:
    """Delete the marker of a restore begun from TAG: it is not to be finished (the copy stays)."""
    if not state_name_ok(os.path.abspath(root), os.path.join(os.path.abspath(root), game)) or os.sep in tag:
        raise Refused(f"not a copy: {game}/{tag}")
    with exclusive(root, game), _translated(f"the restore of {game}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(os.path.realpath(root), BACKUPS, game, tag + RESTORING))


def restore(root: str, path: str, tag: str, run_started: datetime | None = None) -> bool:
    """Put the content of the copy R/.backups/GAME/TAG back into the state directory, in place (the
    directory keeps its inode: whatever holds it, a bind mount, a quota, keeps working). A marker
    (TAG.restoring) says a restore is under way: one cut short is done again, from the copy, before
    the game's next engine is created, whatever the game is asked for meanwhile. The copy stays.
    False when there is no such copy."""
    with _translated(f"restore of {path}"):
        path = checked(root, path)
    with exclusive(root, os.path.basename(path)), _translated(f"restore of {path}"):
        where = os.path.join(os.path.realpath(root), BACKUPS, os.path.basename(path))
        copy = os.path.join(where, tag)
        if not _real_dir(copy):
            return False
        marker = os.path.join(where, tag + RESTORING)
        try:  # a restore done again keeps the marker (and what it says) of the first attempt
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            # Which engine run the restore is for (``run_started``: when the record's last engine answered
            # healthy, the database's clock): in the marker's time, which needs no room on a full disk, and
            # in its content when there is room for it.
            try:
                with contextlib.suppress(OSError):
                    os.write(fd, marker_text(run_started).encode())
                    os.fsync(fd)
                if run_started is not None:
                    os.utime(fd, (run_started.timestamp(), run_started.timestamp()))
            finally:
                os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        trash = os.path.join(where, "replaced")
        _remove(trash)
        os.mkdir(trash, 0o700)
        top = os.open(path, _DIR)  # O_NOFOLLOW: checked() refused a symlink; one planted since fails here
        try:
            t = os.open(trash, _DIR)
            try:
                with os.scandir(top) as it:
                    names = [e.name for e in it]
                for name in names:  # out of the way first: a rename never follows a symlink
                    os.rename(name, name, src_dir_fd=top, dst_dir_fd=t)
            finally:
                os.close(t)
            src = os.open(copy, _DIR)
            try:
                _copy_dir(src, top, 0)
                _own(top, os.fstat(src))
                _flush(top)  # on disk before the marker goes: a host crash then finds the restore to do again
            finally:
                os.close(src)
        finally:
            os.close(top)
        os.unlink(marker)
        _remove(trash)
        return True


def claim_root(root: str, instance: str) -> str | None:
    """The instance the state root belongs to, claimed for ``instance`` when it has none yet (the root
    made, 0711, when missing); None when the claim can be neither read nor written (a root this
    process may not write: the start goes on, as before there were claims). Two instances on one
    root would give their games of one id one directory."""
    path = os.path.join(os.path.abspath(root), OWNER)
    try:
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return os.read(fd, 256).decode(errors="replace").strip() or None
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot read %s (%s): the state root's instance is not checked", path, exc)
            return None
    except OSError as exc:
        log.warning("cannot write %s (%s): the state root is not claimed for instance %s", path, exc, instance)
        return None
    try:
        os.write(fd, f"{instance}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return instance


def backups(root: str) -> dict[str, list[str]]:
    """GAME -> the names under R/.backups/GAME."""
    found: dict[str, list[str]] = {}
    base = os.path.join(os.path.realpath(root), BACKUPS)
    with _translated("list of the copies"):
        if not _real_dir(base):
            return found
        for game in os.listdir(base):
            if _real_dir(os.path.join(base, game)):
                found[game] = sorted(os.listdir(os.path.join(base, game)))
    return found


def drop_backup(root: str, game: str, name: str | None = None) -> None:
    """Delete R/.backups/GAME/NAME (every copy of the game when NAME is None)."""
    if not state_name_ok(os.path.abspath(root), os.path.join(os.path.abspath(root), game)):
        raise Refused(f"not a game: {game}")
    if name is not None and (os.sep in name or name in ("", ".", "..")):
        raise Refused(f"not a copy: {name}")
    with exclusive(root, game), _translated(f"deletion of the copy of {game}"):
        where = os.path.join(os.path.realpath(root), BACKUPS, game)
        _remove(where if name is None else os.path.join(where, name))


def dispose(root: str, path: str, archive_dir: str | None, archive_name: str) -> str:
    """Delete a removed game's state directory, or move it to ``archive_dir``/``archive_name``.
    Returns what was done: deleted, archived or absent."""
    with _translated(f"disposal of {path}"):
        path = checked(root, path)
    with exclusive(root, os.path.basename(path)), _translated(f"disposal of {path}"):
        game = os.path.basename(path)
        if archive_dir and pending_restore(root, game) is not None:  # the copy is the state owed: the caller
            raise Refused(f"a restore of {path} is pending: not archived, its copy is kept")  # finishes it first
        if not os.path.lexists(path):
            drop_backup(root, game)
            _drop_lock(root, game)
            return "absent"
        if archive_dir:
            os.makedirs(archive_dir, 0o700, exist_ok=True)
            target = os.path.join(os.path.realpath(archive_dir), archive_name)
            if os.path.dirname(target) != os.path.realpath(archive_dir):
                raise Refused(f"cannot archive {path} as {target}")
            if os.path.lexists(target):
                # The copy across filesystems is renamed to its name only once complete: a target of this
                # game's removal (its name has the removal's time) with the directory still here is one whose
                # deletion a kill cut. Anything else under that name is not ours to judge.
                if not (_real_dir(target) and not os.path.lexists(target + ".tmp")):
                    raise Refused(f"cannot archive {path} as {target}")
                _archive_named(target)  # its name on disk (a pass cut before that was told) before the original goes
                _remove(path)
            else:
                try:
                    os.rename(path, target)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    tmp = target + ".tmp"
                    _remove(tmp)
                    try:
                        # Each file fsynced (its errors reported whatever the kernel; a FUSE archive told):
                        # the original is deleted on its word, and an archive is not on a game's downtime.
                        _copy_tree(path, tmp, each=True)
                    except Exception as copy_exc:  # the archive's filesystem full, a tree too deep: no partial copy
                        with contextlib.suppress(OSError, RecursionError):
                            _remove(tmp)
                        if isinstance(copy_exc, OSError) and copy_exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise NoSpace(f"archive of {path} in {archive_dir}: no space left on the archive's "
                                          "filesystem") from copy_exc
                        raise
                    os.rename(tmp, target)
                    _archive_named(target)  # the copy under its name on disk before the original goes
                    _remove(path)
            done = "archived"
        else:
            _remove(path)
            done = "deleted"
        drop_backup(root, game)
        _drop_lock(root, game)
        return done


def measure(root: str, path: str, max_entries: int = MEASURE_MAX_ENTRIES) -> tuple[int, bool] | None:
    """(bytes the state directory uses on disk, whether every entry was counted), or None when it
    does not exist. Each inode counts once; symlinks count as themselves, never their targets."""
    with _translated(f"size of {path}"):
        return _size(checked(root, path), max_entries)


def measure_copy(root: str, game: str, tag: str) -> int | None:
    """Bytes the copy R/.backups/GAME/TAG uses on disk (what restoring it needs), None when there is none."""
    if not state_name_ok(os.path.abspath(root), os.path.join(os.path.abspath(root), game)) or os.sep in tag \
            or tag in ("", ".", ".."):
        raise Refused(f"not a copy: {game}/{tag}")
    with _translated(f"size of the copy {game}/{tag}"):
        found = _size(os.path.join(os.path.realpath(root), BACKUPS, game, tag), MEASURE_MAX_ENTRIES)
        return None if found is None else found[0]


def _size(path: str, max_entries: int) -> tuple[int, bool] | None:
    """(bytes the tree at ``path`` uses on disk, whether every entry was counted); None when it is not there."""
    try:
        top = os.open(path, _DIR)
    except FileNotFoundError:
        return None
    seen: set[tuple[int, int]] = set()
    total, entries, complete = 0, 0, True
    stack: list[tuple[int, int]] = [(top, 0)]
    try:
        st = os.fstat(top)
        total += st.st_blocks * 512
        while stack:
            fd, depth = stack.pop()
            try:
                with os.scandir(fd) as it:
                    names = [e.name for e in it]
                for name in names:
                    entries += 1
                    if entries > max_entries:
                        complete = False
                        break
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # the engine deleted it meanwhile
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        if depth >= MAX_DEPTH:
                            complete = False
                            continue
                        try:
                            stack.append((os.open(name, _DIR, dir_fd=fd), depth + 1))
                        except (FileNotFoundError, NotADirectoryError, OSError):
                            continue  # replaced by a symlink or removed meanwhile: not followed
            finally:
                os.close(fd)
            if not complete and entries > max_entries:
                break
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total, complete


def free_space(root: str) -> tuple[int, int]:
    """(bytes an unprivileged writer may still use, the filesystem's size) of the state root's
    filesystem (the root itself, or its nearest existing parent)."""
    with _translated(f"free space of {root}"):
        where = os.path.abspath(root)
        while not os.path.exists(where) and os.path.dirname(where) != where:
            where = os.path.dirname(where)
        st = os.statvfs(where)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def exists(root: str, path: str) -> bool:
    with _translated(f"look at {path}"):
        return _real_dir(checked(root, path))
