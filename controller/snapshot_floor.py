"""Snapshot revisions that never go back, whatever the database went through.

Lobby keeps the highest ``revision`` of each game's snapshots and drops the rest. A database restored
from an older backup (or emptied, then given its games back with ``rtmanager adopt``) numbers a game's
next snapshots from what it holds: below what Lobby was already sent, so Lobby would drop every change
until the game's revision passed the old one, which for a quiet game may be never.

In each leadership term the relay (controller/relay.py) does this before it publishes anything: the
newest of our snapshots on the stream is looked for in the database's outbox (one read of each). A
snapshot it does not know says the database is behind; its revision would not, as the term may already
have numbered another snapshot of that game the same. That finding is kept in the database
(snapshot_floors) until the raise went through, so a failure (tried again every minute, while results
are published) or another term or process still does it. Then the stream is read whole (it is trimmed,
so it is bounded), and every game's revision is raised above the highest one the stream holds of it
(desired/db/outbox.py ``raise_snapshot_revisions``): its snapshots not published yet are numbered again
above it, but for those already on the stream (published, not marked yet), which keep theirs; a game with
none gets a resync snapshot of its state, since Lobby's view of it came from what the database lost. A
game without a record keeps its floor for when its record is made again. A game whose snapshots were
all trimmed away cannot be told: its next revision may still be one Lobby holds.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Protocol

log = logging.getLogger("rtmanager.snapshots")

BATCH = 5000          # entries read per call
TAIL = 200            # newest entries looked for in the database
GAME_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,49}[a-z0-9])?")  # what a game id is (desired/jobs.py)
MAX_DIGITS = 18       # a revision the database's bigint holds


class FloorStreams(Protocol):
    async def recent(self, stream: str, count: int) -> list[tuple[str, dict[Any, Any]]]: ...
    async def range(self, stream: str, start: str, end: str = "+",
                    count: int = 1000) -> list[tuple[str, dict[Any, Any]]]: ...


class FloorStore(Protocol):
    async def floor_state(self, snapshot_ids: list[str]) -> tuple[set[str], bool]: ...
    async def note_floor_due(self) -> None: ...
    async def raise_snapshot_revisions(self, floors: dict[str, int],
                                       on_stream: frozenset[str] = frozenset()) -> int: ...


def revision_of(fields: dict[Any, Any]) -> tuple[str, int] | None:
    """(game, revision) of a snapshot entry; None for an entry that is not one of ours (garbage)."""
    game, rev = fields.get("game_id"), fields.get("revision")
    if not isinstance(game, str) or not isinstance(rev, str) or not GAME_ID.fullmatch(game):
        return None
    if not (rev.isascii() and rev.isdigit()) or len(rev) > MAX_DIGITS:
        return None
    return game, int(rev)


def _after(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def behind(streams: FloorStreams, store: FloorStore, stream: str) -> bool:
    """Whether the database is behind the snapshot stream: it does not know the newest of our snapshots
    among the stream's newest TAIL entries (written after its backup, or it was emptied); or a raise found
    due is still to do (remembered in the database, so that a term that published meanwhile, or another
    process, still does it). By snapshot id, not revision: the term may already have numbered another
    snapshot of that game the same. Older unknown entries are a restore handled before. (An entry older than
    RTMANAGER_RETENTION_DAYS, its row pruned, reads as unknown too: an instance that published no snapshot
    in that long reads the stream once a term for nothing, and raises nothing.)"""
    # Our snapshots only (an id, a game and a revision as the relay writes them), newest first.
    ids = [f["snapshot_id"] for _, f in await streams.recent(stream, TAIL)
           if revision_of(f) is not None and isinstance(f.get("snapshot_id"), str) and ours(f["snapshot_id"])]
    known, due = await store.floor_state(ids)
    unknown = bool(ids) and ids[0] not in known  # the newest of ours: unknown, or the database is up to date
    if unknown and not due:
        await store.note_floor_due()
    return unknown or due


def ours(snapshot_id: str) -> bool:
    """An id the relay could have written: a UUID (anything else on the stream is somebody else's)."""
    try:
        uuid.UUID(snapshot_id)
    except ValueError:
        return False
    return True


async def raise_floor(streams: FloorStreams, store: FloorStore, stream: str) -> int:
    """The games whose revisions were raised above the snapshot stream's (0 when the database is not
    behind it: the usual case costs two reads)."""
    if not await behind(streams, store, stream):
        return 0
    return await raise_above_stream(streams, store, stream)


async def raise_above_stream(streams: FloorStreams, store: FloorStore, stream: str) -> int:
    """The database is behind: every game's revision above the highest the stream holds of it."""
    floors: dict[str, int] = {}
    seen: set[str] = set()  # snapshot ids on the stream: published, marked or not, they keep their revision
    start = "-"
    while True:
        batch = await streams.range(stream, start, "+", BATCH)
        for _, fields in batch:
            found = revision_of(fields)
            if found is not None and found[1] > floors.get(found[0], -1):
                floors[found[0]] = found[1]
            snapshot_id = fields.get("snapshot_id")
            if isinstance(snapshot_id, str):
                seen.add(snapshot_id)
        if len(batch) < BATCH:
            break
        start = _after(batch[-1][0])
    raised = await store.raise_snapshot_revisions(floors, frozenset(seen))
    if not raised:
        return 0
    log.error("the database is behind the snapshot stream (restored from an older backup, or emptied): the "
              "snapshot revisions of %d games were raised above the highest ones Lobby was sent; the games' "
              "desired state is the backup's (README, restoring the database)", raised)
    return raised
