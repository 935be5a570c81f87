"""The asyncpg store: runtime records, the operation log and the results outbox.

Two writers share ``runtime_records`` and never step on each other's columns:

* the intake (jobs from Redis or REST) writes only the *desired* columns and
  ``generation``, under ``SELECT ... FOR UPDATE``;
* the reconciler writes only the *observed* columns, with a compare-and-swap on
  ``(status, current_container_id)`` (seed 000), and ``observed_generation``.

Every operation ends in the same transaction that writes its result into
``job_results``; the relay publishes from there. That is what lets a crash at
any point lose nothing: either the whole step is committed, or none of it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import asyncpg

from desired.errors import Conflict, NotFound
from desired.jobs import Decision, Job, RecordDefaults, decide
from desired.leader import Fence
from desired.model import (
    DesiredStatus,
    ErrorCode,
    Health,
    JobKind,
    JobResult,
    OpKind,
    OpSource,
    OpStatus,
    Outcome,
    RuntimeRecord,
    Status,
    StopReason,
    check_transition,
)

NOTIFY_CHANNEL = "rtmanager_desired"
_GAME_LOCK_SPACE = 0x72746D67  # "rtmg": advisory locks keyed by game

# asyncpg errors that mean "Postgres is not reachable right now" (retry), as
# opposed to a query that is wrong.
PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # What asyncpg raises when the server goes away in the middle of an operation.
    asyncpg.exceptions.InternalClientError,
    # A server that answers but cannot take writes or sessions right now (fail-over, full).
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.DiskFullError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)

_RECORD_COLUMNS = (
    "game_id", "status", "current_container_id", "current_image_ref", "engine_endpoint",
    "state_path", "docker_network", "started_at", "stopped_at", "removed_at", "last_op_at",
    "created_at", "desired_status", "desired_image_ref", "generation", "observed_generation",
    "spec_revision", "stop_reason", "health", "last_error_code", "last_error_message",
    "crash_count", "last_exit_code", "last_oom_killed", "last_crash_at", "restart_not_before",
    "health_checked_at",
)
_OBSERVED_COLUMNS = frozenset({
    "status", "current_container_id", "current_image_ref", "started_at", "stopped_at",
    "removed_at", "last_op_at", "health", "last_error_code", "last_error_message",
    "observed_generation", "crash_count", "last_exit_code", "last_oom_killed", "last_crash_at",
    "restart_not_before", "health_checked_at",
})
_DESIRED_COLUMNS = ("desired_status", "desired_image_ref", "generation", "spec_revision", "stop_reason",
                    "last_op_at")
_ENUMS = {"status": Status, "desired_status": DesiredStatus, "stop_reason": StopReason,
          "health": Health, "last_error_code": ErrorCode}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def record_from_row(row: asyncpg.Record) -> RuntimeRecord:
    values: dict[str, Any] = {}
    for col in _RECORD_COLUMNS:
        v = row[col]
        enum_type = _ENUMS.get(col)
        values[col] = enum_type(v) if (enum_type and v is not None) else v
    return RuntimeRecord(**values)


def _db_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


_INSERT_RECORD = (f"INSERT INTO runtime_records ({', '.join(_RECORD_COLUMNS)})"
                  f" VALUES ({', '.join(f'${i}' for i in range(1, len(_RECORD_COLUMNS) + 1))})")


async def _insert_record(conn: asyncpg.Connection, record: RuntimeRecord, on_conflict: str = "") -> None:
    await conn.execute(_INSERT_RECORD + on_conflict, *[_db_value(getattr(record, c)) for c in _RECORD_COLUMNS])


async def _set_columns(conn: asyncpg.Connection, game_id: str, changes: dict[str, Any]) -> None:
    """UPDATE the given columns of one record (the names come from code, never from input)."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(changes, start=2))
    await conn.execute(f"UPDATE runtime_records SET {sets} WHERE game_id = $1",
                       game_id, *[_db_value(v) for v in changes.values()])


