"""What every part of the store shares: the pool, the one place a write transaction is opened
(``_tx``: the database clock and the leadership fence in its first statement), the record write
with its snapshot (one statement), the operation log's rows and the outbox inserts (``_snapshot_row``,
``_insert_result``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from desired import snapshots, transitions
from desired.clock import Clock
from desired.db.lease import check_fence, fence_and_read, lock_record
from desired.db.pool import translating
from desired.db.rows import (
    DESIRED_COLUMNS,
    INSERT_RESULT,
    changed,
    operation_from_row,
    record_write,
    result_row,
)
from desired.leader import Fence, Fenced
from desired.model import (
    ErrorCode,
    InvalidRecord,
    JobKind,
    JobResult,
    OpSource,
    OpStatus,
    Outcome,
    RuntimeRecord,
    Status,
    check_transition,
)
from desired.values import FLEET_OPS, Finish, Operation, ReconcilerNote, decided
from desired.wakeup import OUTBOX_CHANNEL, Signal

# How far this process's reading of the database clock may be from the database's own for a write
# that skips the lock to take its timestamps from it (``StoreBase._swap``), in seconds.
MAX_CLOCK_SKEW = 0.5
PENDING_KEPT = 10_000  # games whose pending jobs a store keeps from their look (StoreBase._pending_at)


async def log_fleet_change(conn: asyncpg.Connection, op: str, params: dict[str, Any], actor: str | None) -> None:
    """A change of the registry, a drain or a rollout in the operation log (no game; source admin), in the
    change's transaction."""
    if op not in FLEET_OPS:
        raise ValueError(f"not an operation of the fleet: {op}")
    await conn.execute(
        "INSERT INTO runtime_operations (game_id, op, source, status, params, actor, finished_at)"
        " VALUES (NULL, $1, 'admin', 'succeeded', $2::jsonb, $3, now())", op, json.dumps(params), actor)


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What a pending operation is answered: its row's new status, code and message, and its result."""
    op_id: int
    status: str
    code: str | None
    message: str | None
    differs: bool  # from what ``finish`` says (an answer decided before: desired/values.py ``decided``)
    result: tuple[Any, ...]  # its ``result_row``


def answers_of(record: RuntimeRecord, finish: Finish, ops: list[Operation]) -> list[Answer]:
    """The answers of the pending operations ``ops`` of ``record``'s generation as ``finish`` says, in id order."""
    container_id, endpoint = "", ""
    if finish.outcome is Outcome.SUCCESS:
        container_id = record.current_container_id or ""
        endpoint = record.engine_endpoint if container_id else ""
    out = []
    for op in sorted(ops, key=lambda o: o.id):
        outcome, code, message, op_container, op_endpoint = decided(
            op, finish.outcome, finish.error_code, finish.message, container_id, endpoint)
        out.append(Answer(
            op_id=op.id, status=(OpStatus.SUCCEEDED if outcome is Outcome.SUCCESS else OpStatus.FAILED).value,
            code=code.value if code else None, message=message or None,
            differs=(outcome, code, message) != (finish.outcome, finish.error_code, finish.message),
            result=result_row(op.id, JobResult(
                result_id=str(uuid.uuid4()), game_id=op.game_id, outcome=outcome, job=op.op,
                job_entry_id=op.entry_id or "", container_id=op_container, engine_endpoint=op_endpoint,
                error_code=code, error_message=message))))
    return out


