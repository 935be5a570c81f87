"""The lifecycle of the games' state directories, on the leader.

* ``StateKeeper``: what the reconciler does to a state directory around an engine's start: the
  copy taken before a job replaces a running engine with another image (after the old engine
  stopped, before the new one is created), its restore when that job rolls back, its deletion once
  an engine of the game is healthy again, and the room check before a new game's directory is
  made. The file operations (observed/statedir.py) run in threads, one at a time per game.
* ``StorageRound``: every RTMANAGER_STATE_SCAN_INTERVAL, the free space of the state root's
  filesystem (/readyz, metrics), the size of every live game's directory (a bounded walk, in a
  thread), leftover copies of finished replacements, and the directories of games removed more
  than RTMANAGER_STATE_RETENTION ago (deleted or archived; rationed by the removal budget, never
  while a unit of the game exists).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from controller.config import Settings, StorageSettings
from controller.metrics import Metrics, one_round
from desired import storage
from desired.errors import DockerUnavailable, StorageFull
from desired.leader import Fenced
from desired.model import RuntimeRecord, Status, container_name
from desired.ports import StorageStore
from observed import statedir
from observed.backend import RuntimeBackend
from observed.errors import BackendUnavailable, ObservedError, Refused, StateBusy

if TYPE_CHECKING:
    from controller.reconciler import Reconciler

log = logging.getLogger("rtmanager.storage")
_T = TypeVar("_T")
CANCEL_WAIT = 60.0  # seconds a cancelled file operation is waited for (in_thread)
# The threads of the file work on the state directories: a pool of their own, never asyncio's default one, which
# also resolves host names (asyncpg's connects, the lease's after a blip; aiohttp's engines probed by name): a
# burst of copies must not hold a reconnect until a copy ends.
FILE_THREADS = 8
_files = concurrent.futures.ThreadPoolExecutor(max_workers=FILE_THREADS, thread_name_prefix="statedir")


async def on_files(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a thread of the file pool."""
    return await asyncio.get_running_loop().run_in_executor(_files, functools.partial(fn, *args))


async def in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a thread, as ``asyncio.to_thread``; but a caller cancelled meanwhile (a step-down, a
    shutdown) still waits for the thread to end, up to CANCEL_WAIT seconds, before it raises CancelledError
    (whatever the thread did): a thread cannot be stopped, and the game's lock (``StateKeeper.locked``)
    must not let the next copy or restore of the game run beside it. A thread hung longer than that (a
    filesystem gone) is left behind, logged, rather than holding the step-down for ever."""
    task = asyncio.ensure_future(on_files(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done() and task.cancelled():
            raise
    # Cancelled while the thread runs: wait for it (bounded), then let the cancellation through.
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT
    while not task.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.error("a file operation of the state directories (%s) outlived its cancellation by %gs; left "
                      "running in its thread", getattr(fn, "__name__", fn), CANCEL_WAIT)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its end, whatever it is, is not news
            break
        try:
            await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            pass  # cancelled again: still waiting for the thread
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise asyncio.CancelledError from task.exception()
    raise asyncio.CancelledError


DISPOSE_BATCH = 100  # removed games looked at per round: a page of them, the next round the page after it


# How much later than a restore's marker an engine's healthy start must be to make the restore stale (the
# marker's time is this host's clock, the record's the database's: measured apart, usually well under this).
STALE_RESTORE_SLACK = timedelta(seconds=10)


def marker_run(said: str) -> tuple[bool, datetime | None]:
    """(whether the marker says it, the run it says) from a restore marker's text (``statedir.marker_text``)."""
    if not said.startswith("started_at="):
        return False, None
    value = said.removeprefix("started_at=")
    if value == "none":
        return True, None
    try:
        return True, datetime.fromisoformat(value)
    except ValueError:
        return False, None


