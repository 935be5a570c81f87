"""The leader lease and the fence's check, in SQL (the election is described in desired/leader.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import asyncpg

from desired.db.pool import translate
from desired.leader import Fence, Fenced


async def check_fence(fence: Fence, conn: asyncpg.Connection) -> datetime:
    """Raise Fenced unless this term is still the current one; return the database's ``now()``."""
    if not fence.valid_locally:
        raise Fenced(f"leadership term {fence.epoch} of {fence.holder} has lapsed")
    # FOR KEY SHARE: the holder's own renewal (a no-key UPDATE) does not wait for it, while a
    # take-over (acquire locks the row FOR UPDATE first) waits for every write in flight.
    now = await conn.fetchval(
        "SELECT now() FROM leader_leases WHERE instance = $1 AND holder = $2 AND epoch = $3"
        " AND expires_at > now() FOR KEY SHARE", fence.instance, fence.holder, fence.epoch)
    if now is None:
        raise Fenced(f"leadership term {fence.epoch} of {fence.holder} is over")
    return now


async def lock_record(fence: Fence | None, conn: asyncpg.Connection,
                      game_id: str) -> tuple[datetime, asyncpg.Record | None]:
    """``check_fence`` and then ``SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE``, in one
    statement (the record is locked only when the term is still the current one, after the lease's
    row, in the order of the two statements it replaces). Returns the database's ``now()`` and the
    record's row (None when the game has no record)."""
    if fence is None:
        row = await conn.fetchrow(
            "WITH r AS (SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE)"
            " SELECT now() AS fence_now, r.* FROM (SELECT 1) AS one LEFT JOIN r ON true", game_id)
    else:
        if not fence.valid_locally:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} has lapsed")
        row = await conn.fetchrow(
            "WITH f AS (SELECT now() AS now FROM leader_leases WHERE instance = $2 AND holder = $3 AND epoch = $4"
            " AND expires_at > now() FOR KEY SHARE),"
            " r AS (SELECT * FROM runtime_records WHERE game_id = $1 AND EXISTS (SELECT 1 FROM f) FOR UPDATE)"
            " SELECT (SELECT now FROM f) AS fence_now, r.* FROM (SELECT 1) AS one LEFT JOIN r ON true",
            game_id, fence.instance, fence.holder, fence.epoch)
        if row is None or row["fence_now"] is None:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} is over")
    assert row is not None
    return row["fence_now"], row if row["game_id"] is not None else None


async def fence_and_read(fence: Fence | None, conn: asyncpg.Connection, columns: str,
                         args: tuple[object, ...]) -> tuple[datetime, asyncpg.Record]:
    """``check_fence`` and, in the same statement, the expressions ``columns`` (scalar sub-selects whose
    parameters are numbered from $1, no write but a sequence's ``nextval``): one round trip for the fence
    and what a transaction reads first. Returns the database's ``now()`` and the row of ``columns``."""
    n = len(args)
    if fence is None:
        row = await conn.fetchrow(f"SELECT now() AS fence_now, {columns}", *args)
    else:
        if not fence.valid_locally:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} has lapsed")
        row = await conn.fetchrow(
            f"WITH f AS (SELECT now() AS now FROM leader_leases WHERE instance = ${n + 1} AND holder = ${n + 2}"
            f" AND epoch = ${n + 3} AND expires_at > now() FOR KEY SHARE)"
            f" SELECT (SELECT now FROM f) AS fence_now, {columns}", *args, fence.instance, fence.holder, fence.epoch)
        if row is None or row["fence_now"] is None:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} is over")
    assert row is not None
    return row["fence_now"], row


_T = TypeVar("_T")

# The share of the TTL by which the term's local deadline comes before the lease's expiry (client-go's renew
# deadline short of its lease duration): a leader stops acting before any other replica can take over, even
# with a call that passed its check a moment before the deadline. The renewals (every TTL/5) fit inside it.
LOCAL_MARGIN = 0.2


def local_deadline(started: float, ttl: float) -> float:
    """The monotonic deadline of a term taken or renewed by a statement sent at ``started``."""
    return started + ttl * (1 - LOCAL_MARGIN)


