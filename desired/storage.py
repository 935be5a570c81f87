"""The state directory's lifecycle, as pure decisions (the file operations are observed/statedir.py).

* ``MinFree`` and ``nearly_full``: whether the state root's filesystem has too little room left
  for a new game (``RTMANAGER_STATE_MIN_FREE``, bytes or a percentage of its size);
* ``backup_tag`` / ``needs_backup``: the copy kept while a job replaces a running engine with
  another image, named after the container of the engine it replaces (a leftover of an earlier
  replacement never has that name, so it is never restored);
* ``disposable``: a removed game's directory may go (deleted or archived) once the retention has
  passed, the record still says removed, and no unit of the game exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from desired.model import DesiredStatus, RuntimeRecord, Status

_SIZE = re.compile(r"(\d+)([kmgtKMGT]?)[bB]?")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class MinFree:
    """Room the state root's filesystem must keep for a new game: bytes, or a percentage of its size."""

    bytes: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, raw: str) -> MinFree:
        """``5%``, ``10g``, ``0``; ValueError otherwise."""
        raw = raw.strip()
        m = _PERCENT.fullmatch(raw)
        if m:
            percent = float(m.group(1))
            if percent > 100:
                raise ValueError("a percentage of at most 100%")
            return cls(percent=percent)
        m = _SIZE.fullmatch(raw)
        if not m:
            raise ValueError("bytes (such as 10g) or a percentage (such as 5%)")
        return cls(bytes=int(m.group(1)) * _UNITS[m.group(2).lower()])

    def needed(self, total: int) -> int:
        return max(self.bytes, int(total * self.percent / 100) if self.percent else 0)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else str(self.bytes)


def nearly_full(free: int, total: int, min_free: MinFree) -> str | None:
    """Why the filesystem is too full for a new game, or None. ``free`` is what an unprivileged
    writer may still use (statvfs f_bavail)."""
    needed = min_free.needed(total)
    if needed <= 0 or free >= needed:
        return None
    return (f"the state root's filesystem is nearly full: {free} bytes free of {total}, "
            f"RTMANAGER_STATE_MIN_FREE asks for {min_free}")


def copy_refused(free: int, total: int, size: int, min_free: MinFree) -> str | None:
    """Why a copy of ``size`` bytes of a game's state may not be taken now, or None: it would leave the
    filesystem with less than RTMANAGER_STATE_MIN_FREE, the room the running engines save their state in."""
    needed = min_free.needed(total)
    if needed <= 0 or free - size >= needed:
        return None
    return (f"the copy of the state directory (about {size} bytes) would leave {max(0, free - size)} bytes free "
            f"of {total} on the state root's filesystem; RTMANAGER_STATE_MIN_FREE asks for {min_free}")


def backup_tag(record: RuntimeRecord) -> str | None:
    """The name of the copy of this record's state: the container of the engine a job replaces."""
    cid = record.current_container_id
    if not cid:
        return None
    tag = cid[:12]
    return tag if _TAG.fullmatch(tag) else None


def replacing(record: RuntimeRecord) -> bool:
    """A job replaces a running engine (or rolls back from the one it tried), so a copy may be needed."""
    return record.status is Status.STARTING and (bool(record.rollback_image_ref) or record.rolling_back)


def restores(record: RuntimeRecord, image: str) -> bool:
    """Before ``image``'s engine is created: the state directory gets the copy back. A rollback; and a job
    that asked for the replaced image again while the replacement was under way (a start of it, the
    patch superseded), as the new engine may have changed the state before it was healthy: the replaced
    engine finds its state as it left it, whoever asked for it."""
    return record.rolling_back or (replacing(record) and record.rollback_image_ref == image)


def replaced_image(record: RuntimeRecord) -> str | None:
    """The image a replacement under way replaces (the one its copy of the state belongs to)."""
    return record.rollback_image_ref or (record.desired_image_ref if record.rolling_back else None)


def restores_at_stop(record: RuntimeRecord, runs_replaced: bool) -> bool:
    """A game stopped while a replacement is under way (its new engine never answered healthy: a stop or a
    drain superseded the patch), or while it rolls back from one before the old engine started again (the
    copy is deleted once the game is stopped), gets the copy back: the new engine may have changed the
    state, and the replacement did not happen. Not when the unit stopped is the replaced image's own
    (``runs_replaced``, told by its spec hash: a Swarm service shows its image without the digest): the
    state was put back before it started, and what it wrote since is its state."""
    return replacing(record) and backup_tag(record) is not None and not runs_replaced


def needs_backup(record: RuntimeRecord, image: str) -> bool:
    """Before the engine a job asked for is created: the game ran another image, which a rollback
    would start again on the state it left (taken after that engine stopped)."""
    return (replacing(record) and not record.rolling_back and record.rollback_image_ref != image
            and backup_tag(record) is not None)


def keep_backup(record: RuntimeRecord | None, tag: str) -> bool:
    """A copy found on disk is still needed: it is the copy of the replacement under way."""
    return record is not None and replacing(record) and backup_tag(record) == tag


def disposable(record: RuntimeRecord | None, *, now: datetime, retention: float, unit_exists: bool) -> bool:
    """A removed game's state directory may be deleted or archived now.

    Only when the record says the game is removed and converged (removal is final: its game_id
    cannot be started again), the retention (seconds, > 0) has passed since, and no unit
    (container or service) of the game exists. A game without a record is never touched: nothing
    proves the directory is rtmanager's to delete."""
    if record is None or retention <= 0 or unit_exists:
        return False
    if record.status is not Status.REMOVED or record.desired_status is not DesiredStatus.REMOVED:
        return False
    if not record.converged or record.removed_at is None or record.current_container_id:
        return False
    return now - record.removed_at >= timedelta(seconds=retention)
