"""Leadership: campaign for the lease, renew it, step down when it is lost, campaign again.

One replica of an instance leads (reads jobs, reconciles, publishes); the
others stand by. The lease and its fencing live in desired/leader.py; this loop
decides *when* to lead:

* **Campaign** every ``ttl / 3`` (at most a second) until the lease is free, and
  again the moment a held lease expires (the database says when: ``campaign_wait``),
  so a standby takes over a killed leader's lease at its expiry, not up to a poll
  later; then call
  ``on_elected`` (the composition root starts the leader's tasks). A process's
  first campaign takes back at once a lease held under its own replica name
  (it held it before a crash), instead of waiting a TTL for it to expire.
* **Renew** every ``ttl / 5`` on the lease's own connection. A failed renewal is
  retried until the term lapses locally (the fence's deadline).
* **Step down** when the term is lost: a renewal found another holder, the
  deadline passed during an outage, or a write was fenced (``lost()``). The
  fence is closed at once (no backend call, no write passes it), then
  ``on_deposed`` cancels the leader's tasks. The process stays up as a standby
  and campaigns again: after an outage it leads again in a new term, or follows
  the replica that took over. Losing a term never ends the process.
* A graceful shutdown keeps renewing until the root says its last writes are
  done (``release()``), then hands the lease over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from controller.metrics import Metrics
from desired.db.lease import Lease
from desired.errors import StoreUnavailable
from desired.leader import Fence

log = logging.getLogger("rtmanager.leadership")

EXPIRY_SLACK = 0.01  # campaign this long after the held lease's expiry (the round trip covers the rest)
RETRY_SOON = 0.25  # seconds at most before a failed renewal is tried again


def campaign_wait(ttl: float, held_for: float | None) -> float:
    """Seconds until the next campaign: the poll (a third of the TTL, at most a second), or sooner
    when the lease another replica holds expires before that."""
    poll = min(1.0, ttl / 3)
    if held_for is None:
        return poll
    return min(poll, max(held_for, 0.0) + EXPIRY_SLACK)


class Leadership:
    def __init__(self, lease: Lease, fence: Fence, metrics: Metrics, *,
                 on_elected: Callable[[], Awaitable[None]], on_deposed: Callable[[str], Awaitable[None]]) -> None:
        self.lease = lease
        self.fence = fence
        self.metrics = metrics
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._lost = asyncio.Event()
        self._released = asyncio.Event()
        self.leading = False

    @property
    def ttl(self) -> float:
        return self.fence.ttl

    def lost(self, reason: str) -> None:
        """A write or an action found the term over (another replica took it): step down now."""
        if self.leading:
            log.warning("leadership term %d is over: %s", self.fence.epoch, reason)
            self.fence.deadline = 0.0
            self._lost.set()

    def release(self) -> None:
        """The graceful shutdown's last writes are done: stop renewing."""
        self._released.set()

    async def run(self, stopping: asyncio.Event) -> None:
        announced = False
        first = True
        while not stopping.is_set():
            if not await self._campaign(stopping, announced, reclaim=first):
                return
            first = False
            announced = False
            self.leading = True
            self._lost.clear()
            self.metrics.leader.set(1)
            self.metrics.leadership.labels("elected").inc()
            log.info("elected leader", extra={"epoch": self.fence.epoch})
            reason: str | None
            try:
                await self._on_elected()
            except Exception as exc:  # noqa: BLE001 - the term cannot be served: step down, campaign again
                log.exception("could not start the leader's tasks")
                self.metrics.loop_failed("leadership", exc)
                reason = f"the leader's tasks could not start: {exc.__class__.__name__}: {exc}"
            else:
                reason = await self._hold(stopping)
            if reason is None:
                return  # graceful shutdown: the root releases the lease
            self.leading = False
            self.fence.deadline = 0.0
            self.metrics.leader.set(0)
            self.metrics.leadership.labels("deposed").inc()
            log.error("lost leadership (term %d): %s; standing by and campaigning again", self.fence.epoch, reason)
            await self._on_deposed(reason)
            announced = True

    async def _campaign(self, stopping: asyncio.Event, announced: bool, reclaim: bool) -> bool:
        while not stopping.is_set():
            try:
                if await self.lease.acquire(reclaim=reclaim) is not None:
                    if self.lease.reclaimed:
                        log.warning("took back the lease held under this replica's name %s (a restart after a "
                                    "crash; if another live process uses the same RTMANAGER_CONSUMER_NAME, it "
                                    "now stands by)", self.fence.holder)
                    self.metrics.loop_ok("leadership")
                    return True
                self.metrics.loop_ok("leadership")
                if not announced:
                    log.info("standing by: another replica holds the lease of instance %s", self.fence.instance)
                    announced = True
            except Exception as exc:  # noqa: BLE001 - Postgres away, or a bug: campaign again, never die
                self.metrics.loop_failed("leadership", exc)
                if isinstance(exc, StoreUnavailable):
                    log.warning("leader election: %s", exc)
                else:
                    log.exception("leader election failed unexpectedly")
            try:
                await asyncio.wait_for(stopping.wait(), campaign_wait(self.ttl, self.lease.held_for))
            except TimeoutError:
                pass
        return False

    async def _renewed(self) -> bool | str:
        """One renewal, raced against the term's local deadline and ``lost()``: a renewal that hangs (Postgres
        not answering the lease's connection: its connect timeout and half a TTL) must not hold the step-down
        past the deadline, nor a fenced write's. Its result, or why the term is over."""
        renewal = asyncio.create_task(self.lease.renew())
        lost = asyncio.create_task(self._lost.wait())
        try:
            left = max(0.0, self.fence.deadline - time.monotonic())
            done, _ = await asyncio.wait({renewal, lost}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # this loop itself is cancelled (the process stops): so is the renewal
            renewal.cancel()
            lost.cancel()
            raise
        finally:
            lost.cancel()
        if renewal in done:
            return renewal.result()
        renewal.cancel()
        await asyncio.wait({renewal})  # its end, whatever it is (a cancellation of this loop is not swallowed)
        if not renewal.cancelled():
            renewal.exception()  # retrieved: not logged as never retrieved
        await self.lease.close()  # cut mid-statement: its connection is made again for the next campaign
        if self._lost.is_set():
            return "another replica took over"
        return "the lease could not be renewed before the term's deadline (the renewal did not answer)"

    async def _hold(self, stopping: asyncio.Event) -> str | None:
        """Renew until released (None) or lost (the reason). A renewal that failed is tried again soon (a
        twentieth of the TTL, at most RETRY_SOON), not a fifth of it later: the term's deadline comes a fifth
        of the TTL before the lease's expiry, and one statement timed out must leave room for another."""
        wait = self.ttl / 5
        while not self._released.is_set():
            waiters = [asyncio.create_task(e.wait()) for e in (self._released, self._lost)]
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if self._released.is_set():
                return None
            if self._lost.is_set():
                return "another replica took over"
            try:
                wait = min(self.ttl / 20, RETRY_SOON)  # until this renewal is known to have succeeded
                renewed = await self._renewed()
                if isinstance(renewed, str):
                    return renewed
                if renewed:
                    wait = self.ttl / 5
                    self.metrics.loop_ok("leadership")
                    continue
                if not self.fence.valid_locally:
                    return "the lease could not be renewed before it expired"
                return "another replica holds the lease"
            except Exception as exc:  # noqa: BLE001 - Postgres away, or a bug: retry until the term lapses
                self.metrics.loop_failed("leadership", exc)
                if not self.fence.valid_locally:
                    return f"the lease expired while it could not be renewed ({exc.__class__.__name__}: {exc})"
                if isinstance(exc, StoreUnavailable):
                    log.warning("could not renew the lease (retrying until term %d lapses): %s", self.fence.epoch,
                                exc)
                else:
                    log.exception("could not renew the lease (retrying until term %d lapses)", self.fence.epoch)
        return None