@dataclass(frozen=True, kw_only=True)
class Operation:
    id: int
    game_id: str
    op: OpKind
    source: OpSource
    status: OpStatus
    generation: int
    stream: str | None
    entry_id: str | None
    params: dict
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> "Operation":
        params = row["params"]
        return cls(id=row["id"], game_id=row["game_id"], op=OpKind(row["op"]), source=OpSource(row["source"]),
                   status=OpStatus(row["status"]), generation=row["generation"], stream=row["stream"],
                   entry_id=row["entry_id"], params=json.loads(params) if isinstance(params, str) else params,
                   error_code=row["error_code"], error_message=row["error_message"],
                   created_at=row["created_at"], finished_at=row["finished_at"])


@dataclass(frozen=True, kw_only=True)
class SubmitOutcome:
    operation_id: int
    decision: Decision | None  # None when the entry had been submitted before
    duplicate: bool = False


@dataclass(frozen=True, kw_only=True)
class StatusUpdate:
    """One observed-state write guarded by (status, current_container_id)."""

    game_id: str
    expected_status: Status
    expected_container_id: str | None
    to: Status
    now: datetime
    changes: dict[str, Any]
    # Writes that finish a generation also guard on it: a job accepted meanwhile changed
    # what "converged" means, and the caller must look again instead of answering.
    expected_generation: int | None = None


@dataclass(frozen=True, kw_only=True)
class PendingResult:
    seq: int
    result_id: str
    game_id: str
    fields: dict[str, str]
    written_at: datetime | None = None
    accepted_at: datetime | None = None  # when the job was accepted (None for results without an operation)


