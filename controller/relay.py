"""The outbox relay: results committed in Postgres -> the results stream.

Results are read in commit order (``seq``) and published one by one, so the
results of one game never overtake each other. A result is marked published
only after XADD answered; a crash in between publishes it again with the same
``result_id`` (at-least-once; consumers dedupe on it). While Redis or Postgres
is away the relay backs off (tenacity) and resumes by itself.

Only the results stream is trimmed (approximate MAXLEN): trimming a job stream
would delete entries still pending in the consumer group.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import redis.asyncio as aioredis
import redis.exceptions
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from controller.config import Settings
from controller.metrics import Metrics
from desired.store import PG_UNAVAILABLE, Store

log = logging.getLogger("rtmanager.relay")

BATCH = 200
IDLE_POLL = 1.0


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, *PG_UNAVAILABLE))


class Relay:
    def __init__(self, settings: Settings, redis_client: aioredis.Redis, store: Store, metrics: Metrics) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = store
        self.metrics = metrics
        self.wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.healthy = False

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
                    published = await self.flush()
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
