"""The watch API's reads of the snapshot outbox, and the sequencing pass that gives each committed
snapshot its position (migration 0021 says why seq is not enough).

Neither is fenced: any replica may sequence and read (positions are the same for everyone), and a
standby serving the watch API must not be refused by the leadership fence.
"""

from __future__ import annotations

import json

import asyncpg

from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.watch import MAX_POSITION, WatchEvent, WatchFilter, WatchPage

SEQUENCE_BATCH = 5000
SCAN_WINDOW = 20000  # positions one filtered read looks at, at most (a selective filter stays cheap)

_SEQUENCE = """
WITH todo AS (
    SELECT seq, row_number() OVER (ORDER BY seq) AS n
    FROM (SELECT seq FROM job_results WHERE kind = 'snapshot' AND position IS NULL ORDER BY seq LIMIT $2) s
), given AS (
    UPDATE job_results r SET position = $1 + todo.n FROM todo WHERE r.seq = todo.seq RETURNING r.position
)
UPDATE watch_state SET last_position = GREATEST(last_position, (SELECT max(position) FROM given))
WHERE EXISTS (SELECT 1 FROM given) RETURNING last_position
"""

_READ = """
SELECT position, game_id, fields FROM job_results
WHERE kind = 'snapshot' AND position > $1 AND position <= $2
  AND ($3::text[] IS NULL OR game_id = ANY($3)) AND ($4::text[] IS NULL OR fields->>'status' = ANY($4))
ORDER BY position LIMIT $5
"""


async def sequence_snapshots(pool: asyncpg.Pool, batch: int = SEQUENCE_BATCH, wait: bool = True) -> int:
    """Number the committed snapshots that have no position yet, in seq order, above every position
    given before; return how many. The row of ``watch_state`` is the lock: one pass at a time across
    every replica (``wait=False``: give up at once when another pass holds it; that pass numbers
    what this one would have, or the next one will)."""
    total = 0
    lock = "FOR UPDATE" if wait else "FOR UPDATE SKIP LOCKED"
    while True:
        async with pool.acquire() as conn, conn.transaction():
            last = await conn.fetchval(f"SELECT last_position FROM watch_state {lock}")  # noqa: S608 - constants
            if last is None:
                return total
            new_last = await conn.fetchval(_SEQUENCE, last, batch)
        if new_last is None:
            return total
        total += new_last - last
        if new_last - last < batch:
            return total


@translating
class Watch(StoreBase):
    async def sequence(self, batch: int = SEQUENCE_BATCH, wait: bool = True) -> int:
        return await sequence_snapshots(self.pool, batch, wait)

    async def unsequenced(self) -> bool:
        """Whether a committed snapshot waits for its position (the partial index answers)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM job_results WHERE kind = 'snapshot' AND position IS NULL)"))

    async def watch_head(self) -> tuple[int, int]:
        """(the highest position given, the highest position retention removed)."""
        row = await self.pool.fetchrow("SELECT last_position, pruned_through FROM watch_state")
        return (row["last_position"], row["pruned_through"]) if row else (0, 0)

    async def watch_read(self, after: int, flt: WatchFilter, limit: int = 200) -> WatchPage:
        """The snapshots after position ``after`` that pass ``flt``, in position order, at most
        ``limit``; a reset when ``after`` is below what retention removed, or above the head. One
        snapshot of the database: the horizon and the rows agree."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow("SELECT last_position, pruned_through FROM watch_state")
            head, oldest = (row["last_position"], row["pruned_through"]) if row else (0, 0)
            if after < oldest or after > head:
                start = oldest if after < oldest else head
                return WatchPage(after=after, scanned=start, head=head, reset="expired" if after < oldest
                                 else "unknown", oldest=oldest)
            upto = min(head, after + SCAN_WINDOW, MAX_POSITION)
            if upto <= after:
                return WatchPage(after=after, scanned=after, head=head, oldest=oldest)
            rows = await conn.fetch(_READ, after, upto, sorted(flt.game_ids) or None, sorted(flt.statuses) or None,
                                    limit)
        events = [WatchEvent(position=r["position"], game_id=r["game_id"],
                             fields=json.loads(r["fields"]) if isinstance(r["fields"], str) else r["fields"])
                  for r in rows]
        scanned = events[-1].position if len(events) >= limit else upto
        return WatchPage(after=after, scanned=scanned, head=head, events=events, oldest=oldest)