class Store:
    """Reads go straight to the pool; every write runs in ``_tx``, which checks the
    leadership fence (when there is one) inside the same transaction."""

    def __init__(self, pool: asyncpg.Pool, fence: Fence | None = None) -> None:
        self.pool = pool
        self.fence = fence

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            if self.fence is not None:
                await self.fence.check(conn)
            yield conn

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # ------------------------------------------------------------------ records
    async def get(self, game_id: str) -> RuntimeRecord:
        row = await self.pool.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1", game_id)
        if row is None:
            raise NotFound(game_id)
        return record_from_row(row)

    async def find(self, game_id: str) -> RuntimeRecord | None:
        try:
            return await self.get(game_id)
        except NotFound:
            return None

    async def list(self) -> list[RuntimeRecord]:
        rows = await self.pool.fetch("SELECT * FROM runtime_records ORDER BY game_id")
        return [record_from_row(r) for r in rows]

    async def list_by_status(self, status: Status) -> list[RuntimeRecord]:
        rows = await self.pool.fetch("SELECT * FROM runtime_records WHERE status = $1 ORDER BY game_id",
                                     status.value)
        return [record_from_row(r) for r in rows]

    async def list_live(self) -> list[RuntimeRecord]:
        """Every record the controller may still have to act on (one query, for resync)."""
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE status <> 'removed' OR desired_status <> 'removed'"
            " OR observed_generation <> generation")
        return [record_from_row(r) for r in rows]

    async def upsert(self, record: RuntimeRecord) -> None:
        record.validate()
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _RECORD_COLUMNS if c != "game_id")
        async with self._tx() as conn:
            await _insert_record(conn, record, f" ON CONFLICT (game_id) DO UPDATE SET {updates}")

    async def update_status(self, upd: StatusUpdate, finish: "Finish | None" = None,
                            note: "ReconcilerNote | None" = None) -> RuntimeRecord:
        """Compare-and-swap one status transition and derive the timestamps from it.

        Raises Conflict when the stored status or container id is not the
        expected one, NotFound when there is no record.
        """
        bad = set(upd.changes) - _OBSERVED_COLUMNS
        if bad:
            raise ValueError(f"update_status may not write {sorted(bad)}")
        changes = dict(upd.changes)
        changes["status"] = upd.to
        changes.setdefault("last_op_at", upd.now)
        if upd.expected_status is not upd.to:
            check_transition(upd.expected_status, upd.to)
            # Timestamps follow the destination (seed 000), on the transition only.
            if upd.to is Status.STOPPED:
                changes.setdefault("stopped_at", upd.now)
            elif upd.to is Status.REMOVED:
                changes.setdefault("removed_at", upd.now)
            elif upd.to is Status.RUNNING:
                changes.setdefault("started_at", upd.now)
                changes.setdefault("stopped_at", None)
        if upd.to is Status.REMOVED:
            changes["current_container_id"] = None
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE", upd.game_id)
            if row is None:
                raise NotFound(upd.game_id)
            current = record_from_row(row)
            if current.status is not upd.expected_status or (
                    upd.expected_container_id is not None
                    and current.current_container_id != upd.expected_container_id) or (
                    upd.expected_generation is not None and current.generation != upd.expected_generation):
                raise Conflict(
                    f"{upd.game_id}: expected status {upd.expected_status.value}, container "
                    f"{upd.expected_container_id}, generation {upd.expected_generation}; found "
                    f"{current.status.value}, {current.current_container_id}, {current.generation}")
            if changes.get("last_op_at") and changes["last_op_at"] < current.last_op_at:
                changes["last_op_at"] = current.last_op_at
            new = current.replace(**changes)
            new.validate()
            await _set_columns(conn, upd.game_id, changes)
            if finish is not None:
                await self._finish_pending(conn, new, finish)
            if note is not None:
                await self._insert_note(conn, new, note, upd.now)
            return new

    async def give_up(self, game_id: str, generation: int, code: ErrorCode, message: str,
                      now: datetime, container_id: str | None, observed: dict[str, Any] | None = None,
                      note: "ReconcilerNote | None" = None) -> RuntimeRecord | None:
        """A permanent failure at ``generation``: answer its jobs and stop wanting the game running.

        The controller sets the desired state to stopped (so it does not retry a
        start that cannot work) only if nobody changed it meanwhile.
        Returns the new record, or None when a newer generation took over.
        """
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE", game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation:
                return None
            image = cur.current_image_ref or cur.desired_image_ref
            status = cur.status
            changes: dict[str, Any] = dict(
                desired_status=DesiredStatus.STOPPED, generation=generation + 1,
                observed_generation=generation + 1, last_error_code=code, last_error_message=message,
                last_op_at=max(now, cur.last_op_at), health=Health.UNKNOWN,
                current_container_id=container_id, restart_not_before=None,
            )
            changes.update(observed or {})
            if status is not Status.REMOVED:
                changes.update(status=Status.STOPPED, current_image_ref=image,
                               stopped_at=cur.stopped_at if status is Status.STOPPED and cur.stopped_at else now)
            new = cur.replace(**changes)
            new.validate()
            await _set_columns(conn, game_id, changes)
            await self._finish_pending(conn, new, Finish(generation=generation, outcome=Outcome.FAILURE,
                                                         error_code=code, message=message))
            if note is not None:
                await self._insert_note(conn, new, note, now)
            return new

    async def cleaned_up(self, game_id: str, generation: int, now: datetime) -> RuntimeRecord | None:
        """The cleanup TTL removed a stopped container: the record becomes removed, for audit."""
        async with self._tx() as conn:
            row = await conn.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE", game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation or cur.status is not Status.STOPPED:
                return None
            changes = dict(desired_status=DesiredStatus.REMOVED, generation=generation + 1,
                           observed_generation=generation + 1, status=Status.REMOVED, removed_at=now,
                           current_container_id=None, health=Health.UNKNOWN, last_op_at=max(now, cur.last_op_at))
            new = cur.replace(**changes)
            new.validate()
            await _set_columns(conn, game_id, changes)
            await self._insert_op(conn, game_id, OpKind.CLEANUP, OpSource.RECONCILER, OpStatus.SUCCEEDED,
                                  generation + 1, None, None, {"reason": "cleanup_ttl"}, now, None, None)
            return new

    # --------------------------------------------------------------- operations
    async def submit(self, job: Job, now: datetime, defaults: RecordDefaults) -> SubmitOutcome:
        """Record one job as a desired-state change plus an operation, in one transaction.

        A stream entry already submitted (redelivery after a crash before XACK)
        is recognised by its (stream, entry_id) and changes nothing.
        """
        async with self._tx() as conn:
            if job.stream:
                existing = await conn.fetchval(
                    "SELECT id FROM runtime_operations WHERE stream = $1 AND entry_id = $2",
                    job.stream, job.entry_id)
                if existing is not None:
                    return SubmitOutcome(operation_id=existing, decision=None, duplicate=True)
            # FOR UPDATE locks nothing while the record does not exist yet: two first jobs for a
            # new game would both insert. A transaction-scoped advisory lock per game orders them.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _GAME_LOCK_SPACE, job.game_id)
            row = await conn.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE", job.game_id)
            current = record_from_row(row) if row else None
            decision = decide(current, job, now, defaults)
            params = {k: v for k, v in (("image_ref", job.image_ref),
                                        ("reason", job.reason.value if job.reason else None)) if v}
            if decision.action == "change":
                assert decision.record is not None
                await self._write_desired(conn, current, decision.record)
                await self._supersede_older(conn, decision.record, now)
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job.game_id)
            status = OpStatus.QUEUED if decision.action in ("change", "join") else (
                OpStatus.SUCCEEDED if decision.action == "replay" else OpStatus.FAILED)
            op_id = await self._insert_op(conn, job.game_id, OpKind(job.kind.value), job.source, status,
                                          decision.op_generation, job.stream or None, job.entry_id or None,
                                          params, now, decision.error_code if status is OpStatus.FAILED else None,
                                          decision.message or None)
            if decision.action in ("replay", "reject"):
                outcome = Outcome.SUCCESS if decision.action == "replay" else Outcome.FAILURE
                await self._insert_result(conn, op_id, JobResult(
                    result_id=str(uuid.uuid4()), game_id=job.game_id, outcome=outcome, job=job.kind,
                    job_entry_id=job.entry_id, container_id=decision.container_id,
                    engine_endpoint=decision.engine_endpoint, error_code=decision.error_code,
                    error_message=decision.message))
            return SubmitOutcome(operation_id=op_id, decision=decision)

    async def reject_entry(self, *, kind: JobKind, game_id: str, stream: str, entry_id: str,
                           code: ErrorCode, message: str, source: OpSource = OpSource.LOBBY,
                           now: datetime | None = None) -> SubmitOutcome:
        """An entry that could not be parsed: a failed operation and its failure result."""
        now = now or now_utc()
        async with self._tx() as conn:
            existing = await conn.fetchval(
                "SELECT id FROM runtime_operations WHERE stream = $1 AND entry_id = $2", stream, entry_id)
            if existing is not None:
                return SubmitOutcome(operation_id=existing, decision=None, duplicate=True)
            op_id = await self._insert_op(conn, game_id, OpKind(kind.value), source, OpStatus.FAILED, 0,
                                          stream, entry_id, {}, now, code, message)
            await self._insert_result(conn, op_id, JobResult(
                result_id=str(uuid.uuid4()), game_id=game_id, outcome=Outcome.FAILURE, job=kind,
                job_entry_id=entry_id, error_code=code, error_message=message))
            return SubmitOutcome(operation_id=op_id, decision=None)

    async def claim(self, game_id: str, generation: int) -> list[tuple[int, datetime]]:
        """Mark the queued operations of ``generation`` as running; return (id, accepted at) of each."""
        async with self._tx() as conn:
            rows = await conn.fetch(
                "UPDATE runtime_operations SET status = 'running' WHERE game_id = $1 AND generation = $2"
                " AND status = 'queued' RETURNING id, created_at", game_id, generation)
        return [(r["id"], r["created_at"]) for r in rows]

    async def operations(self, game_id: str, limit: int = 100) -> list[Operation]:
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 ORDER BY id DESC LIMIT $2", game_id, limit)
        return [Operation.from_row(r) for r in rows]

    async def operation(self, op_id: int) -> Operation:
        row = await self.pool.fetchrow("SELECT * FROM runtime_operations WHERE id = $1", op_id)
        if row is None:
            raise NotFound(str(op_id))
        return Operation.from_row(row)

    async def pending_operations(self, game_id: str) -> list[Operation]:
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running') ORDER BY id",
            game_id)
        return [Operation.from_row(r) for r in rows]

    async def result_for(self, op_id: int) -> dict[str, str] | None:
        raw = await self.pool.fetchval("SELECT fields FROM job_results WHERE operation_id = $1", op_id)
        return json.loads(raw) if isinstance(raw, str) else raw

    # ------------------------------------------------------------------ outbox
    async def unpublished(self, limit: int = 100) -> list[PendingResult]:
        rows = await self.pool.fetch(
            "SELECT r.seq, r.result_id, r.game_id, r.fields, r.created_at, o.created_at AS accepted_at"
            " FROM job_results r LEFT JOIN runtime_operations o ON o.id = r.operation_id"
            " WHERE r.published_at IS NULL ORDER BY r.seq LIMIT $1", limit)
        return [PendingResult(seq=r["seq"], result_id=str(r["result_id"]), game_id=r["game_id"],
                              fields=json.loads(r["fields"]) if isinstance(r["fields"], str) else r["fields"],
                              written_at=r["created_at"], accepted_at=r["accepted_at"])
                for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM runtime_records GROUP BY status")
        counts = {s.value: 0 for s in Status}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    async def mark_published(self, seq: int, stream_entry_id: str) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE job_results SET published_at = now(), stream_entry_id = $2 WHERE seq = $1",
                               seq, stream_entry_id)

    async def prune(self, older_than_days: float, batch: int = 1000) -> tuple[int, int]:
        """Retention: published results and finished operations older than the horizon.

        Small batches, each its own short transaction and not fenced (old history is
        nobody's to contend for), so that a large backlog never holds locks for long.
        A redelivered stream entry is recognised by its operation row, so the horizon
        must be far longer than any entry can stay pending (days against seconds).
        """
        seconds = older_than_days * 86400
        totals = [0, 0]
        statements = (
            "DELETE FROM job_results WHERE seq IN (SELECT seq FROM job_results"
            " WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
            "DELETE FROM runtime_operations WHERE id IN (SELECT o.id FROM runtime_operations o"
            " WHERE o.finished_at < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM job_results r WHERE r.operation_id = o.id) LIMIT $2)",
        )
        for i, sql in enumerate(statements):
            while True:
                done = int((await self.pool.execute(sql, seconds, batch)).split()[-1])
                totals[i] += done
                if done < batch:
                    break
        return totals[0], totals[1]

    async def unpublished_count(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM job_results WHERE published_at IS NULL")

    # ----------------------------------------------------------------- helpers
    async def _write_desired(self, conn: asyncpg.Connection, current: RuntimeRecord | None,
                             new: RuntimeRecord) -> None:
        new.validate()
        if current is None:
            await _insert_record(conn, new)
            return
        await _set_columns(conn, new.game_id, {c: getattr(new, c) for c in _DESIRED_COLUMNS})

    async def _supersede_older(self, conn: asyncpg.Connection, record: RuntimeRecord, now: datetime) -> None:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation < $2 ORDER BY id FOR UPDATE", record.game_id, record.generation)
        for row in rows:
            op = Operation.from_row(row)
            await self._end_op(conn, op, Outcome.FAILURE, ErrorCode.SUPERSEDED,
                               f"replaced by a newer job (generation {record.generation}) before it converged",
                               "", "", now)

    async def _finish_pending(self, conn: asyncpg.Connection, record: RuntimeRecord, finish: "Finish") -> int:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation <= $2 ORDER BY id FOR UPDATE", record.game_id, finish.generation)
        now = record.last_op_at
        for row in rows:
            op = Operation.from_row(row)
            if op.generation < finish.generation:
                await self._end_op(conn, op, Outcome.FAILURE, ErrorCode.SUPERSEDED,
                                   "replaced by a newer job before it converged", "", "", now)
                continue
            container_id = finish.container_id if finish.container_id is not None else (
                record.current_container_id or "")
            endpoint = record.engine_endpoint if (finish.outcome is Outcome.SUCCESS and container_id) else ""
            if finish.outcome is Outcome.FAILURE:
                container_id, endpoint = "", ""
            await self._end_op(conn, op, finish.outcome, finish.error_code, finish.message,
                               container_id, endpoint, now)
        return len(rows)

    async def _end_op(self, conn: asyncpg.Connection, op: Operation, outcome: Outcome,
                      code: ErrorCode | None, message: str, container_id: str, endpoint: str,
                      now: datetime) -> None:
        status = OpStatus.SUCCEEDED if outcome is Outcome.SUCCESS else OpStatus.FAILED
        await conn.execute(
            "UPDATE runtime_operations SET status = $2, error_code = $3, error_message = $4, finished_at = $5"
            " WHERE id = $1", op.id, status.value, code.value if code else None, message or None, now)
        await self._insert_result(conn, op.id, JobResult(
            result_id=str(uuid.uuid4()), game_id=op.game_id, outcome=outcome, job=JobKind(op.op.value),
            job_entry_id=op.entry_id or "", container_id=container_id, engine_endpoint=endpoint,
            error_code=code, error_message=message))

    async def _insert_op(self, conn: asyncpg.Connection, game_id: str, op: OpKind, source: OpSource,
                         status: OpStatus, generation: int, stream: str | None, entry_id: str | None,
                         params: dict, now: datetime, code: ErrorCode | None, message: str | None) -> int:
        return await conn.fetchval(
            "INSERT INTO runtime_operations (game_id, op, source, status, generation, stream, entry_id, params,"
            " error_code, error_message, created_at, finished_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12) RETURNING id",
            game_id, op.value, source.value, status.value, generation, stream, entry_id, json.dumps(params),
            code.value if code else None, message, now, now if status.is_final else None)

    async def _insert_note(self, conn: asyncpg.Connection, record: RuntimeRecord, note: "ReconcilerNote",
                           now: datetime) -> None:
        await self._insert_op(conn, record.game_id, note.op, OpSource.RECONCILER,
                              OpStatus.FAILED if note.error_code else OpStatus.SUCCEEDED, record.generation,
                              None, None, note.params, now, note.error_code, note.message or None)

    async def _insert_result(self, conn: asyncpg.Connection, op_id: int | None, result: JobResult) -> None:
        await conn.execute(
            "INSERT INTO job_results (result_id, operation_id, game_id, fields) VALUES ($1, $2, $3, $4::jsonb)",
            uuid.UUID(result.result_id), op_id, result.game_id, json.dumps(result.fields()))


@dataclass(frozen=True, kw_only=True)
class ReconcilerNote:
    """An operation-log row for something the controller did on its own (no result is published)."""

    op: OpKind
    params: dict
    error_code: ErrorCode | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Finish:
    """How to end the pending operations of a generation once it converged (or failed)."""

    generation: int
    outcome: Outcome
    error_code: ErrorCode | None = None
    message: str = ""
    container_id: str | None = None  # None: take the record's
