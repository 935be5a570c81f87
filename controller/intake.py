"""Intake: job streams -> desired state, never touching Docker.

For each entry: parse and validate, then one Postgres transaction writes the
desired-state change and an operation row (or, for a bad entry, a failed
operation and its ``invalid_request`` result); only then XACK. A crash between
the commit and the XACK redelivers the entry, and the (stream, entry id) key of
the operation log makes the second delivery a no-op.

Entries of the start and stop streams are merged in entry-id order (Redis ids
are timestamps from one clock), so "start then stop" of one game is applied in
the order Lobby sent it even when both arrive in one read.

A pending pass (at start, after an outage, and every few seconds) re-reads the
consumer's own pending entries (read before a crash, or whose handling failed)
and claims, with XAUTOCLAIM looped until its cursor is 0-0, entries idle longer
than RTMANAGER_CLAIM_IDLE in the lists of dead consumers. An entry delivered
more than RTMANAGER_MAX_DELIVERIES times is dead-lettered: a failed operation
with internal_error, its result, and a copy on RTMANAGER_DEAD_LETTER_STREAM.
Job streams are never trimmed by rtmanager (trimming deletes pending entries).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import redis.asyncio as aioredis
import redis.exceptions

from controller.config import Settings
from controller.metrics import Metrics
from controller.outages import UNAVAILABLE, is_missing_group
from desired.leader import Fenced
from desired.jobs import InvalidJob, parse_job, shown_game_id
from desired.model import ErrorCode, JobKind, OpSource
from desired.errors import StoreUnavailable
from desired.store import PG_UNAVAILABLE, Store, now_utc

log = logging.getLogger("rtmanager.intake")

READ_COUNT = 100
POISON_FACTOR = 4  # deliveries beyond max x this are dead-lettered even with no failure seen here
BLOCK_MS = 1000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw_field(fields: dict | None, name: str):
    if fields is None:
        return None
    return fields.get(name.encode(), fields.get(name))


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
        self.claim_everything_once = False  # a new leader takes over what the old one left pending
        self._handling_failures: dict[tuple[str, str], int] = {}

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
        loop = asyncio.get_running_loop()
        delay = 0.2
        next_pending_pass = 0.0  # first our own pending entries and dead consumers', then new ones
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_pending_pass:
                    # Re-reading pending entries counts as a delivery: do it only when both
                    # services answer, so an outage does not push entries to the dead letters.
                    await self.store.ping()
                    await self.redis.ping()
                    await self.ensure_groups()
                    await self.pending_pass()
                    next_pending_pass = loop.time() + self.pending_interval
                await self._read_new()
                self.healthy = True
                delay = 0.2
            except Exception as exc:
                if not (isinstance(exc, UNAVAILABLE) or is_missing_group(exc)):
                    raise
                self.healthy = False
                log.warning("intake paused, retrying in %.1fs: %s", delay, exc)
                next_pending_pass = 0.0
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    @property
    def pending_interval(self) -> float:
        return max(1.0, min(self.settings.claim_idle / 2, 15.0))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read_new(self) -> None:
        """Entries never delivered before, of both streams, handled in entry-id order."""
        reply = await self.redis.xreadgroup(self.settings.consumer_group, self.settings.consumer_name,
                                            {s: ">" for s in self.streams}, count=READ_COUNT, block=BLOCK_MS)
        entries = [(_entry_key(_text(eid)), _text(stream), _text(eid), fields, 1)
                   for stream, items in reply or [] for eid, fields in items]
        await self._process_in_order(entries)

    async def pending_pass(self) -> None:
        """Entries delivered before and not acknowledged: ours (a crash before XACK, a failed
        handling) and those idle longer than RTMANAGER_CLAIM_IDLE in dead consumers' lists,
        of both streams together, in entry-id order."""
        group, me = self.settings.consumer_group, self.settings.consumer_name
        entries = []
        for stream in self.streams:
            items: list = []
            last = "0"
            while not self._stopping.is_set():
                reply = await self.redis.xreadgroup(group, me, {stream: last}, count=READ_COUNT)
                batch = reply[0][1] if reply else []
                if not batch:
                    break
                items.extend(batch)
                last = _text(batch[-1][0])
            cursor = "0-0"
            min_idle = 0 if self.claim_everything_once else int(self.settings.claim_idle * 1000)
            while not self._stopping.is_set():
                cursor, claimed, *_ = await self.redis.xautoclaim(
                    stream, group, me, min_idle_time=min_idle, start_id=cursor, count=READ_COUNT)
                if claimed:
                    log.warning("claimed %d entries left pending by other consumers", len(claimed),
                                extra={"stream": stream})
                    items.extend(claimed)
                if _text(cursor) == "0-0":
                    break
            if items:
                ids = sorted((_text(i[0]) for i in items), key=_entry_key)
                pending = await self.redis.xpending_range(stream, group, min=ids[0], max=ids[-1],
                                                          count=len(ids) + 1000)
                deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
                entries += [(_entry_key(_text(eid)), stream, _text(eid), fields, deliveries.get(_text(eid), 1))
                            for eid, fields in items]
        self.claim_everything_once = False
        await self._process_in_order(entries)

    async def _process_in_order(self, entries: list) -> None:
        """One game's entries are never applied out of order: after one of them stays pending,
        the later ones of the same game wait for the next pending pass too."""
        entries.sort(key=lambda e: e[0])
        held: set[bytes | str] = set()
        for _, stream, entry_id, fields, deliveries in entries:
            if self._stopping.is_set():
                return
            game = _raw_field(fields, "game_id")
            if game is not None and game in held:
                continue
            if not await self._process(stream, entry_id, fields, deliveries) and game is not None:
                held.add(game)

    async def _process(self, stream: str, entry_id: str, fields: dict | None, deliveries: int) -> bool:
        """Handle one entry, then acknowledge it; a failing entry stays pending and is retried
        by the next pending pass, until it is dead-lettered. Returns False when it stays pending."""
        group = self.settings.consumer_group
        if fields is None:  # deleted from the stream while pending: nothing to carry out
            await self.redis.xack(stream, group, entry_id)
            return True
        failed_here = self._handling_failures.get((stream, entry_id), 0)
        if (deliveries > self.settings.max_deliveries and failed_here) or \
                deliveries > self.settings.max_deliveries * POISON_FACTOR:
            # Failed in this process, or delivered so often that it must be crashing processes.
            await self.dead_letter(stream, entry_id, fields, deliveries)
            await self.redis.xack(stream, group, entry_id)
            self._handling_failures.pop((stream, entry_id), None)
            return True
        try:
            await self.handle(stream, entry_id, fields)
        except (*UNAVAILABLE, Fenced):
            raise
        except Exception as exc:
            if is_missing_group(exc):
                raise
            # A failure that is not an outage: count it here, so that outages (which also
            # raise the delivery count in Redis) never push a good entry to the dead letters.
            self._handling_failures[(stream, entry_id)] = self._handling_failures.get((stream, entry_id), 0) + 1
            self.metrics.jobs.labels(stream, "error").inc()
            log.exception("could not handle entry (delivery %d of at most %d); it stays pending",
                          deliveries, self.settings.max_deliveries, extra={"stream": stream, "entry_id": entry_id})
            return False
        await self.redis.xack(stream, group, entry_id)
        self._handling_failures.pop((stream, entry_id), None)
        return True

    async def dead_letter(self, stream: str, entry_id: str, fields: dict, deliveries: int) -> None:
        """Never drop an entry silently: a failed operation, its result, and a copy for operators."""
        kind = self.streams[stream]
        raw_game = fields.get(b"game_id", fields.get("game_id", b""))
        game_id = shown_game_id(raw_game.decode("utf-8", "replace") if isinstance(raw_game, bytes) else raw_game)
        message = f"dead-lettered after {deliveries} deliveries: the entry could not be handled"
        outcome = await self.store.reject_entry(kind=kind, game_id=game_id, stream=stream, entry_id=entry_id,
                                                code=ErrorCode.INTERNAL_ERROR, message=message)
        if outcome.duplicate:
            return  # it had been carried out; only the XACK was missing
        copy = {**fields, "rtm_source_stream": stream, "rtm_entry_id": entry_id,
                "rtm_deliveries": str(deliveries), "rtm_error": message}
        await self.redis.xadd(self.settings.dead_letter_stream, copy)
        self.metrics.jobs.labels(stream, "dead_letter").inc()
        log.error("dead-lettered entry", extra={"stream": stream, "entry_id": entry_id, "game_id": game_id,
                                                "deliveries": deliveries})
        self._results_written()

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

