"""The outbox relay: results and snapshots committed in Postgres -> their streams.

Results are read in commit order (``seq``) and published one by one, so the
results of one game never overtake each other. A result is marked published
only after XADD answered. After a start or a failure the relay first looks for
pending results in the stream's recent tail (an XADD whose answer or marking was
lost) and marks those instead of adding them again; a result older than that
tail could still be published twice, with the same ``result_id``
(at-least-once; consumers dedupe on it). While Redis or Postgres is away the
relay backs off and resumes by itself.

**Results that Redis lost.** XADD answering is not durability: with AOF
``everysec`` or an asynchronous replica, a Redis that crashes loses the last
acknowledged entries. Whenever Redis comes back (a reconnect after an error, or
a new server ``run_id``), the relay compares what it marked published recently
with what the stream really holds (the entry ids XADD answered, read without
the entries' fields) and publishes again, with the same ``result_id``, whatever
is missing.

**One publisher at a time.** ``flush`` holds a lock: the shutdown's last flush
and the loop never publish the same batch twice.

**A stalled relay shows.** A pass (the check above, then publishing) that neither
finishes nor makes progress for ``stall_limit`` seconds, whether it keeps failing
(a statement timeout is retried like an outage) or hangs, makes ``/readyz`` answer
503 naming the relay, and ``rtmanager_relay_stalled_seconds`` says for how long.

The results and snapshot streams are trimmed here (approximate MAXLEN); job streams are
trimmed by the intake, below what it has handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from controller import snapshot_floor
from controller.config import StreamSettings
from controller.metrics import Metrics
from controller.streams import GroupMissing, RedisStreams, StreamsUnavailable, entry_key
from desired.errors import StoreUnavailable
from desired.leader import Fenced
from desired.ports import RelayStore
from desired.values import PendingResult

log = logging.getLogger("rtmanager.relay")

BATCH = 1000  # results per pass: one SELECT, one pipelined XADD round trip, one UPDATE
IDLE_POLL = 5.0  # a fallback only: a commit that writes the outbox wakes the relay at once (desired/wakeup.py)
# Seconds the loop keeps the marks of what it published for the next read (one statement marks them and
# reads what follows) before it writes them alone: a steady flow of results costs a statement a pass.
MARK_DELAY = 0.1
# While results flow (the previous read found some), the next read waits until this long after it: every
# commit that writes the outbox wakes the relay, and at 1,000 games with turns that was a read (and a
# statement) for every one or two rows. An idle relay reads at once, so a lone result is not delayed.
GATHER = 0.05
TAIL_SCAN = 2000  # results looked at for a possibly-published result after a failure
VERIFY_WINDOW = 600.0  # seconds of published results checked against the stream after a Redis restart
# At most this much more: the time since the relay last got through (an outage, or a term that began after
# a long time as a standby). Bounded, so that a new leader's first check stays short.
VERIFY_OUTAGE_MAX = 86_400.0
STALL_LIMIT = 60.0  # seconds a pass may go without finishing or progress before /readyz says so
OUTAGES = (StreamsUnavailable, StoreUnavailable, GroupMissing)
FLOOR_RETRY = 60.0  # seconds between tries of a snapshot floor that failed (controller/snapshot_floor.py)
ID_FIELD = {"result": "result_id", "snapshot": "snapshot_id"}  # what consumers dedupe on, per outbox kind


def gather_delay(*, now: float, last_read: float, found: int) -> float:
    """Seconds to wait before the next read: none after a read that found nothing, else what is left of
    GATHER since that read."""
    return max(0.0, last_read + GATHER - now) if found else 0.0


class RelayStalled(Exception):
    """The relay has not finished a pass, nor made progress, for longer than its stall limit."""


class Relay:
    def __init__(self, config: StreamSettings, streams: RedisStreams, store: RelayStore, metrics: Metrics) -> None:
        self.config = config
        self.redis = streams
        self.store = store
        self.metrics = metrics
        self.wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.healthy = False
        # After a start or a failure, an XADD may have gone through without its outbox row being
        # marked: look at the stream's tail before publishing again (fewer duplicates).
        self._suspect = True
        self._verify = True  # check the stream against what was marked published (start, reconnect)
        self._floor_due = True  # the snapshot floor is checked before the term's first publication
        self._floor_retry_at = 0.0
        self._run_id: str | None = None
        self._added: dict[str, int] = {}  # entries ever added to each stream, at the last look (check_server)
        self.republished = 0
        self.stall_limit = STALL_LIMIT
        self._busy_since: float | None = None  # monotonic start of the pass (or series of failed ones) under way
        # (seq, stream entry id) of what the loop published and has not marked yet: marked by the next read's
        # statement, or alone after MARK_DELAY; before any check of the stream against what was marked.
        self._unmarked: list[tuple[int, str]] = []
        self.last_error = ""
        # When a flush last went through (monotonic; None: not yet in this process). The check of the streams
        # after Redis comes back covers VERIFY_WINDOW plus the time since: what was published right before a
        # long outage is checked too, not only what the last VERIFY_WINDOW before the check published.
        self._contact: float | None = None
        self.monotonic = time.monotonic
        metrics.relay_stalled.set_function(self.stalled_for)

    def stalled_for(self) -> float:
        """Seconds the pass under way (or the failures in a row) has gone without finishing or progress."""
        return 0.0 if self._busy_since is None else max(0.0, time.monotonic() - self._busy_since)

    def check_stalled(self) -> None:
        """For /readyz on the leader: RelayStalled when the relay has been stuck for too long."""
        stalled = self.stalled_for()
        if stalled > self.stall_limit:
            raise RelayStalled(f"no pass finished for {stalled:.0f}s" + (f": {self.last_error}" if self.last_error
                                                                          else ""))

    def _progress(self) -> None:
        if self._busy_since is not None:
            self._busy_since = time.monotonic()

    def poke(self) -> None:
        self.wake.set()

    def reset(self) -> None:
        """A new leadership term: run again, and trust nothing about the stream."""
        self._stopping = asyncio.Event()
        self._suspect = self._verify = True
        self._floor_due = True
        self._floor_retry_at = 0.0
        self._busy_since = None
        self._unmarked = []  # a previous term's: the tail check finds them on the stream

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()

    async def run(self) -> None:
        delay = 0.2
        loop = asyncio.get_running_loop()
        last_check = 0.0
        last_read, found = 0.0, 0
        while not self._stopping.is_set():
            if self._busy_since is None:
                self._busy_since = time.monotonic()
            try:
                if loop.time() - last_check >= IDLE_POLL:
                    await self.check_server()
                    last_check = loop.time()
                wait = gather_delay(now=loop.time(), last_read=last_read, found=found)
                if wait:
                    await self._sleep(wait)  # more commits come in the meantime: one read for them all
                last_read = loop.time()
                published = found = await self.flush(defer_marks=True)
                if self._unmarked and not self.wake.is_set():
                    # Nothing more to read now: wait a little for more, whose read marks these; else mark them.
                    if not await self._woken(MARK_DELAY):
                        async with self._lock:
                            await self._write_marks()
                self.healthy = True
                self._busy_since = None
                self.last_error = ""
                self.metrics.loop_ok("relay")
                delay = 0.2
            except Fenced:
                raise  # the term is over: the composition root steps down
            except Exception as exc:  # noqa: BLE001 - an outage, or an error nobody classified: back off, never die
                self.healthy = False
                self._suspect = self._verify = True
                self.last_error = str(exc)[:200]
                self.metrics.loop_failed("relay", exc)
                if isinstance(exc, OUTAGES):
                    log.warning("relay paused, retrying in %.1fs: %s", delay, exc)
                else:
                    log.exception("relay failed unexpectedly, retrying in %.1fs", delay)
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if published == 0 or not self.wake.is_set():
                # ``flush`` read until a batch came back short: what was committed after that read raised
                # ``wake`` (after its COMMIT), so an unraised wake means there is nothing more to read now.
                await self._sleep(IDLE_POLL, wake=True)

    async def _snapshot_floor(self) -> None:
        """Before anything of this term is published: revisions above those Lobby was sent, after a restore
        of the database (controller/snapshot_floor.py). An outage is the relay's as any (nothing could be
        published either: tried again with the rest). Any other failure is logged and the term publishes
        without it (results must never wait on a check of snapshots), and it is tried again FLOOR_RETRY
        seconds later: a raise found due is remembered in the database until it went through."""
        if time.monotonic() < self._floor_retry_at:
            return
        try:
            await snapshot_floor.raise_floor(self.redis, self.store, self.config.snapshot_stream)
        except (Fenced, *OUTAGES):
            raise
        except Exception:  # noqa: BLE001 - see above
            log.exception("could not raise the snapshot revisions above the snapshot stream's; publishing without it "
                          "(after a restore of the database, Lobby drops snapshots numbered below those it holds)")
            self._floor_retry_at = time.monotonic() + FLOOR_RETRY
            with contextlib.suppress(Exception):
                # Once this term has published, the stream's newest entries no longer tell: the retry reads
                # the whole stream (it raises nothing when the database was not behind).
                await self.store.note_floor_due()
            return
        self._floor_due = False

    async def _woken(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a wake (left raised for the next read); whether one came."""
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _write_marks(self) -> None:
        if self._unmarked:
            await self.store.mark_published_many(self._unmarked)
            self._unmarked = []

    async def _sleep(self, seconds: float, wake: bool = False) -> None:
        event = self.wake if wake else self._stopping
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        if wake:
            self.wake.clear()

    async def flush(self, *, defer_marks: bool = False) -> int:
        """Publish what is pending; return how many were published. With ``defer_marks`` (the loop), the
        marks of the last batch are kept for the next read's statement (``_unmarked``); without, nothing
        published is left unmarked."""
        async with self._lock:
            if self._floor_due:
                await self._snapshot_floor()
            if self._verify:
                # What was published but not marked yet is checked against the stream too.
                await self._write_marks()
                await self._verify_stream()
            total = 0
            while True:
                self.wake.clear()
                # One statement marks what the previous batch published and reads what follows.
                marks, self._unmarked = self._unmarked, []
                try:
                    batch = await self.store.mark_and_read_unpublished(marks, BATCH)
                except BaseException:
                    self._unmarked = marks  # not written: kept for the next statement
                    raise
                if self._suspect and batch:
                    batch = await self._skip_already_published(batch)
                self._suspect = False
                if batch:
                    # One round trip to Redis for the batch, in order; its marks go with the next read: a
                    # crash in between publishes them again with the same ids (the tail check).
                    ids = await self.redis.add_many([(self.stream_of(i.kind), i.fields) for i in batch],
                                                    maxlen=self.config.results_maxlen or None)
                    self._unmarked = [(i.seq, e) for i, e in zip(batch, ids, strict=True)]
                    for item in batch:  # counted once on the stream: a retry finds them in its tail
                        self._observe(item)
                        stream = self.stream_of(item.kind)
                        if stream in self._added:  # what the stream counts at the next look, at least
                            self._added[stream] += 1
                    self._progress()  # a long backlog is not a stall
                total += len(batch)
                if len(batch) < BATCH:
                    if not defer_marks:
                        await self._write_marks()
                    self._contact = self.monotonic()
                    return total

    def stream_of(self, kind: str) -> str:
        return self.config.snapshot_stream if kind == "snapshot" else self.config.results_stream

    def _observe(self, item: PendingResult) -> None:
        if item.kind == "snapshot":
            self.metrics.snapshots.labels(item.fields.get("reason", "")).inc()
            log.info("published snapshot", extra={"game_id": item.game_id, "reason": item.fields.get("reason"),
                                                  "status": item.fields.get("status")})
            return
        self.metrics.results.labels(item.fields.get("outcome", ""), item.fields.get("error_code", "")).inc()
        now = datetime.now(UTC)
        if item.written_at is not None:
            self.metrics.phase.labels("result_published").observe((now - item.written_at).total_seconds())
        if item.accepted_at is not None:
            self.metrics.convergence.labels(item.fields.get("job", ""), item.fields.get("outcome", "")) \
                .observe((now - item.accepted_at).total_seconds())
        log.info("published result", extra={"game_id": item.game_id, "result_id": item.result_id,
                                            "outcome": item.fields.get("outcome"),
                                            "error_code": item.fields.get("error_code")})

    async def _skip_already_published(self, batch: list[PendingResult]) -> list[PendingResult]:
        """Mark entries found in their stream's recent tail as published instead of adding them again."""
        found: dict[str, str] = {}
        for kind in {item.kind for item in batch}:
            found |= {value: eid for eid, value in await self.redis.recent_field(self.stream_of(kind), TAIL_SCAN,
                                                                                  ID_FIELD[kind])}
        rest: list[PendingResult] = []
        for item in batch:
            if item.result_id in found:
                log.info("result already on the stream; marking it published",
                         extra={"game_id": item.game_id, "result_id": item.result_id})
                await self.store.mark_published(item.seq, found[item.result_id])
            else:
                rest.append(item)
        return rest

    async def check_server(self) -> None:
        """A new Redis ``run_id`` means a restarted server, and a stream that counts fewer entries ever added
        than at the last look was deleted (DEL, FLUSHDB; a new one may have been made under its name): verify
        before the next publish."""
        run_id = await self.redis.server_run_id()
        if self._run_id is not None and run_id != self._run_id:
            log.warning("redis restarted (run_id changed); checking recent results against the stream")
            self._verify = True
            self.wake.set()
        self._run_id = run_id
        for kind in ID_FIELD:
            stream = self.stream_of(kind)
            added = await self.redis.entries_added(stream)
            before = self._added.get(stream)  # at the last look, plus what this relay added since
            if added is not None and before is not None and added < before:
                log.warning("the stream %s was deleted (it counts %d entries ever added, at least %d expected); "
                            "checking recent results against it", stream, added, before)
                self._verify = True
                self.wake.set()
            if added is not None:
                self._added[stream] = added

    async def _verify_stream(self) -> None:
        """Publish again what was marked published but is not on its stream (Redis lost it)."""
        self._run_id = await self.redis.server_run_id()
        for kind in ID_FIELD:
            await self._verify_kind(kind)
        self._verify = False

    async def _verify_kind(self, kind: str) -> None:
        stream = self.stream_of(kind)
        since = max(0.0, self.monotonic() - self._contact) if self._contact is not None else 0.0
        window = VERIFY_WINDOW + min(since, VERIFY_OUTAGE_MAX)
        recent = await self.store.recently_published(kind, window)
        if not recent:
            return
        first = await self.redis.stream_first_id(stream)
        oldest = min(recent, key=lambda r: entry_key(r[1]))[1]
        # Which of the entry ids the relay recorded (XADD's answers) the stream still holds: ids only,
        # the fields stay in Redis. A new entry never takes a lost one's id (ids grow with the clock).
        on_stream: set[str] = set()
        start = oldest if first is None or entry_key(oldest) > entry_key(first) else first
        while True:
            page = await self.redis.range_ids(stream, start, "+", 1000)
            on_stream.update(page)
            if len(page) < 1000:
                break
            ms, seq = entry_key(page[-1])
            start = f"{ms}-{seq + 1}"
        # What trimming (MAXLEN) removed is not lost. Only the relay adds to this stream, and an approximate
        # MAXLEN keeps at least the newest ``results_maxlen`` entries: an entry with fewer newer entries
        # published after it was not trimmed, so if it is missing, Redis lost it. Older ones are taken for
        # trimmed when they are older than the stream's first entry. (Found by review: the first entry
        # alone took for trimmed everything a Redis that restarted empty lost, once a new entry was added
        # before this check. Redis 7's max-deleted-entry-id does not say either: MAXLEN does not move it.)
        maxlen = self.config.results_maxlen
        floor = entry_key(first) if first else None
        newest_first = sorted(recent, key=lambda r: entry_key(r[1]), reverse=True)
        lost = [seq for rank, (seq, entry_id, _) in enumerate(newest_first)
                if entry_id not in on_stream and (not maxlen or rank < maxlen or floor is None
                                                  or entry_key(entry_id) >= floor)]
        if lost:
            log.warning("%d published results are missing from %s (Redis lost them); publishing them again "
                        "with the same result_id", len(lost), stream)
            await self.store.mark_unpublished(lost)
            self.republished += len(lost)