class Lease:
    """Campaign, renew and release on a connection of its own: a flood of requests or a burst of
    work that takes every pooled connection must never cost the leader its lease. Errors come
    out as StoreUnavailable (the connection is dropped and made again next time)."""

    def __init__(self, database_url: str, fence: Fence, connect_timeout: float = 3.0) -> None:
        self.database_url = database_url
        self.fence = fence
        self._timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None
        self.reclaimed = False  # the last acquire took a live lease held under this replica's name
        # Seconds the live lease another replica holds has left, by the database's clock, as the last
        # acquire that failed saw it (None: no such answer yet): a standby campaigns again right then.
        self.held_for: float | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # A campaign that takes an expired lease locks its row: a replica frozen in the middle (a paused
            # container, a VM freeze, a partition) is cut by the server after a TTL (the one setting the
            # pool sets too: a PgBouncer in front need pass no other), and the take-over's statements wait
            # for a lock at most a TTL (their own timeouts).
            limit = f"{max(1, math.ceil(self.fence.ttl * 1000))}ms"
            self._conn = await asyncpg.connect(self.database_url, timeout=self._timeout, server_settings={
                "idle_in_transaction_session_timeout": limit})
        return self._conn

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        try:
            return await fn(await self._connection())
        except BaseException as exc:
            ours = translate(exc)
            if ours is None:
                raise
            await self.close()
            raise ours from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def acquire(self, *, reclaim: bool = False) -> int | None:
        """Take the lease if it is free or expired; return the new epoch, or None.

        ``reclaim`` (a process's first campaign): a live lease held under this replica's own name
        is taken at once, in a new term. It was this replica before a crash or a kill -9, which
        cannot renew it any more; waiting for it to expire would only delay the restart by a TTL
        (client-go renews at once when the holder is its own identity). A second live process
        with the same name (a misconfiguration) takes it over once; the one it deposes never
        reclaims again, so the two cannot take turns."""
        started = time.monotonic()
        self.held_for = None
        epoch = await self._run(lambda conn: self._acquire(conn, reclaim))
        if epoch is not None:
            self.fence.epoch = epoch
            self.fence.deadline = local_deadline(started, self.fence.ttl)
        return epoch

    async def _acquire(self, conn: asyncpg.Connection, reclaim: bool) -> int | None:
        # Whether the lease is live, without a lock: a standby that locked the row on every campaign, and
        # froze before its COMMIT, made the leader's renewals and fenced writes wait for it (they could
        # not lead, nor could anyone else). The row is locked only to take it, and decided again then.
        seen = await conn.fetchrow("SELECT expires_at > now() AS live, holder,"
                                   " extract(epoch FROM expires_at - now())::float8 AS left_s"
                                   " FROM leader_leases WHERE instance = $1", self.fence.instance)
        if (seen is not None and seen["live"]
                and not (reclaim and seen["holder"] == self.fence.holder)):
            self.held_for = seen["left_s"]
            return None
        async with conn.transaction():
            # FOR UPDATE conflicts with the FOR KEY SHARE of the old term's writes: a take-over
            # waits until they are committed or rolled back, and later ones see the new epoch.
            row = await conn.fetchrow("SELECT expires_at > now() AS live, holder,"
                                      " extract(epoch FROM expires_at - now())::float8 AS left_s"
                                      " FROM leader_leases WHERE instance = $1 FOR UPDATE", self.fence.instance,
                                      timeout=self.fence.ttl)
            own = row is not None and reclaim and row["holder"] == self.fence.holder
            if row is not None and row["live"] and not own:
                self.held_for = row["left_s"]
                return None
            epoch = await conn.fetchval(
                """INSERT INTO leader_leases AS l (instance, holder, epoch, acquired_at, renewed_at, expires_at)
                   VALUES ($1, $2, 1, now(), now(), now() + make_interval(secs => $3))
                   ON CONFLICT (instance) DO UPDATE
                      SET holder = EXCLUDED.holder, epoch = l.epoch + 1, acquired_at = now(),
                          renewed_at = now(), expires_at = EXCLUDED.expires_at
                    WHERE l.expires_at <= now() OR $4
                   RETURNING epoch""", self.fence.instance, self.fence.holder, self.fence.ttl, own,
                timeout=self.fence.ttl)
            if own and row["live"]:
                self.reclaimed = True
        return epoch

    async def renew(self) -> bool:
        started = time.monotonic()
        if not self.fence.valid_locally:
            return False  # too late: the lease may already belong to another replica
        # The statement may take half a TTL, and at most half the time the term has left: a second attempt of the
        # same size (after a new connection, the failed one's being closed) must fit before the deadline.
        limit = max(0.05, min(self.fence.ttl / 2, (self.fence.deadline - started) / 2))
        status = await self._run(lambda conn: conn.execute(
            "UPDATE leader_leases SET renewed_at = now(), expires_at = now() + make_interval(secs => $4)"
            " WHERE instance = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
            self.fence.instance, self.fence.holder, self.fence.epoch, self.fence.ttl, timeout=limit))
        if status.endswith(" 1"):
            self.fence.deadline = local_deadline(started, self.fence.ttl)
            return True
        return False

    async def release(self) -> None:
        """Give the lease up at once (graceful shutdown), so that a standby need not wait."""
        if self.fence.epoch:
            await self._run(lambda conn: conn.execute(
                "UPDATE leader_leases SET expires_at = greatest(acquired_at, now())"
                " WHERE instance = $1 AND holder = $2 AND epoch = $3",
                self.fence.instance, self.fence.holder, self.fence.epoch))
        self.fence.epoch = 0
