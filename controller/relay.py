"""The outbox relay: results committed in Postgres -> the results stream.

Results are read in commit order (``seq``) and published one by one, so the
results of one game never overtake each other. A result is marked published
only after XADD answered. After a start or a failure the relay first looks for
pending results in the stream's recent tail (an XADD whose answer or marking was
lost) and marks those instead of adding them again; a result older than that
tail could still be published twice, with the same ``result_id``
(at-least-once; consumers dedupe on it). While Redis or Postgres
is away the relay backs off (tenacity) and resumes by itself.

Only the results stream is trimmed (approximate MAXLEN): trimming a job stream
would delete entries still pending in the consumer group.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import redis.asyncio as aioredis
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from controller.config import Settings
from controller.metrics import Metrics
from controller.outages import UNAVAILABLE
from desired.store import Store

log = logging.getLogger("rtmanager.relay")

BATCH = 200
IDLE_POLL = 5.0  # a fallback only: results written in this process wake the relay at once
TAIL_SCAN = 2000  # results looked at for a possibly-published result after a failure


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE)


class Relay:
    def __init__(self, settings: Settings, redis_client: aioredis.Redis, store: Store, metrics: Metrics) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = store
        self.metrics = metrics
        self.wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.healthy = False
        # After a start or a failure, an XADD may have gone through without its outbox row being
        # marked: look at the stream's tail before publishing again (fewer duplicates).
        self._suspect = True

    async def _skip_already_published(self, batch):
        """Mark results found in the stream's recent tail as published instead of adding them again."""
        tail = await self.redis.xrevrange(self.settings.results_stream, count=TAIL_SCAN)
        found = {}
        for entry_id, fields in tail:
            rid = fields.get(b"result_id", fields.get("result_id"))
            if rid is not None:
                found[rid.decode() if isinstance(rid, bytes) else rid] = \
                    entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        rest = []
        for item in batch:
            if item.result_id in found:
                log.info("result already on the stream; marking it published",
                         extra={"game_id": item.game_id, "result_id": item.result_id})
                await self.store.mark_published(item.seq, found[item.result_id])
            else:
                rest.append(item)
        self._suspect = False
        return rest

    def poke(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            published = 0
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable), wait=wait_exponential_jitter(multiplier=0.2, max=10),
                before_sleep=lambda rs: log.warning("relay paused: %s", rs.outcome.exception()),
                reraise=True,
            ):
                with attempt:
                    self.healthy = False
                    try:
                        published = await self.flush()
                    except BaseException:
                        self._suspect = True
                        raise
                    self.healthy = True
            if published == 0:
                try:
                    await asyncio.wait_for(self.wake.wait(), IDLE_POLL)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()

    async def flush(self) -> int:
        """Publish what is pending; return how many were published."""
        total = 0
        while True:
            self.wake.clear()
            batch = await self.store.unpublished(BATCH)
            if self._suspect and batch:
                batch = await self._skip_already_published(batch)
            for item in batch:
                kwargs = {}
                if self.settings.results_maxlen:
                    kwargs = {"maxlen": self.settings.results_maxlen, "approximate": True}
                entry_id = await self.redis.xadd(self.settings.results_stream, item.fields, **kwargs)
                await self.store.mark_published(item.seq, entry_id.decode() if isinstance(entry_id, bytes)
                                                else entry_id)
                self.metrics.results.labels(item.fields.get("outcome", ""), item.fields.get("error_code", "")).inc()
                now = datetime.now(timezone.utc)
                if item.written_at is not None:
                    self.metrics.phase.labels("result_published").observe((now - item.written_at).total_seconds())
                if item.accepted_at is not None:
                    self.metrics.convergence.labels(item.fields.get("job", ""), item.fields.get("outcome", "")) \
                        .observe((now - item.accepted_at).total_seconds())
                log.info("published result", extra={"game_id": item.game_id, "result_id": item.result_id,
                                                    "outcome": item.fields.get("outcome"),
                                                    "error_code": item.fields.get("error_code")})
            total += len(batch)
            if len(batch) < BATCH:
                return total