class StateKeeper:
    def __init__(self, settings: Settings, metrics: Metrics,
                 note: Callable[[RuntimeRecord, str, str], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        # Writes a restore in the operation log before it is done (the store's note_state_restore), but for a
        # rollback's, noted with the rollback.
        self.note = note
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def locked(self, game_id: str) -> AsyncIterator[None]:
        """One file operation at a time on a game's directory and copies (reconciler and round)."""
        lock, users = self._locks.get(game_id) or (asyncio.Lock(), 0)
        self._locks[game_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[game_id]
            if users <= 1:
                del self._locks[game_id]
            else:
                self._locks[game_id] = (lock, users - 1)

    @property
    def root(self) -> str:
        return self.settings.storage.state_root

    async def backup(self, record: RuntimeRecord) -> None:
        """The copy of the state the engine being replaced left (once per replacement)."""
        tag = storage.backup_tag(record)
        if tag is None:
            return
        async with self.locked(record.game_id):
            if await in_thread(statedir.backup, self.root, record.state_path, tag):
                self.metrics.state_copies.labels("taken").inc()
                log.info("copied the state directory before replacing its engine",
                         extra={"game_id": record.game_id, "copy": tag})

    async def _pending(self, record: RuntimeRecord) -> str | None:
        """The copy a restore of the game's directory was begun from and not finished, or None. None too when
        an engine of the game answered healthy after that restore began (``started_at``: an engine started
        outside rtmanager, or by a version that did not finish such restores): the directory holds what that
        engine wrote since, newer than the copy, so the restore is given up (its marker deleted; the copy is
        left to the usual rules), said as an error."""
        tag = await on_files(statedir.pending_restore, self.root, record.game_id)
        if tag is None:
            return tag
        marker = await on_files(statedir.restore_marker, self.root, record.game_id, tag)
        if marker is None:
            return tag
        said, begun = marker
        known, run = marker_run(said)
        if known:  # the engine run the restore was for (the database's clock on both sides)
            # Only a LATER healthy start makes it stale: a database restored from an older backup says an
            # earlier one, and no engine ran on the directory since.
            stale = record.started_at is not None and (run is None or record.started_at > run)
        else:  # no text (a full disk, an earlier version): its time, ours or, from an earlier version, the host's
            stale = record.started_at is not None and record.started_at > begun + STALE_RESTORE_SLACK
        if not stale:
            return tag
        log.error("a restore of the state directory from copy %s begun at %s was never finished, and an engine of "
                  "the game has run healthy since (from %s): its state is newer than the copy; the restore is given "
                  "up", tag, begun.isoformat(), record.started_at.isoformat() if record.started_at else "?",
                  extra={"game_id": record.game_id, "copy": tag})
        await in_thread(statedir.give_up_restore, self.root, record.game_id, tag)
        return None

    async def restore(self, record: RuntimeRecord, image: str) -> None:
        """Before a game's engine of ``image`` is created: a restore a kill cut short is finished first,
        whatever the game is asked for now; the replaced image, started again (a rollback, or a job that
        asked for it during the replacement), gets the state directory as its engine left it (when a copy
        was taken)."""
        async with self.locked(record.game_id):
            tag = await self._pending(record)
            if tag is None and storage.restores(record, image):
                tag = storage.backup_tag(record)
                if tag is not None and not record.rolling_back:
                    await self._noted(record, tag, f"{image}, the image the replacement replaced, was asked for again")
            if tag is None:
                return
            if await in_thread(statedir.restore, self.root, record.state_path, tag, record.started_at):
                self.metrics.state_copies.labels("restored").inc()
                log.warning("restored the state directory the replaced engine left",
                            extra={"game_id": record.game_id, "copy": tag})

    async def restore_at_stop(self, record: RuntimeRecord, runs_replaced: bool) -> None:
        """The game is stopped while a replacement is under way (``storage.restores_at_stop``; ``runs_replaced``:
        the unit stopped is the replaced image's own): the state directory gets the copy back, as the replaced
        engine left it."""
        if not storage.restores_at_stop(record, runs_replaced):
            return
        tag = storage.backup_tag(record)
        assert tag is not None
        async with self.locked(record.game_id):
            await self._noted(record, tag, "the game was stopped before the replacement's engine answered")
            try:
                restored = await in_thread(statedir.restore, self.root, record.state_path, tag, record.started_at)
            except StateBusy:
                raise  # nothing begun (no marker): the step is tried again, not left to a restore that is not pending
            except ObservedError as exc:  # the stop goes on; the restore stays pending (its marker, its copy)
                log.error("the replacement was stopped before its engine answered, and the state directory could "
                          "not be restored from the copy: %s; the restore is pending, finished before an engine "
                          "of the game starts again (or before its directory is disposed of)", exc.message,
                          extra={"game_id": record.game_id, "copy": tag})
                return
            if restored:
                self.metrics.state_copies.labels("restored").inc()
                log.warning("the replacement was stopped before its engine answered: restored the state directory "
                            "the replaced engine left", extra={"game_id": record.game_id, "copy": tag})

    async def _noted(self, record: RuntimeRecord, tag: str, why: str) -> None:
        """The restore about to be done, in the operation log, when there is a copy to restore."""
        if self.note is None:
            return
        if tag in (await on_files(statedir.backups, self.root)).get(record.game_id, ()):
            await self.note(record, tag, why)

    async def finish_restore(self, record: RuntimeRecord) -> None:
        """Before a stopped unit of the game starts again: a restore begun and not finished (a kill, or one
        that failed, the disk full) is finished first. Only a new unit's start did it before (``restore``),
        so an engine started again on its unit ran on a half-restored directory."""
        async with self.locked(record.game_id):
            await self.finish_restore_locked(record)

    async def finish_restore_locked(self, record: RuntimeRecord, *, room: bool = False) -> None:
        """``finish_restore`` with the game's lock already held (the storage round's disposal). ``room``: only
        when putting the copy back leaves RTMANAGER_STATE_MIN_FREE (StorageFull otherwise): the engines of
        running games need that room more than a removed game's archive needs its restore."""
        tag = await self._pending(record)
        if tag is not None and room:
            size = await in_thread(statedir.measure_copy, self.root, record.game_id, tag)
            free, total = await on_files(statedir.free_space, self.root)
            reason = storage.copy_refused(free, total, size or 0, self.settings.storage.state_min_free)
            if reason:
                raise StorageFull(reason)
        if tag is not None and await in_thread(statedir.restore, self.root, record.state_path, tag,
                                               record.started_at):
            self.metrics.state_copies.labels("restored").inc()
            log.warning("finished a restore of the state directory that had not been finished",
                        extra={"game_id": record.game_id, "copy": tag})

    async def drop(self, game_id: str) -> None:
        """An engine of the game is healthy again: its copies are no longer needed. Never while a restore
        is pending: that copy is the state the game is owed."""
        async with self.locked(game_id):
            if await on_files(statedir.pending_restore, self.root, game_id) is not None:
                log.error("a restore of the state directory is pending: its copy is kept",
                          extra={"game_id": game_id})
                return
            found = (await on_files(statedir.backups, self.root)).get(game_id)
            if found:
                await in_thread(statedir.drop_backup, self.root, game_id)
                self.metrics.state_copies.labels("dropped").inc()

    async def check_room(self, record: RuntimeRecord) -> None:
        """StorageFull when the game's directory is still to be made (a new game) and the filesystem
        is nearly full. A game whose directory exists (a restart, a patch) needs no new room."""
        if await on_files(statedir.exists, self.root, record.state_path):
            return
        reason = await self.full_reason()
        if reason:
            raise StorageFull(reason)

    async def check_copy_room(self, record: RuntimeRecord) -> None:
        """StorageFull when the copy of the game's state (``backup``) would leave the filesystem with less
        than RTMANAGER_STATE_MIN_FREE: the other engines need that room to save theirs."""
        tag = storage.backup_tag(record)
        if tag is not None and tag in (await on_files(statedir.backups, self.root)).get(record.game_id, ()):
            return  # taken already (a retry after a temporary error, or a kill): it needs no more room
        if tag is not None and await in_thread(statedir.drop_partial_backup, self.root, record.state_path, tag):
            log.info("deleted a copy of the state a kill cut short before measuring the room for a new one",
                     extra={"game_id": record.game_id})
        measured = await on_files(statedir.measure, self.root, record.state_path)
        if measured is None:
            return  # not on this host (node-local state on a Swarm node): its own disk is not this one
        free, total = await on_files(statedir.free_space, self.root)
        reason = storage.copy_refused(free, total, measured[0], self.settings.storage.state_min_free)
        if reason:
            raise StorageFull(reason)

    async def full_reason(self) -> str | None:
        free, total = await on_files(statedir.free_space, self.root)
        self.metrics.state_free.set(free)
        reason = storage.nearly_full(free, total, self.settings.storage.state_min_free)
        self.metrics.state_full.set(1 if reason else 0)
        return reason

    async def readiness(self) -> None:
        """/readyz: raises StorageFull (its message says why) when new starts would be refused."""
        reason = await self.full_reason()
        if reason:
            raise StorageFull(reason)


def _key(rec: RuntimeRecord) -> tuple[datetime, str]:
    assert rec.removed_at is not None
    return rec.removed_at, rec.game_id


class StorageRound:
    def __init__(self, *, config: StorageSettings, store: StorageStore, backend: RuntimeBackend, reconciler: Reconciler,
                 keeper: StateKeeper, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.reconciler = reconciler
        self.keeper = keeper
        self.metrics = metrics
        self.rounds = 0  # finished rounds (tests wait on it)
        # The last removed game the disposal looked at, (removed_at, game_id): the next round goes on after it, so
        # the candidates it cannot dispose of yet (a restore to finish, an archive refused) are looked at again
        # once every pass over all of them instead of filling the oldest page for ever.
        self._after: tuple[datetime, str] | None = None

    async def once(self) -> None:
        await self.keeper.full_reason()
        records = await self.store.list_live()
        await self.measure(records)
        await self.drop_leftovers()
        await self.dispose_removed()
        self.rounds += 1

    async def measure(self, records: list[RuntimeRecord]) -> None:
        total = largest = 0
        root = self.config.state_root
        sizes: dict[str, int] = {}
        for rec in records:
            if rec.status is Status.REMOVED:
                continue
            try:
                measured = await on_files(statedir.measure, root, rec.state_path)
            except Refused as exc:  # this game's directory is odd: this game's size is unknown
                log.warning("state directory not measured: %s", exc.message, extra={"game_id": rec.game_id})
                continue
            if measured is None:
                continue
            size, complete = measured
            if not complete:
                log.warning("state directory has more than %d entries or levels; its size is a lower bound",
                            statedir.MEASURE_MAX_ENTRIES, extra={"game_id": rec.game_id})
            total += size
            largest = max(largest, size)
            self.metrics.state_dir_bytes.observe(size)
            sizes[rec.game_id] = size
        await self.store.record_state_sizes(sizes)
        self.metrics.state_bytes_total.set(total)
        self.metrics.state_largest.set(largest)

    async def drop_leftovers(self) -> None:
        """Copies of replacements that are over (a crash between the new engine's health and the
        copy's deletion, a rollback that failed too): the copy of a replacement under way stays."""
        found = await on_files(statedir.backups, self.config.state_root)
        for game, names in found.items():
            try:
                await self._drop_leftovers_of(game, names)
            except (Refused, StateBusy) as exc:  # this game's odd (or busy) directory fails this game, not the round
                log.warning("leftover copies not looked at: %s", exc.message, extra={"game_id": game})

    async def _drop_leftovers_of(self, game: str, names: list[str]) -> None:
        async with self.keeper.locked(game):
            record = await self.store.find(game)
            if record is not None and record.status is not Status.REMOVED and not await on_files(
                    statedir.exists, self.config.state_root, record.state_path):
                # Somebody deleted the state directory: its copies may be all that is left of it.
                log.error("state directory missing while copies of it exist; keeping them", extra={"game_id": game})
                return
            pending = {n.removesuffix(statedir.RESTORING) for n in names if n.endswith(statedir.RESTORING)}
            for name in names:
                tag = name.removesuffix(".tmp")
                if pending and (name in pending or name.endswith(statedir.RESTORING) or name == "replaced"):
                    continue  # a restore a kill cut short: done again, from the copy, before the next engine
                if storage.keep_backup(record, tag):
                    continue
                if record is None:
                    continue  # not provably ours to delete (a database restored from an older dump?)
                await in_thread(statedir.drop_backup, self.config.state_root, game, name)
                self.metrics.state_copies.labels("dropped").inc()
                log.info("deleted a leftover copy of the state directory", extra={"game_id": game, "copy": name})

    async def dispose_removed(self) -> None:
        cfg = self.config
        if cfg.state_retention <= 0:
            return
        candidates = await self.store.removed_with_state(cfg.state_retention, DISPOSE_BATCH, self._after)
        if not candidates and self._after is not None:  # past the last one: the pass starts again
            self._after = None
            candidates = await self.store.removed_with_state(cfg.state_retention, DISPOSE_BATCH)
        if not candidates:
            return
        await self._dispose(candidates)
        if len(candidates) < DISPOSE_BATCH and self._after == _key(candidates[-1]):
            self._after = None  # the pass got to the end

    async def _dispose(self, candidates: list[RuntimeRecord]) -> None:
        try:
            units = {c.game_id for c in await self.backend.list_managed()}
        except BackendUnavailable as exc:
            raise DockerUnavailable(exc.message) from exc
        for rec in candidates:
            if self.reconciler.dispose_budget <= 0:
                log.warning("not deleting removed games' state directories: the removal budget of this resync "
                            "interval is spent")
                return
            fence = self.reconciler.fence
            if fence is not None and not fence.valid_locally:
                raise Fenced("the leadership term lapsed before a state directory's disposal")
            await self._dispose_one(rec, units)
            self._after = _key(rec)  # looked at, whatever came of it (an outage above has it looked at again)

    async def _dispose_one(self, rec: RuntimeRecord, units: set[str | None]) -> None:
        cfg = self.config
        async with self.keeper.locked(rec.game_id):
            current = await self.store.find(rec.game_id)  # the decision on what holds now
            try:
                unit = rec.game_id in units or await self.backend.inspect(container_name(rec.game_id)) is not None
            except BackendUnavailable as exc:
                raise DockerUnavailable(exc.message) from exc
            if not storage.disposable(current, now=self.reconciler.clock.now(), retention=cfg.state_retention,
                                      unit_exists=unit):
                return
            assert current is not None and current.removed_at is not None
            if cfg.state_archive_dir:
                # A restore left pending (a removal during a replacement whose restore failed): the state
                # the game is owed is the copy; archiving the directory as it is, then deleting the
                # copies, would keep neither. (Deleting needs no restore: everything goes.) One that
                # cannot be finished yet costs no removal.
                try:
                    await self.keeper.finish_restore_locked(current, room=True)
                except StateBusy as exc:
                    log.warning("not archiving a removed game's state directory now: %s", exc.message,
                                extra={"game_id": rec.game_id})
                    return
                except (Refused, StorageFull) as exc:
                    log.error("not archiving a removed game's state directory: its restore is pending and "
                              "cannot be finished now: %s", exc.message, extra={"game_id": rec.game_id})
                    return
            self.reconciler.dispose_budget -= 1
            name = f"{current.game_id}-{current.removed_at:%Y%m%dT%H%M%SZ}"
            try:
                done = await in_thread(statedir.dispose, cfg.state_root, current.state_path,
                                       cfg.state_archive_dir, name)
            except StateBusy as exc:  # looked at again at the next pass; no removal spent on it
                self.reconciler.dispose_budget += 1
                log.warning("not disposing of a removed game's state directory now: %s", exc.message,
                            extra={"game_id": rec.game_id})
                return
            except Refused as exc:
                log.error("cannot dispose of a removed game's state directory: %s", exc.message,
                          extra={"game_id": rec.game_id})
                return
            await self.store.mark_state_disposed(rec.game_id)
            if done != "absent":
                self.metrics.state_disposed.labels(done).inc()
            log.info("state directory of a game removed at %s %s", current.removed_at.isoformat(), done,
                     extra={"game_id": rec.game_id})

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await one_round("storage", self.once, self.metrics, log)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.config.state_scan_interval)