@translating
class StoreBase:
    """Reads go straight to the pool; every write runs in ``_tx``, which reads the database clock
    and checks the leadership fence (when there is one) in its first statement."""

    def __init__(self, pool: asyncpg.Pool, fence: Fence | None = None, clock: Clock | None = None,
                 outbox: Signal | None = None, schedule: Signal | None = None) -> None:
        self.pool = pool
        self.fence = fence
        self.clock = clock or Clock()
        self.outbox = outbox or Signal()  # raised by every committed transaction that wrote the outbox
        self._outbox_written: set[asyncpg.Connection] = set()  # connections whose open transaction did
        # raised by every committed transaction that changed what the turn clock's due query reads
        self.schedule = schedule or Signal()
        self._clock_moved: set[asyncpg.Connection] = set()  # connections whose open transaction did
        # game -> (leadership term, row version, its pending operations at that version): what a look that
        # claims read with the record (``find_and_claim``), carried through this store's own compare-and-swaps
        # in that term, so that the answer of the generation needs no read of them (``_swap`` with ``finish``).
        self._pending_at: dict[str, tuple[int, int, list[Operation]]] = {}

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[tuple[asyncpg.Connection, datetime]]:
        async with self._tx_first(None) as (conn, now, _):
            yield conn, now

    @contextlib.asynccontextmanager
    async def _tx_locking(self, game_id: str) -> AsyncIterator[tuple[asyncpg.Connection, datetime,
                                                                     asyncpg.Record | None]]:
        """``_tx`` whose first statement also locks the game's record (``SELECT_FOR_UPDATE``), after the
        fence as before: one round trip fewer for every compare-and-swap of a record. Yields the row, or
        None when the game has no record."""
        async with self._tx_first(game_id) as found:
            yield found

    @contextlib.asynccontextmanager
    async def _tx_reading(self, columns: str, *args: Any) -> AsyncIterator[tuple[asyncpg.Connection, datetime,
                                                                                 asyncpg.Record]]:
        """``_tx`` whose first statement also reads ``columns`` (desired/db/lease.py ``fence_and_read``):
        one round trip fewer for a transaction that starts with reads of its own. Yields their row."""
        async with self._tx_first(None, (columns, args)) as (conn, now, row):
            assert row is not None
            yield conn, now, row

    @contextlib.asynccontextmanager
    async def _tx_first(self, game_id: str | None, reading: tuple[str, tuple[Any, ...]] | None = None
                        ) -> AsyncIterator[tuple[asyncpg.Connection, datetime, asyncpg.Record | None]]:
        wrote = moved = False
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    before = time.monotonic()
                    row = None
                    if game_id is not None:
                        now, row = await lock_record(self.fence, conn, game_id)
                    elif reading is not None:
                        now, row = await fence_and_read(self.fence, conn, *reading)
                    elif self.fence is not None:
                        now = await check_fence(self.fence, conn)
                    else:
                        now = await conn.fetchval("SELECT now()")
                    self.clock.observe_db(now, before, time.monotonic())
                    yield conn, now, row
                    wrote, moved = conn in self._outbox_written, conn in self._clock_moved
                    if wrote and self.fence is None:
                        # A process that does not lead (an operator's tool) tells the leader, whose relay
                        # publishes: Postgres delivers NOTIFY at COMMIT, or never. The leader's own writes
                        # (fenced) notify nobody: every commit that sends one queues on one cluster-wide
                        # lock, and the leader's relay is woken in-process below. (A tool's change of
                        # desired state reaches the leader's turn clock by the desired-state NOTIFY.)
                        await conn.execute("SELECT pg_notify($1, $2)", OUTBOX_CHANNEL, self.outbox.origin)
            finally:
                self._outbox_written.discard(conn)
                self._clock_moved.discard(conn)
        # After COMMIT: a reader woken before it would not see the rows.
        if wrote:
            self.outbox.fire()
        if moved:
            self.schedule.fire()

    async def _fenced(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One write statement on its own (no BEGIN, no COMMIT: Postgres commits it by itself) under the
        leadership fence: ``sql`` is an UPDATE whose WHERE names ``fence_ok`` (``EXISTS (SELECT 1 FROM
        fence_ok)``: a CTE that holds the lease's row, FOR KEY SHARE as ``check_fence`` takes it, when this
        term is still the current one) and that ends in a RETURNING clause. A write whose only statement is
        this costs one round trip instead of four (BEGIN, the fence, the write, COMMIT). Returns the rows
        it returned; raises Fenced when the term is over."""
        return await self._fenced_read(sql, "SELECT * FROM changed", *args)

    async def _swap(self, rec: RuntimeRecord, change: Callable[[RuntimeRecord, datetime], RuntimeRecord],
                    forced_reason: str | None = None, finish: Outcome | None = None) -> RuntimeRecord | None:
        """A compare-and-swap of a record on the row's version, in ONE write statement (no BEGIN, no lock,
        no COMMIT): ``change(rec, now)`` written over ``rec``, with the snapshot it owes, only if the row is
        still the version ``rec`` was read as (``row_version``, Postgres' ``xmin``: any write of the row
        makes a new one) and the leadership term is current. ``rec`` is then the row as it is, so the
        change is what the locking path (``_tx_locking``: lock, read, check, write) would write, in one
        round trip instead of four.

        With ``finish``, the pending operations of the record's generation are answered in the same
        statement (their rows and results), read just before it (one more statement) unless this store
        knows them at that row version (``_pending_at``: read by ``find_and_claim`` with the record, and
        carried through this store's own swaps, which add and change no operation). An operation is only
        ever pending on a record its admission wrote in the same transaction (a job that joins a
        generation writes the record too: desired/db/submissions.py), and any other change of a pending
        operation but its claim writes the record too (``note_disruption_overdue``, ``fail_generation``),
        so one that joined or changed after the read makes a new row version and the write does not
        happen. One answered meanwhile by another path is neither answered again nor given a second
        result.

        A change of nothing is one read: whether the row is still that version (then ``rec`` is returned).
        None when it does not apply, and the caller takes the locking path, which decides as before: a
        record read without its version, a row that moved since (another write, a job's, a probe's), a
        change of image (its version is read under the lock), a change the record's invariants refuse
        at this process's reading of the database clock, or that reading ``MAX_CLOCK_SKEW`` or more
        away from the database's own (its timestamps are the database's ``now()``, within that bound;
        the locking path reads it in its first statement)."""
        if rec.row_version is None:
            return None
        async with self.pool.acquire() as conn:
            # The connection first: the clock is read, and the statement sent, with no wait for one between.
            return await self._swap_on(conn, rec, change, forced_reason, finish)

    async def _swap_on(self, conn: asyncpg.Connection, rec: RuntimeRecord,
                       change: Callable[[RuntimeRecord, datetime], RuntimeRecord], forced_reason: str | None,
                       finish: Outcome | None) -> RuntimeRecord | None:
        fence = self.fence
        if fence is not None and not fence.valid_locally:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} has lapsed")
        now = self.clock.now()
        new = change(rec, now)
        if new.status is not rec.status:
            check_transition(rec.status, new.status)
        if (new.desired_image_ref or new.current_image_ref) != (rec.desired_image_ref or rec.current_image_ref):
            return None
        reason = snapshots.reason_for(rec, new, forced_reason)
        if reason is not None:
            new = new.replace(snapshot_revision=rec.snapshot_revision + 1)
        try:
            new.validate()
        except InvalidRecord:
            return None
        write = record_write(rec, new)
        if write is None and finish is None:
            # Nothing to write: whether the row is still the one read, and the term current (as the lock's is).
            fenced = ("EXISTS (SELECT 1 FROM leader_leases WHERE instance = $3 AND holder = $4 AND epoch = $5"
                      " AND expires_at > now())") if fence is not None else "true"
            found = await conn.fetchrow(
                f"SELECT {fenced} AS fence_valid, (SELECT xmin::text = $2 FROM runtime_records WHERE game_id = $1)"
                " AS same", rec.game_id, str(rec.row_version),
                *((fence.instance, fence.holder, fence.epoch) if fence is not None else ()))
            assert found is not None
            if not found["fence_valid"]:
                raise self._over()
            return rec if found["same"] else None
        answers: list[Answer] = []
        known = self._pending_at.get(rec.game_id)
        if known is not None and known[:2] != (self._term(), rec.row_version):
            known = None  # read at another version of the row (or in another term): not this one's
            self._pending_at.pop(rec.game_id, None)
        if finish is not None:
            if known is not None:
                pending = [op for op in known[2] if op.generation <= rec.generation]
            else:
                rows = await conn.fetch(
                    "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
                    " AND generation <= $2 ORDER BY id", rec.game_id, rec.generation)
                pending = [operation_from_row(r) for r in rows]
            answers = answers_of(new, Finish(generation=rec.generation, outcome=finish), pending)
        # The row's own write, or (answers and nothing else changed) a write of its version only.
        update, args = write or ("UPDATE runtime_records SET last_op_at = last_op_at WHERE game_id = $1", [rec.game_id])
        args = list(args)

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        guard = (f" AND xmin = {arg(str(rec.row_version))}::text::xid AND abs(extract(epoch FROM now() -"
                 f" {arg(now)}::timestamptz)) < {MAX_CLOCK_SKEW} AND EXISTS (SELECT 1 FROM fence_ok)"
                 " RETURNING xmin::text::bigint AS row_version")
        fence_ok, fence_args = self._fence_ok(len(args) + 1)
        args.extend(fence_args)
        sql = f"WITH fence_ok AS ({fence_ok}), w AS ({update}{guard})"
        if answers:
            sql += (", o AS (UPDATE runtime_operations o SET status = a.status, error_code = a.code,"
                    f" error_message = a.message, finished_at = {arg(now)}::timestamptz FROM unnest("
                    f"{arg([a.op_id for a in answers])}::bigint[], {arg([a.status for a in answers])}::text[],"
                    f" {arg([a.code for a in answers])}::text[], {arg([a.message for a in answers])}::text[])"
                    " AS a(id, status, code, message) WHERE o.id = a.id AND o.status IN ('queued', 'running')"
                    " AND EXISTS (SELECT 1 FROM w) RETURNING o.id)")
        outbox: list[tuple[Any, ...]] = []
        if reason is not None:
            snapshot_id = str(uuid.uuid4())
            body = snapshots.fields(new, previous=rec.status, reason=reason, snapshot_id=snapshot_id, now=now)
            outbox.append((uuid.UUID(snapshot_id), None, new.game_id, json.dumps(body), "snapshot"))
        outbox.extend((*a.result, "result") for a in answers)
        tail = ""
        if outbox:
            # The snapshot first, then the results in operation order (their seq); a result only for an
            # operation this statement answered.
            cols = list(zip(*outbox, strict=True))
            sql += (", s AS (INSERT INTO job_results (result_id, operation_id, game_id, fields, kind)"
                    " SELECT x.result_id, x.operation_id, x.game_id, x.fields::jsonb, x.kind FROM unnest("
                    f"{arg(list(cols[0]))}::uuid[], {arg(list(cols[1]))}::bigint[], {arg(list(cols[2]))}::text[],"
                    f" {arg(list(cols[3]))}::text[], {arg(list(cols[4]))}::text[]) WITH ORDINALITY"
                    " AS x(result_id, operation_id, game_id, fields, kind, n) WHERE EXISTS (SELECT 1 FROM w)"
                    + (" AND (x.operation_id IS NULL OR x.operation_id IN (SELECT id FROM o))" if answers else "")
                    + " ORDER BY x.n)")
            if fence is None:  # an operator's tool: the leader's relay hears of it (``_tx_first``)
                tail = f", (SELECT pg_notify({arg(OUTBOX_CHANNEL)}, {arg(self.outbox.origin)}) FROM w) AS notified"
        before = time.monotonic()
        row = await conn.fetchrow(
            f"{sql} SELECT EXISTS (SELECT 1 FROM fence_ok) AS fence_valid,"
            f" (SELECT row_version FROM w) AS row_version, now() AS db_now{tail}", *args)
        assert row is not None
        self.clock.observe_db(row["db_now"], before, time.monotonic())
        if not row["fence_valid"]:
            raise self._over()
        if known is not None:
            self._pending_at.pop(rec.game_id, None)
        if row["row_version"] is None:
            return None  # the row moved (or the clocks are apart): the locking path decides
        if outbox:
            self.outbox.fire()
        if transitions.moves_the_clock(rec, new):
            self.schedule.fire()
        if known is not None and finish is None and new.generation == rec.generation:
            # This write added no job and changed none, and it happened only over the version the jobs were
            # read at (a job's admission, or a note on a job, writes the row): they are the new version's too.
            self.remember_pending(rec.game_id, row["row_version"], known[2])
        return new.replace(row_version=row["row_version"])

    def remember_pending(self, game_id: str, row_version: int, ops: list[Operation]) -> None:
        if len(self._pending_at) >= PENDING_KEPT:
            self._pending_at.clear()  # games whose generation never finished here: read again when one does
        self._pending_at[game_id] = (self._term(), row_version, ops)

    def _term(self) -> int:
        """The leadership term this store writes in (0 without a fence): what it carried from an older term
        is not used (a failover to a replica that lost transactions may give a row version again)."""
        return self.fence.epoch if self.fence is not None else 0

    async def _fenced_read(self, write: str, read: str, *args: Any) -> list[asyncpg.Record]:
        """``_fenced(write)`` and a read in one statement: the rows of ``read`` (a SELECT over ``args``, on
        the statement's snapshot: it does not see what ``write`` changes). Raises Fenced when the term is
        over (then nothing is written)."""
        if self.fence is None:
            return list(await self.pool.fetch(f"WITH fence_ok AS (SELECT 1), changed AS ({write}) {read}", *args))
        fence_ok, fence_args = self._fence_ok(len(args) + 1)
        rows = await self.pool.fetch(
            f"WITH fence_ok AS ({fence_ok}), changed AS ({write}), got AS ({read}) SELECT v.fence_valid, g.*"
            " FROM (SELECT EXISTS (SELECT 1 FROM fence_ok) AS fence_valid) v LEFT JOIN got g ON true",
            *args, *fence_args)
        if not rows or not rows[0]["fence_valid"]:
            raise self._over()
        return [r for r in rows if r[1] is not None]  # no row read: one row of NULLs

    def _fence_ok(self, first: int) -> tuple[str, tuple[Any, ...]]:
        """The ``fence_ok`` CTE's query (the lease's row, FOR KEY SHARE as ``check_fence`` takes it, while
        this term is the current one) with its parameters numbered from ``$first``, and their values; a
        store without a fence (an operator's tool): ``SELECT 1``. Raises Fenced when the term has lapsed
        locally."""
        fence = self.fence
        if fence is None:
            return "SELECT 1", ()
        if not fence.valid_locally:
            raise Fenced(f"leadership term {fence.epoch} of {fence.holder} has lapsed")
        return (f"SELECT 1 FROM leader_leases WHERE instance = ${first} AND holder = ${first + 1}"
                f" AND epoch = ${first + 2} AND expires_at > now() FOR KEY SHARE",
                (fence.instance, fence.holder, fence.epoch))

    def _over(self) -> Fenced:
        fence = self.fence
        return Fenced(f"leadership term {fence.epoch if fence else 0} of {fence.holder if fence else ''} is over")

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def _write(self, conn: asyncpg.Connection, cur: RuntimeRecord | None, new: RuntimeRecord,
                     now: datetime, forced_reason: str | None = None, *,
                     answers: Callable[[RuntimeRecord], Awaitable[list[tuple[Any, ...]]]] | None = None
                     ) -> RuntimeRecord:
        """Write ``new`` over ``cur`` (insert when None): the status machine, the invariants, the
        changed columns only, and the snapshot Lobby is owed when status, turn or paused changed.
        ``answers``: given the record as it is written, the results of the jobs it answers (``result_row``s,
        their operations already updated), inserted in the same statement after the snapshot."""
        if cur is not None and new.status is not cur.status:
            check_transition(cur.status, new.status)
        image = new.desired_image_ref or new.current_image_ref
        floor = 0
        if cur is None:
            # A new record: its engine version, and (in the same round trip) the floor of its snapshot revisions
            # when a restore of the database lost the game (controller/snapshot_floor.py).
            row = await conn.fetchrow("SELECT (SELECT version FROM engine_versions WHERE image_ref = $1) AS version,"
                                      " (SELECT revision FROM snapshot_floors WHERE game_id = $2) AS floor",
                                      image, new.game_id)
            assert row is not None
            new = new.replace(engine_version=row["version"] or "")
            floor = int(row["floor"] or 0)
        elif image != (cur.desired_image_ref or cur.current_image_ref):
            version = await conn.fetchval("SELECT version FROM engine_versions WHERE image_ref = $1", image)
            new = new.replace(engine_version=version or "")
        reason = snapshots.reason_for(cur, new, forced_reason)
        if reason is not None:
            new = new.replace(snapshot_revision=(cur.snapshot_revision if cur else floor) + 1)
        new.validate()
        if transitions.moves_the_clock(cur, new):
            self._clock_moved.add(conn)
        outbox: list[tuple[Any, ...]] = []
        if reason is not None:
            snapshot_id, game_id, body = self._snapshot_row(conn, new, cur.status if cur else None, reason, now)
            outbox.append((snapshot_id, None, game_id, body, "snapshot"))
        if answers is not None:
            outbox.extend((*row, "result") for row in await answers(new))
        write = record_write(cur, new, first=5 * len(outbox) + 1)
        if not outbox:
            if write is not None:
                await conn.execute(write[0], *write[1])
            return new
        # The record, the snapshot it owes Lobby and the results of the jobs it answers in one statement (one
        # round trip): the write as a CTE of the outbox's INSERT (Postgres runs a data-modifying CTE whether
        # it is read or not); the outbox's rows in this order (their seq).
        self._outbox_written.add(conn)
        values = ", ".join(f"(${5 * i + 1}, ${5 * i + 2}::bigint, ${5 * i + 3}, ${5 * i + 4}::jsonb, ${5 * i + 5})"
                           for i in range(len(outbox)))
        insert = f"INSERT INTO job_results (result_id, operation_id, game_id, fields, kind) VALUES {values}"
        sql = insert if write is None else f"WITH w AS ({write[0]}) {insert}"
        await conn.execute(sql, *(v for row in outbox for v in row), *(write[1] if write is not None else ()))
        return new

    def _snapshot_row(self, conn: asyncpg.Connection, record: RuntimeRecord, previous: Status | None,
                      reason: str, now: datetime) -> tuple[Any, ...]:
        """The snapshot's id, game and body (the connection's transaction now writes the outbox)."""
        self._outbox_written.add(conn)
        snapshot_id = str(uuid.uuid4())
        body = snapshots.fields(record, previous=previous, reason=reason, snapshot_id=snapshot_id, now=now)
        return uuid.UUID(snapshot_id), record.game_id, json.dumps(body)

    async def _write_desired(self, conn: asyncpg.Connection, current: RuntimeRecord | None,
                             new: RuntimeRecord, now: datetime, *, moves: bool = False) -> RuntimeRecord:
        """``moves``: the change moves the game (a drain's: its pin cleared, or set back to its node)."""
        if current is not None:
            bad = set(changed(current, new)) - DESIRED_COLUMNS - ({"node_id", "avoid_nodes"} if moves else set())
            if bad:
                raise AssertionError(f"admission may not write observed columns {sorted(bad)}")
        return await self._write(conn, current, new, now)

    async def _supersede_older(self, conn: asyncpg.Connection, record: RuntimeRecord, now: datetime) -> None:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation < $2 ORDER BY id FOR UPDATE", record.game_id, record.generation)
        for row in rows:
            op = operation_from_row(row)
            await self._end_op(conn, op, Outcome.FAILURE, ErrorCode.SUPERSEDED,
                               f"replaced by a newer job (generation {record.generation}) before it converged",
                               "", "", now)

    async def _pending_ops(self, conn: asyncpg.Connection, game_id: str, generation: int) -> list[Operation]:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation <= $2 ORDER BY id FOR UPDATE", game_id, generation)
        return [operation_from_row(r) for r in rows]

    async def _finish_pending(self, conn: asyncpg.Connection, record: RuntimeRecord, finish: Finish,
                              now: datetime) -> int:
        results = await self._answer_pending(conn, record, finish, now)
        if results:
            self._outbox_written.add(conn)
            await conn.executemany(INSERT_RESULT, results)
        return len(results)

    async def _answer_pending(self, conn: asyncpg.Connection, record: RuntimeRecord, finish: Finish,
                              now: datetime) -> list[tuple[Any, ...]]:
        """``_finish_pending`` but the results' insert: their ``result_row``s, for the caller to write."""
        # Older generations still pending were not replaced (a pause, a forced turn, a reconcile
        # came after them): they converge with this one and hear the same answer.
        # One UPDATE ... RETURNING answers them all as ``finish`` says (the rows locked in id order, as
        # ``_pending_ops``; RETURNING the rows as they were), then one INSERT of their results: two round
        # trips whatever their number, instead of 1 + 2 per operation. An operation whose answer was decided
        # before (``decided``) is written again with it (rare: a failed generation, a disruption's note).
        status = OpStatus.SUCCEEDED if finish.outcome is Outcome.SUCCESS else OpStatus.FAILED
        code = finish.error_code.value if finish.error_code else None
        rows = await conn.fetch(
            "WITH p AS (SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation <= $2 ORDER BY id FOR UPDATE) UPDATE runtime_operations o SET status = $3,"
            " error_code = $4, error_message = $5, finished_at = $6 FROM p WHERE o.id = p.id RETURNING p.*",
            record.game_id, finish.generation, status.value, code, finish.message or None, now)
        results: list[tuple[Any, ...]] = []
        for answer in answers_of(record, finish, [operation_from_row(r) for r in rows]):
            if answer.differs:
                await conn.execute(
                    "UPDATE runtime_operations SET status = $2, error_code = $3, error_message = $4 WHERE id = $1",
                    answer.op_id, answer.status, answer.code, answer.message)
            results.append(answer.result)
        return results

    async def _end_op(self, conn: asyncpg.Connection, op: Operation, outcome: Outcome,
                      code: ErrorCode | None, message: str, container_id: str, endpoint: str,
                      now: datetime) -> None:
        outcome, code, message, container_id, endpoint = decided(op, outcome, code, message, container_id,
                                                                 endpoint)
        status = OpStatus.SUCCEEDED if outcome is Outcome.SUCCESS else OpStatus.FAILED
        await conn.execute(
            "UPDATE runtime_operations SET status = $2, error_code = $3, error_message = $4, finished_at = $5"
            " WHERE id = $1", op.id, status.value, code.value if code else None, message or None, now)
        await self._insert_result(conn, op.id, JobResult(
            result_id=str(uuid.uuid4()), game_id=op.game_id, outcome=outcome, job=op.op,
            job_entry_id=op.entry_id or "", container_id=container_id, engine_endpoint=endpoint,
            error_code=code, error_message=message))

    async def _insert_op(self, conn: asyncpg.Connection, game_id: str, op: JobKind, source: OpSource,
                         status: OpStatus, generation: int, stream: str | None, entry_id: str | None,
                         params: dict[str, Any], now: datetime, code: ErrorCode | None, message: str | None,
                         actor: str | None = None) -> int:
        return await conn.fetchval(
            "INSERT INTO runtime_operations (game_id, op, source, status, generation, stream, entry_id, params,"
            " error_code, error_message, created_at, finished_at, actor)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13) RETURNING id",
            game_id, op.value, source.value, status.value, generation, stream, entry_id, json.dumps(params),
            code.value if code else None, message, now, now if status.is_final else None, actor)

    async def _insert_note(self, conn: asyncpg.Connection, record: RuntimeRecord, note: ReconcilerNote,
                           now: datetime) -> None:
        await self._insert_op(conn, record.game_id, note.op, OpSource.RECONCILER,
                              OpStatus.FAILED if note.error_code else OpStatus.SUCCEEDED, record.generation,
                              None, None, note.params, now, note.error_code, note.message or None)

    async def _insert_result(self, conn: asyncpg.Connection, op_id: int | None, result: JobResult) -> None:
        self._outbox_written.add(conn)
        await conn.execute(INSERT_RESULT, *result_row(op_id, result))
