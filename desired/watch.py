"""The watch API's values: a position in the snapshot outbox, the events read after one, and what a
reader is told when its position was removed by retention. Pure: no driver, no I/O.

A position is the number migration 0021 gives each snapshot once it has committed: monotone in
commit order, the same on every replica (it is stored in Postgres), never reused. ``0`` is before
everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_POSITION = 2**63 - 1


@dataclass(frozen=True)
class WatchEvent:
    position: int
    game_id: str
    fields: dict[str, Any]  # the snapshot as on the snapshot stream (docs/contract.md)


@dataclass(frozen=True)
class WatchFilter:
    """Empty: everything. Otherwise a snapshot passes when its game and its status are listed."""

    game_ids: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()

    def passes(self, event: WatchEvent) -> bool:
        return ((not self.game_ids or event.game_id in self.game_ids)
                and (not self.statuses or str(event.fields.get("status", "")) in self.statuses))


@dataclass(frozen=True)
class WatchPage:
    """What one read after ``after`` found.

    ``reset``: ``after`` is older than what retention kept (or newer than any position given): the
    events between are gone; the reader goes on from ``scanned`` and should re-read the fleet.
    ``scanned``: every position up to it was looked at (the next read starts there), whether or not
    the filter let it through. ``head``: the highest position given so far.
    """

    after: int
    scanned: int
    head: int
    events: list[WatchEvent] = field(default_factory=list)
    reset: str = ""  # "" | "expired" | "unknown"
    oldest: int = 0  # the highest position retention removed (a reader at or above it misses nothing)


def sse(event: str | None, data: str | None, event_id: int | None = None, comment: str = "") -> bytes:
    """One Server-Sent Events block (data holds no newline: it is compact JSON)."""
    lines: Iterable[str] = (
        *((f": {comment}",) if comment else ()),
        *((f"id: {event_id}",) if event_id is not None else ()),
        *((f"event: {event}",) if event else ()),
        *((f"data: {data}",) if data is not None else ()),
    )
    return ("\n".join(lines) + "\n\n").encode()
