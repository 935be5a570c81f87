"""Leader election with a lease row and fencing epochs.

Several replicas may run with the same RTMANAGER_INSTANCE; exactly one (the
holder of an unexpired lease) reconciles, reads jobs and publishes results.

* ``acquire`` takes the lease only when it has expired, and bumps ``epoch``:
  each term has a larger epoch than every term before it.
* ``renew`` extends the lease only if this replica still holds *this* epoch.
* Every write transaction of the leader first runs ``check`` (``Fence``): the
  lease row must still name this holder and epoch and be unexpired, read
  ``FOR KEY SHARE``. A take-over (``acquire`` locks the row FOR UPDATE)
  therefore waits for the writes in flight and every later write of the old
  term fails with Fenced, while the holder's own renewal never waits for them.
  A leader paused inside a transaction cannot block a take-over for long:
  the pool sets ``idle_in_transaction_session_timeout`` to the lease TTL.
* Besides, the leader keeps a local deadline (last renewal + TTL, on the
  monotonic clock) and takes no Docker action once it has passed: a process
  that was paused (SIGSTOP, a VM stall) wakes up knowing it may be deposed.

All times are the database's ``now()``; replicas' clocks never matter. A lost
term is not the end of the process: the replica steps down (stops acting at
once), stays up as a standby and campaigns again (controller/leadership.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from desired.errors import RtmError
from desired.pg import translate


class Fenced(RtmError):
    """This replica's leadership term is over: it must not write or act any more."""


@dataclass
class Fence:
    instance: str
    holder: str
    ttl: float
    epoch: int = 0
    deadline: float = 0.0  # monotonic; actions are allowed before it

    @property
    def valid_locally(self) -> bool:
        return self.epoch > 0 and time.monotonic() < self.deadline

    async def check(self, conn: asyncpg.Connection) -> datetime:
        """Raise Fenced unless this term is still the current one; return the database's ``now()``."""
        if not self.valid_locally:
            raise Fenced(f"leadership term {self.epoch} of {self.holder} has lapsed")
        # FOR KEY SHARE: the holder's own renewal (a no-key UPDATE) does not wait for it, while a
        # take-over (acquire locks the row FOR UPDATE first) waits for every write in flight.
        now = await conn.fetchval(
            "SELECT now() FROM leader_leases WHERE instance = $1 AND holder = $2 AND epoch = $3"
            " AND expires_at > now() FOR KEY SHARE", self.instance, self.holder, self.epoch)
        if now is None:
            raise Fenced(f"leadership term {self.epoch} of {self.holder} is over")
        return now


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

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.database_url, timeout=self._timeout)
        return self._conn

    async def _run(self, fn):
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
        epoch = await self._run(lambda conn: self._acquire(conn, reclaim))
        if epoch is not None:
            self.fence.epoch = epoch
            self.fence.deadline = started + self.fence.ttl
        return epoch

    async def _acquire(self, conn: asyncpg.Connection, reclaim: bool) -> int | None:
        async with conn.transaction():
            # FOR UPDATE conflicts with the FOR KEY SHARE of the old term's writes: a take-over
            # waits until they are committed or rolled back, and later ones see the new epoch.
            row = await conn.fetchrow("SELECT expires_at > now() AS live, holder FROM leader_leases"
                                      " WHERE instance = $1 FOR UPDATE", self.fence.instance)
            own = row is not None and reclaim and row["holder"] == self.fence.holder
            if row is not None and row["live"] and not own:
                return None
            epoch = await conn.fetchval(
                """INSERT INTO leader_leases AS l (instance, holder, epoch, acquired_at, renewed_at, expires_at)
                   VALUES ($1, $2, 1, now(), now(), now() + make_interval(secs => $3))
                   ON CONFLICT (instance) DO UPDATE
                      SET holder = EXCLUDED.holder, epoch = l.epoch + 1, acquired_at = now(),
                          renewed_at = now(), expires_at = EXCLUDED.expires_at
                    WHERE l.expires_at <= now() OR $4
                   RETURNING epoch""", self.fence.instance, self.fence.holder, self.fence.ttl, own)
            if own and row["live"]:
                self.reclaimed = True
        return epoch

    async def renew(self) -> bool:
        started = time.monotonic()
        if not self.fence.valid_locally:
            return False  # too late: the lease may already belong to another replica
        status = await self._run(lambda conn: conn.execute(
            "UPDATE leader_leases SET renewed_at = now(), expires_at = now() + make_interval(secs => $4)"
            " WHERE instance = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
            self.fence.instance, self.fence.holder, self.fence.epoch, self.fence.ttl, timeout=self.fence.ttl / 2))
        if status.endswith(" 1"):
            self.fence.deadline = started + self.fence.ttl
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
