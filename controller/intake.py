"""Intake: job streams -> desired state, never touching Docker.

For each entry: parse and validate, then admission (controller/admission.py)
writes the desired-state change and an operation row in one transaction (or, for
a bad entry, a failed operation and its ``invalid_request`` result); only then
XACK. A crash between the commit and the XACK redelivers the entry, and the
(stream, entry id) key of the operation log makes the second delivery a no-op.

**Order.** The entries of one game take effect in entry-id order across all job
streams, whatever the backlog:

* Entry ids order entries across streams, except within one millisecond, where
  the start stream's entries come first and the stop stream's last (``order``).
* New entries are merged across streams. XREADGROUP's COUNT applies to each
  stream separately, so one read can return the 500 oldest starts and a much
  later stop; an entry is therefore handled only once every other stream is
  either *exhausted* (its last read returned less than COUNT: nothing older is
  waiting there) or has a buffered entry at least as new. A stream whose buffer
  runs dry is read again before anything newer is handled.
* After an entry of a game fails (it stays pending), every later entry of that
  game is left pending too (``held``), across reads, until a pending pass has
  handled the first one or dead-lettered it.
* A pending pass (at start, after an outage, on election, and every few
  seconds) re-reads this consumer's pending entries and claims entries idle in
  dead consumers' lists (XPENDING then XCLAIM; an entry deleted from its stream
  is answered without being claimed; a new leader claims everything its
  predecessor left at once), and handles them in
  the same merge as new entries: a stop delivered early (a round cut by an
  outage, a crash, a fail-over) waits until the streams are read past it.
* Only the leader reads, and only while its term is valid (``fence``); after
  every read it takes over whatever other consumers hold pending (a deposed
  leader's last read), before it applies anything newer.

**Attempts, not deliveries.** Redis counts a delivery every time a pending entry
is read again, outages included. Only handling attempts that failed for a reason
other than an outage (or that crashed the process: an attempt of a re-read entry
is counted durably *before* it runs) count toward RTMANAGER_MAX_DELIVERIES; past
that the entry is dead-lettered: a failed operation with internal_error, its
result, and a copy on RTMANAGER_DEAD_LETTER_STREAM. Nothing is dropped silently.

**Marks.** Every few seconds the intake stores, per stream, the highest entry id
at or below which everything has been handled (below the group's oldest pending
entry). A consumer group that vanished (deleted, renamed, Redis restored from an
older snapshot) is created again from that mark, an entry at or below it is
acknowledged and never applied again, and job streams are trimmed only below it
(and never inside the last RTMANAGER_STREAM_KEEP seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time

from controller.admission import Admission
from controller.config import StreamSettings
from controller.metrics import Metrics
from controller.streams import Entry, GroupInfo, GroupMissing, RedisStreams, StreamsUnavailable, entry_key
from desired.errors import StoreBusy, StoreUnavailable
from desired.jobs import ImageAllowlist, InvalidJob, Job, parse_control, parse_job, shown_game_id
from desired.leader import Fence, Fenced
from desired.model import CONTROL_OPS, ErrorCode, JobKind, OpSource
from desired.ports import IntakeStore
from desired.values import Rejection, SubmitOutcome

log = logging.getLogger("rtmanager.intake")

# A backlog costs a fixed number of round trips per read (XREADGROUP, the XPENDING of claim_others,
# the same-millisecond re-read) and per batch (BEGIN, fence, duplicates, locks, records, ids, two
# executemany, COMMIT, XACK): on a loaded host each round trip is milliseconds of scheduling, so
# these sizes, not Postgres, bounded a flood (200 a transaction: about 1,000-1,300 entries/s here).
READ_COUNT = 500        # entries read per stream per XREADGROUP
BLOCK_MS = 1000
MAX_MARK_MS = 2**63 - 1  # a stream mark's millisecond is a bigint column (its sequence a 20-digit numeric)
BATCH = 1000            # new entries admitted in one transaction
OUTAGES = (StreamsUnavailable, StoreUnavailable, GroupMissing)
MAX_SEQ = 2**64 - 1
DELETED = ("the entry was deleted from its stream (XDEL, or a MAXLEN trim) before rtmanager handled it: "
           "nothing was carried out")
SAME_MS_SETTLE = 0.002   # past one millisecond of Redis' clock: see _merge
READ_MARGIN = 0.5        # a blocking read ends this long before the leadership term could lapse
COPIED_KEPT = 10_000     # dead letters copied and not answered yet that this process remembers


def previous_id(entry_id: str) -> tuple[int, int]:
    """The entry id just before ``entry_id``."""
    ms, seq = entry_key(entry_id)
    return (ms, seq - 1) if seq > 0 else (ms - 1, MAX_SEQ)


class Intake:
    def __init__(self, config: StreamSettings, streams: RedisStreams, store: IntakeStore, admission: Admission,
                 metrics: Metrics, fence: Fence | None = None, *, allowlist: ImageAllowlist) -> None:
        self.config = config
        self.allowlist = allowlist  # RTMANAGER_IMAGE_ALLOWLIST
        self.redis_streams = streams
        self.store = store
        self.admission = admission
        self.metrics = metrics
        self.fence = fence  # no read without a valid term (None: no leadership, as in the unit tests)
        # The control stream's entries name their op; JobKind.RECONCILE answers one that names none.
        self.kinds: dict[str, JobKind] = {config.start_stream: JobKind.START,
                                          config.control_stream: JobKind.RECONCILE,
                                          config.stop_stream: JobKind.STOP}
        self._rank = {config.start_stream: 0, config.control_stream: 1, config.stop_stream: 2}
        self._stopping = asyncio.Event()
        self.healthy = False
        self.claim_everything_once = True  # a new leader takes over what the old one left pending
        self.held: set[bytes | str] = set()            # games with an entry left pending: later ones wait
        self.marks: dict[str, tuple[int, int]] = {}
        self._mark_overflow: set[str] = set()  # streams whose ids outgrew the mark's columns (logged once)
        self.skipped_below_mark = 0
        # (stream, entry id) of dead letters whose copy this process wrote and whose answer is not committed
        # yet: a copy at every failing attempt would push other entries' copies out of the capped stream.
        self._copied: set[tuple[str, str]] = set()
        self._renumber_off = False  # set once no stream could be renumbered (XSETID refused): not tried again


    @property
    def stream_names(self) -> list[str]:
        return list(self.kinds)

    def order(self, entry: Entry) -> tuple[int, int, int]:
        """Entry-id order across streams. Redis numbers each stream on its own, so entries of two
        streams within one millisecond cannot be ordered by their ids; then the start stream's come
        first, the control stream's next and the stop stream's last: a stop is never applied before
        a start it may follow (the other choice could leave running a game Lobby believes stopped)."""
        ms, seq = entry_key(entry.id)
        return ms, self._rank[entry.stream], seq

    def stop(self) -> None:
        self._stopping.set()

    @property
    def pending_interval(self) -> float:
        return max(1.0, min(self.config.claim_idle / 2, 15.0))

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.2
        next_pending_pass = 0.0  # first our own pending entries and dead consumers', then new ones
        next_maintenance = loop.time() + self.pending_interval
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_pending_pass:
                    await self.ensure_groups()
                    await self.pending_pass()
                    next_pending_pass = loop.time() + self.pending_interval
                await self.read_round()
                if loop.time() >= next_maintenance:
                    # Due again in an interval even when it fails: a maintenance that keeps failing must not
                    # hold every read round in the loop's backoff.
                    next_maintenance = loop.time() + self.pending_interval
                    await self.maintain()
                self.healthy = True
                self.metrics.loop_ok("intake")
                delay = 0.2
            except Fenced:
                raise  # the term is over: the composition root steps down
            except Exception as exc:  # noqa: BLE001 - an outage, or an error nobody classified: back off, never die
                self.healthy = False
                self.metrics.loop_failed("intake", exc)
                if isinstance(exc, OUTAGES):
                    log.warning("intake paused, retrying in %.1fs: %s", delay, exc)
                else:
                    log.exception("intake failed unexpectedly, retrying in %.1fs", delay)
                next_pending_pass = 0.0
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def ensure_groups(self) -> None:
        """Create missing groups from the stored mark (id 0 when there is none); then, when a stream's last
        id is below its mark, renumber the job streams (``_renumber``)."""
        self.marks = await self.store.stream_marks()
        behind = False
        for stream in self.stream_names:
            mark = self.marks.get(stream)
            start = f"{mark[0]}-{mark[1]}" if mark else "0"
            if await self.redis_streams.ensure_group(stream, start):
                log.info("created consumer group %s on %s from %s", self.config.consumer_group, stream, start)
            if mark:
                last = await self.redis_streams.last_id(stream)
                behind = behind or (last is not None and entry_key(last) < mark)
        if behind and not self._renumber_off:
            await self._renumber()

    async def _renumber(self) -> None:
        """A stream numbers below what was handled: Redis lost its data, and its clock is behind (Redis numbers
        entries from its clock). The group never delivers entries at or below the mark, and an id that an
        entry handled before had is taken for that entry again. So every job stream is raised above one
        floor: the highest of the marks and of the entry ids in the operation log, the same for the three
        streams, so that one stream's entries do not all sort before another's (entry ids order them).
        While Redis' clock is behind that floor it numbers every entry in the floor's millisecond, where
        entries of two streams are ordered by stream rank, not by when they were sent: logged."""
        floors = [*self.marks.values(), *(await self.store.highest_entries()).values()]
        floor = max(floors)
        shown = f"{floor[0]}-{floor[1]}"
        tried = raised = 0
        for stream in self.stream_names:
            last = await self.redis_streams.last_id(stream)
            if last is None or entry_key(last) >= floor:
                continue
            tried += 1
            if await self.redis_streams.raise_last_id(stream, shown):
                raised += 1
                log.warning("stream %s numbered its entries below what was handled (%s; Redis lost its data and "
                            "its clock is behind): its next ids are above it. Until Redis' clock passes it, entries "
                            "of two job streams are ordered by stream, not by when they were sent",
                            stream, shown, extra={"stream": stream})
        if tried and not raised and not self.redis_streams.sets_ids:
            # The server refuses XSETID (logged by the adapter): reading the whole operation log at every
            # pass would change nothing. Not tried again in this process.
            self._renumber_off = True

    # ------------------------------------------------------------------ reads
    def _may_read(self, block_ms: int | None = None) -> int | None:
        """Raise Fenced unless this replica's term is valid; a blocking read is cut to end before
        the term could lapse. Whatever a deposed leader read would sit in its pending list, out of
        the new leader's order, so no read happens without a valid fence."""
        if self.fence is None:
            return block_ms
        if not self.fence.valid_locally:
            raise Fenced(f"leadership term {self.fence.epoch} has lapsed; no more reads")
        if block_ms:
            left_ms = int((self.fence.deadline - time.monotonic() - READ_MARGIN) * 1000)
            block_ms = min(block_ms, left_ms) if left_ms > 0 else None
        return block_ms

    async def _read(self, names: list[str], block_ms: int | None,
                    first: bool = False) -> tuple[list[Entry], list[Entry]]:
        """New entries of ``names``, then every entry another consumer holds pending (a deposed
        leader's last read, taken before ours): the leader takes those over at once, before it
        applies anything newer, even when nothing new came (its late read may have taken the last
        entry there was)."""
        block = self._may_read(block_ms)
        got = await self.redis_streams.read_new(names, READ_COUNT, block)
        self._may_read()
        taken = await self.redis_streams.claim_others(self.stream_names, READ_COUNT)
        if not got and not taken and first and block_ms and not block:
            await self._sleep(0.05)  # the term ends within READ_MARGIN unless renewed: do not spin
        return got, taken

    async def read_round(self, block_ms: int | None = BLOCK_MS) -> int:
        """Wait (bounded) for new entries, then handle every entry that has come, merged across
        streams in entry-id order (``_merge``). Returns how many were looked at."""
        names = list(self.stream_names)
        sent = asyncio.get_running_loop().time()
        got, taken = await self._read(names, block_ms, first=True)
        if not got and not taken:
            return 0
        return await self._merge(got, taken, read=names, sent=sent)

    async def _merge(self, got: list[Entry], taken: list[Entry], *, read: list[str], sent: float) -> int:
        """Handle delivered entries, new (``got``, from a read of the streams ``read`` sent at
        ``sent``) and delivered before (``taken``: pending, claimed), merged across streams in
        entry-id order with the entries still unread.

        A stream's delivered entries all go before its unread ones. The merge takes the smallest
        head only when no stream can still hold an entry that goes before it. A stream whose buffer
        holds entries cannot; a stream with an empty buffer can, unless it was read after the head
        was fetched, and at least SAME_MS_SETTLE after: entries Lobby sends to two streams within
        one millisecond are ordered by stream rank, and the second may land a moment after the
        first was read. So before a head is taken, every empty stream not read since then is read
        again (in one XREADGROUP, which sees all of them at one instant). Entries delivered before
        (a round cut by an outage or a crash, a predecessor's) go through the same merge: a stop
        delivered early never goes before a start not yet read."""
        loop = asyncio.get_running_loop()
        names = list(self.stream_names)
        buffers: dict[str, list[tuple[float, Entry, bool]]] = {s: [] for s in names}
        known: set[tuple[str, str]] = set()

        def take(entries: list[Entry], reread: bool, fetched: float) -> None:
            for e in entries:
                if (e.stream, e.id) not in known and e.stream in buffers:
                    known.add((e.stream, e.id))
                    buffers[e.stream].append((fetched, e, reread))

        fetched = loop.time()
        take(got, False, fetched)
        take(taken, True, fetched)
        for s in names:
            buffers[s].sort(key=lambda b: self.order(b[1]))
        # Streams not read yet may hold older entries: read before anything is taken past their buffer.
        more = {s: s not in read or sum(not b[2] for b in buffers[s]) >= READ_COUNT for s in names}
        read_at = {s: sent if s in read else float("-inf") for s in names}  # when last asked (a lower bound)
        seen = 0
        batch: list[Entry] = []
        while not self._stopping.is_set():
            heads = [(self.order(buffers[s][0][1]), s) for s in names if buffers[s]]
            head = min(heads)[1] if heads else None
            due = buffers[head][0][0] + SAME_MS_SETTLE if head is not None else None
            stale = [s for s in names if not buffers[s] and (more[s] or (due is not None and read_at[s] < due))]
            if stale:
                if due is not None and loop.time() < due:
                    await asyncio.sleep(due - loop.time())
                sent = loop.time()
                got, taken = await self._read(stale, None)
                fetched = loop.time()
                counts = {s: 0 for s in names}
                for e in got:
                    counts[e.stream] += 1
                take(got, False, fetched)
                take(taken, True, fetched)
                if taken:
                    for s in names:
                        buffers[s].sort(key=lambda b: self.order(b[1]))
                for s in stale:
                    read_at[s] = sent
                    more[s] = counts[s] >= READ_COUNT
                continue
            if head is None:
                break
            _, entry, reread = buffers[head].pop(0)
            seen += 1
            game = entry.field("game_id")
            if game is not None and game in self.held:
                continue  # stays pending behind an earlier entry of its game
            if reread:  # on its own, its attempt counted first; what came before it is admitted first
                await self._admit(batch)
                batch = []
                if game is not None and game in self.held:
                    continue  # an earlier entry of its game, just admitted, failed: it holds this one
                if not await self._process(entry, reread=True) and game is not None:
                    self.held.add(game)
                continue
            batch.append(entry)
            if len(batch) >= BATCH:
                await self._admit(batch)
                batch = []
        await self._admit(batch)
        return seen

    async def pending_pass(self) -> None:
        """Entries delivered before and not acknowledged: ours (a crash before XACK, a failed
        handling, a round cut short, entries held behind those) and those idle longer than
        RTMANAGER_CLAIM_IDLE in dead consumers' lists, of all streams together, merged in entry-id
        order with the entries not read yet (``_merge``), each game's failed entry holding its
        later ones again."""
        min_idle = 0 if self.claim_everything_once else int(self.config.claim_idle * 1000)
        entries: dict[tuple[str, str], Entry] = {}
        for stream in self.stream_names:
            self._may_read()
            for e in await self.redis_streams.read_own_pending(stream, READ_COUNT):
                entries[(e.stream, e.id)] = e
            self._may_read()
            claimed = await self.redis_streams.claim_idle(stream, min_idle, READ_COUNT)
            if claimed:
                log.warning("claimed %d entries left pending by other consumers", len(claimed),
                            extra={"stream": stream})
            for e in claimed:
                entries[(e.stream, e.id)] = e
        self.claim_everything_once = False
        self.held = set()
        await self._merge([], list(entries.values()), read=[], sent=float("-inf"))

    # --------------------------------------------------------------- handling
    async def _admit(self, batch: list[Entry]) -> None:
        """New entries, in order, admitted in one transaction and acknowledged together. When the
        batch fails for a reason that is not an outage, each entry is handled on its own, so that
        only the failing one (and its game's later entries) stays pending."""
        if not batch:
            return
        items: list[Job | Rejection] = []
        kept: list[Entry] = []
        for entry in batch:
            if self._below_mark(entry):
                await self.redis_streams.ack(entry.stream, entry.id)
                continue
            items.append(self._parse(entry))
            kept.append(entry)
        if not items:
            return
        try:
            outcomes = await self.admission.submit_many(items)
        except StoreBusy as exc:  # a game of the batch is locked by another session: it alone waits
            log.warning("a batch of %d entries waited too long for a game's lock; handling them one by one: %s",
                        len(kept), exc)
            await self._one_by_one(kept)
            return
        except (*OUTAGES, Fenced):
            raise
        except Exception:  # noqa: BLE001 - isolate the entry that fails, one by one
            log.exception("a batch of %d entries failed; handling them one by one", len(kept))
            await self._one_by_one(kept)
            return
        for item, outcome in zip(items, outcomes, strict=True):
            self._account(item, outcome)
        by_stream: dict[str, list[str]] = {}
        for entry in kept:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        for stream, ids in by_stream.items():
            await self.redis_streams.ack(stream, *ids)

    async def _one_by_one(self, kept: list[Entry]) -> None:
        """A batch that failed, each entry on its own: only the failing one, and its game's later entries, stay
        pending."""
        held: set[bytes | str] = set()
        for entry in kept:
            game = entry.field("game_id")
            if game is not None and (game in held or game in self.held):
                continue
            if not await self._process(entry, reread=False) and game is not None:
                held.add(game)
        self.held |= held

    def _below_mark(self, entry: Entry) -> bool:
        mark = self.marks.get(entry.stream)
        if mark is None or entry_key(entry.id) > mark:
            return False
        # Handled before (the group was recreated, or Redis went back in time): never twice.
        self.skipped_below_mark += 1
        self.metrics.jobs.labels(entry.stream, "below_mark").inc()
        log.info("entry at or below the stream's handled mark; acknowledged without applying it again",
                 extra={"stream": entry.stream, "entry_id": entry.id})
        return True

    def _parse(self, entry: Entry) -> Job | Rejection:
        kind = self.kind_of(entry)
        fields = entry.fields
        if fields is None:
            # Deleted from its stream while pending (XDEL, or its producer's MAXLEN trim): nothing is left to
            # carry out, but its sender waits for an answer: a failure, with the entry id and no game.
            return Rejection(kind=kind, game_id="", stream=entry.stream, entry_id=entry.id,
                             code=ErrorCode.INVALID_REQUEST, message=DELETED)
        try:
            if entry.stream == self.config.control_stream:
                return parse_control(fields, source=OpSource.LOBBY, stream=entry.stream, entry_id=entry.id)
            return parse_job(kind, fields, self.allowlist, source=OpSource.LOBBY,
                             stream=entry.stream, entry_id=entry.id)
        except InvalidJob as bad:
            return Rejection(kind=kind, game_id=bad.game_id, stream=entry.stream, entry_id=entry.id,
                             code=bad.code, message=bad.message)

    def _account(self, item: Job | Rejection, outcome: SubmitOutcome) -> None:
        stream = item.stream
        if outcome.duplicate:
            self.metrics.jobs.labels(stream, "duplicate").inc()
        elif isinstance(item, Rejection):
            # An entry deleted while pending is answered as a rejection, and counted apart (``_parse``).
            self.metrics.jobs.labels(stream, "deleted" if item.message == DELETED else "rejected").inc()
            log.warning("rejected job: %s", item.message, extra={
                "stream": stream, "entry_id": item.entry_id, "error_code": item.code.value, "game_id": item.game_id})
        else:
            decision = outcome.decision
            assert decision is not None  # None only for a duplicate
            self.metrics.jobs.labels(stream, decision.action).inc()
            log.info("%s job: %s", item.kind.value, decision.action,
                     extra={"game_id": item.game_id, "operation_id": outcome.operation_id, "entry_id": item.entry_id,
                            "error_code": decision.error_code.value if decision.error_code else ""})

    async def _process(self, entry: Entry, *, reread: bool) -> bool:
        """Handle one entry, then acknowledge it. A failing entry stays pending (False) and is
        tried again by a pending pass, until it is dead-lettered."""
        stream, entry_id = entry.stream, entry.id
        if self._below_mark(entry):
            await self.redis_streams.ack(stream, entry_id)
            return True
        attempts = 0
        if reread:
            # Counted before it runs, so that an entry that kills the process counts too.
            attempts = await self.store.count_attempt(stream, entry_id)
            if attempts > self.config.max_deliveries:
                try:
                    await self.dead_letter(entry, attempts - 1)
                except (*OUTAGES, Fenced):
                    raise
                except Exception:  # noqa: BLE001 - its copy or answer refused for good (an ACL, a bug): this
                    # entry stays pending and holds its game; raised, it stopped every pass, every game's entries
                    self.metrics.jobs.labels(stream, "error").inc()
                    log.exception("could not dead-letter the entry; it stays pending, and later entries of its "
                                  "game wait", extra={"stream": stream, "entry_id": entry_id})
                    return False
                await self.redis_streams.ack(stream, entry_id)
                return True
        try:
            await self.handle(entry)
        except StoreBusy as exc:
            # Its game's record is locked by another session: not this entry's fault, nor an outage of every
            # game. It stays pending (its game's later entries behind it); a pending pass tries it again.
            if reread:
                try:
                    await self.store.uncount_attempt(stream, entry_id)
                except OUTAGES:
                    pass
            log.warning("entry left pending: %s", exc.message, extra={"stream": stream, "entry_id": entry_id})
            return False
        except (*OUTAGES, Fenced):
            if reread:
                try:
                    await self.store.uncount_attempt(stream, entry_id)  # an outage is not the entry's fault
                except OUTAGES:
                    pass
            raise
        except Exception as exc:  # noqa: BLE001 - a failure of this entry, not of a service
            if not reread:
                attempts = await self.store.count_attempt(stream, entry_id, f"{exc.__class__.__name__}: {exc}")
            self.metrics.jobs.labels(stream, "error").inc()
            log.exception("could not handle entry (attempt %d of at most %d); it stays pending",
                          attempts, self.config.max_deliveries, extra={"stream": stream, "entry_id": entry_id})
            return False
        await self.redis_streams.ack(stream, entry_id)
        if attempts:
            try:
                await self.store.forget_attempts(stream, entry_id)
            except OUTAGES:
                pass  # retention removes it
        return True

    def kind_of(self, entry: Entry) -> JobKind:
        if entry.stream == self.config.control_stream:
            raw = entry.field("op")
            op = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            return next((k for k in CONTROL_OPS if k.value == op), JobKind.RECONCILE)
        return self.kinds[entry.stream]

    async def handle(self, entry: Entry) -> None:
        """One entry on its own (a re-read one, or one of a batch that failed)."""
        item = self._parse(entry)
        if isinstance(item, Job):
            try:
                outcome = await self.admission.submit(item)
            except InvalidJob as bad:  # the state path check of a new record
                item = Rejection(kind=item.kind, game_id=item.game_id, stream=entry.stream, entry_id=entry.id,
                                 code=bad.code, message=bad.message)
        if isinstance(item, Rejection):
            outcome = await self.admission.reject(kind=item.kind, game_id=item.game_id, stream=entry.stream,
                                                  entry_id=entry.id, code=item.code, message=item.message)
        self._account(item, outcome)

    async def dead_letter(self, entry: Entry, attempts: int) -> None:
        """Never drop an entry silently: a failed operation, its result, and a copy for operators."""
        kind = self.kind_of(entry)
        raw_game = entry.field("game_id") or b""
        game_id = shown_game_id(raw_game.decode("utf-8", "replace") if isinstance(raw_game, bytes) else raw_game)
        message = f"dead-lettered after {attempts} failed attempts: the entry could not be handled"
        # The copy first: answered first, a copy Redis then refused (MISCONF, OOM) was skipped at the next
        # attempt, which found the answer there, and the entry's fields were nowhere any more. So a copy may
        # be written twice (the answer's commit failed after it, and the process ended before it was made;
        # this process copies it once, ``_copied``); an entry carried out whose XACK kept
        # failing until its attempts ran out gets a copy it did not need, its answer standing as it was.
        key = (entry.stream, entry.id)
        if key not in self._copied:
            copy = {**(entry.fields or {}), "rtm_source_stream": entry.stream, "rtm_entry_id": entry.id,
                    "rtm_attempts": str(attempts), "rtm_error": message}
            await self.redis_streams.add(self.config.dead_letter_stream, copy,
                                         maxlen=self.config.dead_letter_maxlen or None)
            if len(self._copied) >= COPIED_KEPT:
                self._copied.clear()  # a copy more for those, at worst
            self._copied.add(key)
        outcome = await self.admission.reject(kind=kind, game_id=game_id, stream=entry.stream, entry_id=entry.id,
                                              code=ErrorCode.INTERNAL_ERROR, message=message)
        self._copied.discard(key)
        if outcome.duplicate:
            return  # answered before: by a dead-lettering whose copy Redis refused, or it had been carried out
        self.metrics.jobs.labels(entry.stream, "dead_letter").inc()
        log.error("dead-lettered entry", extra={"stream": entry.stream, "entry_id": entry.id, "game_id": game_id,
                                                "attempts": attempts})

    # ------------------------------------------------------------ maintenance
    def _measure(self, stream: str, info: GroupInfo) -> None:
        """How far behind the intake is on ``stream``: entries not read, read and not acknowledged, and
        the age of the oldest of them (from its id, the milliseconds Redis gave it when it was added)."""
        if info.lag is not None:
            self.metrics.stream_lag.labels(stream).set(info.lag)
        self.metrics.stream_pending.labels(stream).set(info.pending)
        oldest = [entry_key(e)[0] for e in (info.oldest_pending, info.oldest_unread) if e]
        age = max(0.0, time.time() - min(oldest) / 1000) if oldest else 0.0
        self.metrics.stream_oldest_seconds.labels(stream).set(age)

    async def maintain(self) -> None:
        """Store each stream's handled mark, then trim what lies below it (and outside the keep window)."""
        keep_floor = (int((time.time() - self.config.stream_keep) * 1000), 0)
        for stream in self.stream_names:
            info = await self.redis_streams.group_info(stream)
            if info is None:
                continue
            self._measure(stream, info)
            if info.oldest_pending:
                mark = previous_id(info.oldest_pending)
            else:
                mark = entry_key(info.last_delivered)
            if mark <= (0, 0):
                continue
            if mark[0] > MAX_MARK_MS:
                # An entry id past what the mark's columns hold (Redis takes an explicit id of 2**63 ms,
                # and every automatic id after it follows): the entries are handled as any; the mark stays
                # where it is, which is safe (lower only means more re-reads deduplicated after a loss of
                # the group), and the stream is no longer trimmed past it. An operator's matter.
                if stream not in self._mark_overflow:
                    self._mark_overflow.add(stream)
                    log.error("stream %s holds entry ids past %d ms (%s): its handled mark stays at %s and the "
                              "stream is no longer trimmed past it; recreate the stream to end this", stream,
                              MAX_MARK_MS, f"{mark[0]}-{mark[1]}", self.marks.get(stream), extra={"stream": stream})
                mark = self.marks.get(stream, (0, 0))
                if mark <= (0, 0):
                    continue
            self.marks[stream] = await self.store.advance_mark(stream, mark)
            if self.config.stream_keep >= 0:
                below = min(self.marks[stream], keep_floor)
                if below > (0, 0):
                    trimmed = await self.redis_streams.trim_below(stream, f"{below[0]}-{below[1]}")
                    if trimmed:
                        log.info("trimmed %d handled entries", trimmed, extra={"stream": stream})
