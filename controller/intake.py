"""Intake: job streams -> desired state, never touching Docker.

For each entry: parse and validate, then one Postgres transaction writes the
desired-state change and an operation row (or, for a bad entry, a failed
operation and its ``invalid_request`` result); only then XACK. A crash between
the commit and the XACK redelivers the entry, and the (stream, entry id) key of
the operation log makes the second delivery a no-op.

Entries of the start and stop streams are merged in entry-id order (Redis ids
are timestamps from one clock), so "start then stop" of one game is applied in
the order Lobby sent it even when both arrive in one read.

On start the consumer first re-reads its own pending entries (id ``0``): those
it read before a crash but did not acknowledge.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import redis.asyncio as aioredis
import redis.exceptions

from controller.config import Settings
from controller.metrics import Metrics
from desired.errors import StoreUnavailable
from desired.jobs import InvalidJob, parse_job
from desired.model import JobKind, OpSource
from desired.store import PG_UNAVAILABLE, Store, now_utc

log = logging.getLogger("rtmanager.intake")

READ_COUNT = 100
BLOCK_MS = 1000


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Intake:
    def __init__(self, settings: Settings, redis_client: aioredis.Redis, store: Store, metrics: Metrics,
                 desired_changed: Callable[[str], None], results_written: Callable[[], None]) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = store
        self.metrics = metrics
        self._desired_changed = desired_changed
        self._results_written = results_written
        self.streams = {settings.start_stream: JobKind.START, settings.stop_stream: JobKind.STOP}
        self._stopping = asyncio.Event()
        self.healthy = False

    def stop(self) -> None:
        self._stopping.set()

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.settings.consumer_group, id="0", mkstream=True)
                log.info("created consumer group %s on %s", self.settings.consumer_group, stream)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self) -> None:
        delay = 0.2
        backlog = True  # first our own pending entries, then new ones
        while not self._stopping.is_set():
            try:
                if backlog:
                    await self.ensure_groups()
                    backlog = await self._read_once("0")
                else:
                    await self._read_once(">")
                self.healthy = True
                delay = 0.2
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, StoreUnavailable,
                    *PG_UNAVAILABLE) as exc:
                self.healthy = False
                log.warning("intake paused, retrying in %.1fs: %s", delay, exc)
                backlog = True
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read_once(self, start_id: str) -> bool:
        """Read and handle one batch; return True when more of the backlog may remain."""
        streams = {s: start_id for s in self.streams}
        reply = await self.redis.xreadgroup(self.settings.consumer_group, self.settings.consumer_name, streams,
                                            count=READ_COUNT, block=None if start_id == "0" else BLOCK_MS)
        entries: list[tuple[tuple[int, int], str, str, dict]] = []
        for stream_raw, items in reply or []:
            stream = stream_raw.decode() if isinstance(stream_raw, bytes) else stream_raw
            for entry_id_raw, fields in items:
                entry_id = entry_id_raw.decode() if isinstance(entry_id_raw, bytes) else entry_id_raw
                if fields is None:  # the entry was deleted while pending: nothing to do but ack
                    await self.redis.xack(stream, self.settings.consumer_group, entry_id)
                    continue
                entries.append((_entry_key(entry_id), stream, entry_id, fields))
        entries.sort(key=lambda e: e[0])
        for _, stream, entry_id, fields in entries:
            if self._stopping.is_set():
                break
            await self.handle(stream, entry_id, fields)
            await self.redis.xack(stream, self.settings.consumer_group, entry_id)
        return start_id == "0" and len(entries) > 0

    async def handle(self, stream: str, entry_id: str, fields: dict) -> None:
        kind = self.streams[stream]
        try:
            job = parse_job(kind, fields, self.settings.image_allowlist, source=OpSource.LOBBY,
                            stream=stream, entry_id=entry_id)
        except InvalidJob as bad:
            await self.store.reject_entry(kind=kind, game_id=bad.game_id, stream=stream, entry_id=entry_id,
                                          code=bad.code, message=bad.message)
            self.metrics.jobs.labels(stream, "rejected").inc()
            log.warning("rejected job: %s", bad.message,
                        extra={"stream": stream, "entry_id": entry_id, "error_code": bad.code.value,
                               "game_id": bad.game_id})
            self._results_written()
            return
        try:
            outcome = await self.store.submit(job, now_utc(), self.settings.record_defaults)
        except InvalidJob as bad:  # the state path check of a new record
            await self.store.reject_entry(kind=kind, game_id=job.game_id, stream=stream, entry_id=entry_id,
                                          code=bad.code, message=bad.message)
            self._results_written()
            return
        except PG_UNAVAILABLE as exc:
            raise StoreUnavailable(f"postgres: {exc}") from exc
        if outcome.duplicate:
            self.metrics.jobs.labels(stream, "duplicate").inc()
            log.info("entry already recorded as operation %d", outcome.operation_id,
                     extra={"stream": stream, "entry_id": entry_id, "game_id": job.game_id})
            return
        decision = outcome.decision
        assert decision is not None
        self.metrics.jobs.labels(stream, decision.action).inc()
        log.info("%s job: %s", kind.value, decision.action,
                 extra={"game_id": job.game_id, "operation_id": outcome.operation_id, "entry_id": entry_id,
                        "error_code": decision.error_code.value if decision.error_code else ""})
        if decision.action in ("change", "join"):
            self._desired_changed(job.game_id)
        self._results_written()  # replays, rejections and superseded jobs have results now

