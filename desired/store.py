"""The asyncpg store: runtime records, the operation log and the results outbox.

Two writers share ``runtime_records`` and never step on each other's columns:

* admission (jobs from a stream, REST, an operator) writes only the *desired*
  columns and ``generation``, under ``SELECT ... FOR UPDATE`` plus a per-game
  advisory lock (a record that does not exist yet cannot be locked);
* the reconciler writes only the *observed* columns through the named
  transitions below (``mark_running``, ``record_crash``, ...), each a
  compare-and-swap on ``(status, current_container_id)`` (and on ``generation``
  when it answers jobs), computed by the pure functions of desired/transitions.py.

Every operation ends in the same transaction that writes its result into
``job_results``; the relay publishes from there (woken by the commit: desired/wakeup.py). Either the whole step is
committed, or none of it is: a crash at any point loses nothing.

Every timestamp written comes from the database clock (``now()`` of the
transaction), read together with the leadership fence (desired/leader.py) in the
first statement of each write transaction.

asyncpg's errors do not leave this module: an outage becomes ``StoreUnavailable``
(retry), a unique violation ``UniqueViolation`` (naming its constraint), anything
else ``StoreError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from desired import snapshots, transitions, versions
from desired.clock import Clock
from desired.errors import Conflict, NotFound
from desired.jobs import Decision, InvalidJob, Job, RecordDefaults, decide, replaces
from desired.leader import Fence
from desired.model import (
    MAX_TURN,
    UP,
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
from desired.pg import translating
from desired.policy import CrashPolicy, CrashVerdict, next_crash
from desired.wakeup import OUTBOX_CHANNEL, Signal

log = logging.getLogger("rtmanager.store")

NOTIFY_CHANNEL = "rtmanager_desired"
_GAME_LOCK_SPACE = 0x72746D67  # "rtmg": advisory locks keyed by game

_RECORD_COLUMNS = (
    "game_id", "status", "current_container_id", "current_image_ref", "engine_endpoint",
    "state_path", "docker_network", "started_at", "stopped_at", "removed_at", "last_op_at",
    "created_at", "desired_status", "desired_image_ref", "generation", "observed_generation",
    "spec_revision", "stop_reason", "health", "last_error_code", "last_error_message",
    "crash_count", "last_exit_code", "last_oom_killed", "last_crash_at", "restart_not_before",
    "health_checked_at", "rollback_image_ref", "rolling_back", "turn", "phase", "admin_api", "probe_failures",
    "unreachable_since", "generation_started_at", "last_turn_at", "snapshot_revision", "paused", "turn_interval",
    "desired_turn", "clock_from", "engine_version", "node_id", "disruption_wait_since", "force_generation",
    "admin_token",
)
_DESIRED_COLUMNS = frozenset({"desired_status", "desired_image_ref", "generation", "spec_revision",
                              "stop_reason", "last_op_at", "paused", "turn_interval", "desired_turn",
                              "clock_from", "force_generation"})
_ENUMS = {"status": Status, "desired_status": DesiredStatus, "stop_reason": StopReason,
          "health": Health, "last_error_code": ErrorCode}


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
_SELECT_FOR_UPDATE = "SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE"


async def _insert_record(conn: asyncpg.Connection, record: RuntimeRecord, on_conflict: str = "") -> None:
    await conn.execute(_INSERT_RECORD + on_conflict, *[_db_value(getattr(record, c)) for c in _RECORD_COLUMNS])


def _changed(old: RuntimeRecord, new: RuntimeRecord) -> dict[str, Any]:
    return {c: getattr(new, c) for c in _RECORD_COLUMNS if getattr(old, c) != getattr(new, c)}


async def _set_columns(conn: asyncpg.Connection, game_id: str, changes: dict[str, Any]) -> None:
    """UPDATE the given columns of one record (the names come from code, never from input)."""
    if not changes:
        return
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(changes, start=2))
    await conn.execute(f"UPDATE runtime_records SET {sets} WHERE game_id = $1",
                       game_id, *[_db_value(v) for v in changes.values()])


# The relay's check of what Redis may have lost, at every start, new term and outage: it reads the
# recent window by job_results_published_idx, never the whole table (which grows with retention).
RECENTLY_PUBLISHED_SQL = (
    "SELECT seq, stream_entry_id, result_id FROM job_results WHERE kind = $3 AND published_at > now() -"
    " make_interval(secs => $1) AND stream_entry_id IS NOT NULL ORDER BY seq DESC LIMIT $2")

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
    def from_row(cls, row: asyncpg.Record) -> Operation:
        params = row["params"]
        return cls(id=row["id"], game_id=row["game_id"], op=OpKind(row["op"]), source=OpSource(row["source"]),
                   status=OpStatus(row["status"]), generation=row["generation"], stream=row["stream"],
                   entry_id=row["entry_id"], params=json.loads(params) if isinstance(params, str) else params,
                   error_code=row["error_code"], error_message=row["error_message"],
                   created_at=row["created_at"], finished_at=row["finished_at"])


def decided(op: Operation, outcome: Outcome, code: ErrorCode | None, message: str, container_id: str,
            endpoint: str) -> tuple[Outcome, ErrorCode | None, str, str, str]:
    """The answer of a pending operation whose failure was already decided (``fail_generation``,
    recorded until its engine is stopped): that failure, whatever converged; an answer given before
    the engine was stopped (overdue, superseded) says so. A success that went ahead while the engine
    still generated a turn (its wait ran out) says that."""
    note = op.params.get("disruption_note") if isinstance(op.params, dict) else None
    if note and outcome is Outcome.SUCCESS and not message:
        message = str(note)
    if op.error_code is None or op.status.is_final:
        return outcome, code, message, container_id, endpoint
    decided_message = op.error_message or ""
    if outcome is Outcome.FAILURE and message and message != decided_message:
        decided_message = f"{decided_message}; answered although the engine was not stopped: {message}"
    return Outcome.FAILURE, ErrorCode(op.error_code), decided_message, "", ""


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """An entry that could not be parsed: a failed operation and its result, with the parser's code."""

    kind: JobKind
    game_id: str
    stream: str
    entry_id: str
    code: ErrorCode
    message: str
    source: OpSource = OpSource.LOBBY


_INSERT_OP_WITH_ID = (
    "INSERT INTO runtime_operations (id, game_id, op, source, status, generation, stream, entry_id, params,"
    " error_code, error_message, created_at, finished_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13)")
_INSERT_RESULT = "INSERT INTO job_results (result_id, operation_id, game_id, fields) VALUES ($1, $2, $3, $4::jsonb)"


def _op_row(op_id: int, game_id: str, op: OpKind, source: OpSource, status: OpStatus, generation: int,
            stream: str | None, entry_id: str | None, params: dict, now: datetime, code: ErrorCode | None,
            message: str | None) -> tuple:
    return (op_id, game_id, op.value, source.value, status.value, generation, stream, entry_id, json.dumps(params),
            code.value if code else None, message, now, now if status.is_final else None)


def _result_row(op_id: int | None, result: JobResult) -> tuple:
    return (uuid.UUID(result.result_id), op_id, result.game_id, json.dumps(result.fields()))


@dataclass(frozen=True, kw_only=True)
class SubmitOutcome:
    operation_id: int  # 0 when nothing was recorded (a scheduled turn no longer due: "skip")
    decision: Decision | None  # None when the entry had been submitted before
    duplicate: bool = False


@dataclass(frozen=True, kw_only=True)
class PendingResult:
    """One outbox entry: a job result, or a snapshot (``kind``); ``result_id`` is the snapshot_id then."""

    seq: int
    result_id: str
    game_id: str
    fields: dict[str, str]
    kind: str = "result"
    written_at: datetime | None = None
    accepted_at: datetime | None = None  # when the job was accepted (None for results without an operation)


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


@dataclass(frozen=True, kw_only=True)
class Crash:
    """What is known about one crash of an engine."""

    code: ErrorCode
    detail: str
    container_id: str | None
    exit_code: int | None = None
    oom_killed: bool = False
    log_tail: str = ""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Which instance the database belongs to, and the uid that labels every unit created under it."""

    instance: str
    uid: str
    claimed_at: datetime


class VersionInUse(RuntimeError):
    """An engine version that a game (not removed) still runs or wants cannot be deleted."""


def _version_from_row(row: asyncpg.Record) -> versions.EngineVersion:
    return versions.EngineVersion(version=row["version"], image_ref=row["image_ref"],
                                  status=versions.VersionStatus(row["status"]), notes=row["notes"],
                                  created_at=row["created_at"], updated_at=row["updated_at"],
                                  stop_grace=row["stop_grace"])


class WrongInstance(RuntimeError):
    """The database belongs to another RTMANAGER_INSTANCE."""


_KEEP = object()


@translating
class Store:
    """Reads go straight to the pool; every write runs in ``_tx``, which reads the database clock
    and checks the leadership fence (when there is one) in its first statement."""

    def __init__(self, pool: asyncpg.Pool, fence: Fence | None = None, clock: Clock | None = None,
                 outbox: Signal | None = None) -> None:
        self.pool = pool
        self.fence = fence
        self.clock = clock or Clock()
        self.outbox = outbox or Signal()  # raised by every committed transaction that wrote the outbox
        self._outbox_written: set[asyncpg.Connection] = set()  # connections whose open transaction did

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[tuple[asyncpg.Connection, datetime]]:
        wrote = False
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    before = datetime.now(UTC)
                    if self.fence is not None:
                        now = await self.fence.check(conn)
                    else:
                        now = await conn.fetchval("SELECT now()")
                    self.clock.observe_db(now, before, datetime.now(UTC))
                    yield conn, now
                    wrote = conn in self._outbox_written
                    if wrote:  # other replicas hear it at COMMIT (Postgres delivers NOTIFY then, or never)
                        await conn.execute("SELECT pg_notify($1, $2)", OUTBOX_CHANNEL, self.outbox.origin)
            finally:
                self._outbox_written.discard(conn)
        if wrote:
            self.outbox.fire()  # after COMMIT: a reader woken before it would not see the rows

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # ---------------------------------------------------------------- identity
    async def claim_identity(self, instance: str) -> Identity:
        """The database's identity, claimed for ``instance`` when it has none; WrongInstance when it
        belongs to another instance."""
        row = await self.pool.fetchrow(
            "WITH claimed AS (INSERT INTO controller_identity (instance) VALUES ($1)"
            " ON CONFLICT (singleton) DO NOTHING RETURNING instance, uid, claimed_at)"
            " SELECT * FROM claimed UNION ALL SELECT instance, uid, claimed_at FROM controller_identity LIMIT 1",
            instance)
        identity = Identity(instance=row["instance"], uid=str(row["uid"]), claimed_at=row["claimed_at"])
        if identity.instance != instance:
            raise WrongInstance(f"the database belongs to instance {identity.instance!r}, not {instance!r}")
        return identity

    async def identity(self) -> Identity | None:
        row = await self.pool.fetchrow("SELECT instance, uid, claimed_at FROM controller_identity")
        return Identity(instance=row["instance"], uid=str(row["uid"]), claimed_at=row["claimed_at"]) if row else None

    async def lease_info(self, instance: str) -> dict | None:
        row = await self.pool.fetchrow(
            "SELECT holder, epoch, expires_at > now() AS live FROM leader_leases WHERE instance = $1", instance)
        return dict(row) if row is not None else None

    async def applied_migrations(self) -> set[str]:
        return {r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations")}

    # ------------------------------------------------------------------ records
    async def get(self, game_id: str) -> RuntimeRecord:
        row = await self.pool.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1", game_id)
        if row is None:
            raise NotFound(game_id)
        return record_from_row(row)

    async def find(self, game_id: str) -> RuntimeRecord | None:
        row = await self.pool.fetchrow("SELECT * FROM runtime_records WHERE game_id = $1", game_id)
        return record_from_row(row) if row is not None else None

    async def list(self) -> list[RuntimeRecord]:
        rows = await self.pool.fetch("SELECT * FROM runtime_records ORDER BY game_id")
        return [record_from_row(r) for r in rows]

    async def list_up(self) -> list[RuntimeRecord]:
        """Games whose engine's container should be running (every UP status)."""
        rows = await self.pool.fetch("SELECT * FROM runtime_records WHERE status = ANY($1::text[]) ORDER BY game_id",
                                     [s.value for s in UP])
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

    async def game_ids(self, game_ids: list[str]) -> set[str]:
        """Which of these games have a record (removed ones included)."""
        rows = await self.pool.fetch("SELECT game_id FROM runtime_records WHERE game_id = ANY($1::text[])",
                                     game_ids)
        return {r["game_id"] for r in rows}

    # ------------------------------------------------------------ state directories
    async def record_state_sizes(self, sizes: dict[str, int]) -> None:
        """The storage round measured these games' state directories (one statement, outside the
        record's compare-and-swap: nothing decides on it)."""
        if not sizes:
            return
        await self.pool.execute(
            "UPDATE runtime_records r SET state_bytes = m.size, state_measured_at = now()"
            " FROM unnest($1::text[], $2::bigint[]) AS m(game_id, size)"
            " WHERE r.game_id = m.game_id AND r.state_disposed_at IS NULL", list(sizes), list(sizes.values()))

    async def state_usage(self, game_id: str) -> tuple[int | None, datetime | None]:
        """(bytes, when measured) of the game's state directory; (None, None) when never measured or gone."""
        row = await self.pool.fetchrow(
            "SELECT state_bytes, state_measured_at FROM runtime_records WHERE game_id = $1", game_id)
        return (row["state_bytes"], row["state_measured_at"]) if row is not None else (None, None)

    async def removed_with_state(self, retention: float, limit: int = 100) -> list[RuntimeRecord]:
        """Removed games whose state directory is still there, removed at least ``retention`` seconds
        ago (the database clock), oldest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE status = 'removed' AND state_disposed_at IS NULL"
            " AND removed_at <= now() - make_interval(secs => $1) ORDER BY removed_at LIMIT $2",
            float(retention), limit)
        return [record_from_row(r) for r in rows]

    async def mark_state_disposed(self, game_id: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE runtime_records SET state_disposed_at = now(), state_bytes = NULL,"
                               " state_measured_at = NULL WHERE game_id = $1 AND status = 'removed'", game_id)

    async def upsert(self, record: RuntimeRecord) -> None:
        record.validate()
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _RECORD_COLUMNS if c != "game_id")
        async with self._tx() as (conn, _):
            await _insert_record(conn, record, f" ON CONFLICT (game_id) DO UPDATE SET {updates}")

    # ------------------------------------------------- observed transitions
    async def _transition(self, rec: RuntimeRecord, change: Callable[[RuntimeRecord, datetime], RuntimeRecord], *,
                          finish: Outcome | None = None, guard_generation: bool = False,
                          note: ReconcilerNote | None = None, reason: str | None = None,
                          container_id: Any = _KEEP) -> RuntimeRecord:
        """Compare-and-swap from ``rec`` (status, container id, and generation when asked) to
        ``change(current, now)``; with ``finish``, answer the pending jobs of its generation."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            expected_container = rec.current_container_id if container_id is _KEEP else container_id
            if cur.status is not rec.status or cur.current_container_id != expected_container or (
                    (guard_generation or finish is not None) and cur.generation != rec.generation):
                raise Conflict(
                    f"{rec.game_id}: expected status {rec.status.value}, container {expected_container}, "
                    f"generation {rec.generation}; found {cur.status.value}, {cur.current_container_id}, "
                    f"{cur.generation}")
            new = await self._write(conn, cur, change(cur, now), now, reason)
            if finish is not None:
                await self._finish_pending(conn, new, Finish(generation=cur.generation, outcome=finish), now)
            if note is not None:
                await self._insert_note(conn, new, note, now)
            return new

    async def mark_starting(self, rec: RuntimeRecord, *, rollback_image: str | None) -> RuntimeRecord:
        """Guarded on the generation too: the unit about to be created is built from ``rec``'s desired
        state; a job accepted meanwhile must be planned for first."""
        return await self._transition(rec, lambda cur, now: transitions.starting(
            cur, now, rollback_image=rollback_image), guard_generation=True)

    async def mark_running(self, rec: RuntimeRecord, *, container_id: str, image: str,
                           probe: transitions.Probe | None = None, unreachable_after: int = 3,
                           generation_timeout: float = 600, node: str | None = None) -> RuntimeRecord:
        """The engine answers: the generation converged and its jobs are answered ``success``
        (with what the engine said of itself, when it was asked) -- unless desired state also asks
        for a turn the engine has not reached: then the turn comes first."""
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            new = transitions.running(cur, now, container_id=container_id, image=image, node=node)
            if probe is not None:
                new = transitions.observed(new, now, probe, unreachable_after=unreachable_after,
                                           generation_timeout=generation_timeout)
            return new if transitions.turn_reached(new) else new.replace(observed_generation=cur.observed_generation)
        if rec.desired_turn is not None and not transitions.turn_reached(rec) and (
                probe is None or probe.turn is None or probe.turn < rec.desired_turn):
            return await self._transition(rec, change, guard_generation=True)
        return await self._transition(rec, change, finish=Outcome.SUCCESS)

    async def mark_converged(self, rec: RuntimeRecord) -> RuntimeRecord:
        """The running unit already is what the generation asks for: its jobs are answered ``success``."""
        return await self._transition(rec, transitions.recorded, finish=Outcome.SUCCESS)

    async def set_admin_token(self, rec: RuntimeRecord, token: str) -> RuntimeRecord:
        """Record the admin token of the unit about to be created (or of one adopted as it is). Guarded on
        the generation, as ``mark_starting``: the unit is ``rec``'s; a job accepted meanwhile is planned
        for first (Conflict)."""
        return await self._transition(rec, lambda cur, now: cur.replace(admin_token=token), guard_generation=True)

    async def turn_requested(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._transition(rec, transitions.turn_requested)

    async def fail_turn(self, rec: RuntimeRecord, code: ErrorCode, message: str) -> RuntimeRecord:
        """The turn of ``rec.generation`` cannot be had: answer its jobs; the game stays up."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if cur.generation != rec.generation:
                raise Conflict(f"{rec.game_id}: a newer generation took over")
            new = await self._write(conn, cur, transitions.turn_failed(cur, now, code=code, message=message), now)
            # The turn's jobs fail; the others of the generation (the game is up) converged.
            for op in await self._pending_ops(conn, cur.game_id, cur.generation):
                if op.op in (OpKind.FORCE_NEXT_TURN, OpKind.TURN):
                    await self._end_op(conn, op, Outcome.FAILURE, code, message, "", "", now)
                else:
                    await self._end_op(conn, op, Outcome.SUCCESS, None, "", new.current_container_id or "",
                                       new.engine_endpoint if new.current_container_id else "", now)
            return new

    async def due_turns(self, limit: int = 200) -> tuple[list[str], float | None]:
        """The turn clock, in one query: games whose interval has passed since their last turn (or
        since they were started or resumed), and the seconds until the next one is due.

        A game is asked for one turn at a time, and only once the previous request has been
        answered (its generation converged): a turn the health round saw reached is not answered
        yet, and asking for the next one then would move the generation on before its jobs are
        answered, on every turn of a loaded controller (observed at 1,000 games)."""
        rows = await self.pool.fetch(
            "SELECT game_id, extract(epoch FROM greatest(coalesce(last_turn_at, clock_from, created_at),"
            " coalesce(clock_from, created_at)) + make_interval(secs => turn_interval) - now())::float8 AS due_in"
            " FROM runtime_records WHERE turn_interval > 0 AND NOT paused AND desired_status = 'running'"
            " AND status = 'running' AND admin_api IS TRUE AND (desired_turn IS NULL OR desired_turn <= turn)"
            f" AND (turn IS NULL OR turn < {MAX_TURN})"  # at the largest turn there is no next one
            " AND observed_generation = generation AND disruption_wait_since IS NULL ORDER BY due_in LIMIT $1", limit)
        due = [r["game_id"] for r in rows if r["due_in"] <= 0]
        later = [r["due_in"] for r in rows if r["due_in"] > 0]
        return due, (min(later) if later else None)

    async def set_schedule(self, game_id: str, turn_interval: int, source: OpSource) -> RuntimeRecord:
        """The turn clock's interval (desired state; nothing to converge, so no generation)."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _GAME_LOCK_SPACE, game_id)
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, game_id)
            if row is None:
                raise NotFound(game_id)
            cur = record_from_row(row)
            if cur.desired_status is DesiredStatus.REMOVED:
                raise InvalidJob(ErrorCode.INVALID_REQUEST, f"game {game_id} was removed", game_id)
            new = await self._write_desired(conn, cur, cur.replace(turn_interval=turn_interval,
                                                                   last_op_at=max(now, cur.last_op_at)), now)
            await self._insert_op(conn, game_id, OpKind.RECONCILE, source, OpStatus.SUCCEEDED, cur.generation,
                                  None, None, {"turn_interval": turn_interval}, now, None, None)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, game_id)
            return new

    async def mark_stopped(self, rec: RuntimeRecord, *, container_id: str | None) -> RuntimeRecord:
        return await self._transition(rec, lambda cur, now: transitions.stopped(cur, now, container_id=container_id),
                                      finish=Outcome.SUCCESS)

    async def note_stopped(self, game_id: str, *, container_id: str) -> RuntimeRecord | None:
        """This process stopped ``container_id`` but a newer generation overtook the stop's: record
        only that the unit no longer runs (so the newer generation starts it again, and the exit is
        never taken for a crash), answering nobody. None when the record no longer names that unit
        as up (whatever changed it decides)."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, game_id)
            if row is None:
                raise NotFound(game_id)
            cur = record_from_row(row)
            if not cur.status.is_up or cur.current_container_id != container_id:
                return None
            return await self._write(conn, cur, transitions.stopped(cur, now, container_id=container_id,
                                                                    converged=False), now, None)

    async def mark_removed(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._transition(rec, transitions.removed, finish=Outcome.SUCCESS)

    async def record_observation(self, rec: RuntimeRecord, probe: transitions.Probe, *, unreachable_after: int,
                                 generation_timeout: float, disruption_waits: bool = False) -> RuntimeRecord:
        """What a probe of a running engine changed (desired/transitions.py ``observed``); with
        ``disruption_waits``, a planned disruption waits for the turn it generates."""
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            new = transitions.observed(cur, now, probe, unreachable_after=unreachable_after,
                                       generation_timeout=generation_timeout)
            return transitions.disruption_waiting(new, now) if disruption_waits else new
        return await self._transition(rec, change)

    async def note_disruption_overdue(self, rec: RuntimeRecord, action: str, waited: float, note: str) -> None:
        """A planned disruption waited its limit for a generation and goes ahead: the operation log
        says so on the pending operations it answers (their results carry the note), or on an
        operation of its own when none waits (a drift of the spec)."""
        params = {"disruption": action, "disruption_waited_seconds": round(waited, 1), "disruption_note": note}
        async with self._tx() as (conn, now):
            n = await conn.fetchval(
                "WITH u AS (UPDATE runtime_operations SET params = params || $3::jsonb WHERE game_id = $1"
                " AND status IN ('queued', 'running') AND generation <= $2 RETURNING 1) SELECT count(*) FROM u",
                rec.game_id, rec.generation, json.dumps(params))
            if not n:
                await self._insert_note(conn, rec, ReconcilerNote(op=OpKind.RECONCILE, params=params, message=note),
                                        now)

    async def record_crash(self, rec: RuntimeRecord, crash: Crash,
                           policy: CrashPolicy) -> tuple[RuntimeRecord, CrashVerdict]:
        """One more crash of a game nobody asked to change (an exit, or a failed restart after one):
        a restart after the policy's backoff, or (the limit-th in the window) the game given up."""
        verdict: list[CrashVerdict] = []

        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            v = next_crash(cur, now, policy)
            verdict.append(v)
            return transitions.crashed(cur, now, verdict=v, code=crash.code, detail=crash.detail,
                                       exit_code=crash.exit_code, oom_killed=crash.oom_killed, window=policy.window)

        params = {"event": "crash", "exit_code": crash.exit_code, "oom_killed": crash.oom_killed,
                  "log_tail": crash.log_tail[-2000:], "container_id": crash.container_id,
                  "detail": crash.detail[:1000]}
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if cur.generation != rec.generation or cur.status is not rec.status:
                raise Conflict(f"{rec.game_id}: changed since the crash was seen")
            new = change(cur, now)
            v = verdict[-1]
            new = await self._write(conn, cur, new, now, "crash_loop" if v.give_up else "crashed")
            params.update(crash_count=v.count, **({"gave_up": True} if v.give_up else {"restart_in": v.delay}))
            await self._insert_note(conn, new, ReconcilerNote(
                op=OpKind.RESTART, params=params, error_code=crash.code if v.give_up else None,
                message=new.last_error_message or "" if v.give_up else ""), now)
            if v.give_up:  # a job that joined the crashed generation hears why
                await self._finish_pending(conn, new, Finish(generation=cur.generation, outcome=Outcome.FAILURE,
                                                             error_code=crash.code,
                                                             message=new.last_error_message or ""), now)
            return new, v

    async def fail_generation(self, game_id: str, generation: int, code: ErrorCode,
                              message: str, *, answer_now: bool = False) -> RuntimeRecord | None:
        """``generation`` cannot converge: answer its jobs with this failure, and ask for what is safe
        now (desired/transitions.py ``failed``: roll back, stop, or keep removing).

        When a game that was wanted running is to be stopped, its jobs are not answered yet: the
        failure is recorded on them and answered by the transition that records the game stopped (results come after
        convergence: Lobby never hears of a failed start while its engine still runs). With
        ``answer_now`` (a job overdue) they are answered at once.

        Returns the new record, or None when a newer generation took over meanwhile."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation:
                return None
            new, target = transitions.failed(cur, now, code=code, message=message)
            new = await self._write(conn, cur, new, now)
            jobs = await self._pending_ops(conn, game_id, generation)
            answer = f"{message}; rolled back to {target}" if target else message
            # Held only when the failed generation wanted the game running (a start whose engine
            # never became healthy): a failed stop is answered now, or it would never be.
            if (new.desired_status is DesiredStatus.STOPPED and cur.desired_status is DesiredStatus.RUNNING
                    and not answer_now):
                for op in jobs:  # answered once stopped (_end_op); a failure recorded first stands
                    await conn.execute("UPDATE runtime_operations SET error_code = $2, error_message = $3"
                                       " WHERE id = $1 AND error_code IS NULL", op.id, code.value, answer)
                return new
            await self._finish_pending(conn, new, Finish(generation=generation, outcome=Outcome.FAILURE,
                                                         error_code=code, message=answer), now)
            if target:
                op = jobs[0].op if jobs else OpKind.RECONCILE
                await self._insert_note(conn, new, ReconcilerNote(
                    op=op, params={"event": "rollback", "from": cur.desired_image_ref, "to": target,
                                   "failed_generation": generation, "error_code": code.value}), now)
            return new

    async def cleaned_up(self, game_id: str, generation: int) -> RuntimeRecord | None:
        """The cleanup TTL removed a stopped unit: the record becomes removed, for audit."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation or cur.status is not Status.STOPPED:
                return None
            new = await self._write(conn, cur, transitions.cleaned_up(cur, now), now)
            await self._insert_op(conn, game_id, OpKind.CLEANUP, OpSource.RECONCILER, OpStatus.SUCCEEDED,
                                  new.generation, None, None, {"reason": "cleanup_ttl"}, now, None, None)
            return new

    # ------------------------------------------------------- desired state
    async def submit(self, job: Job, defaults: RecordDefaults, *, registry: bool = False) -> SubmitOutcome:
        """Record one job as a desired-state change plus an operation, in one transaction.

        A stream entry already submitted (redelivery after a crash before XACK)
        is recognised by its (stream, entry_id) and changes nothing. With ``registry`` (the
        version policy), a start or patch that would run a new image needs an active version.
        """
        async with self._tx() as (conn, now):
            if job.stream:
                existing = await conn.fetchval(
                    "SELECT id FROM runtime_operations WHERE stream = $1 AND entry_id = $2",
                    job.stream, job.entry_id)
                if existing is not None:
                    return SubmitOutcome(operation_id=existing, decision=None, duplicate=True)
            # FOR UPDATE locks nothing while the record does not exist yet: two first jobs for a
            # new game would both insert. A transaction-scoped advisory lock per game orders them.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _GAME_LOCK_SPACE, job.game_id)
            row = await conn.fetchrow(_SELECT_FOR_UPDATE, job.game_id)
            current = record_from_row(row) if row else None
            decision = await self._decide(conn, current, job, now, defaults, registry)
            if decision.action == "skip":
                return SubmitOutcome(operation_id=0, decision=decision)
            params = {k: v for k, v in (("image_ref", job.image_ref),
                                        ("reason", job.reason.value if job.reason else None),
                                        ("force", job.force)) if v}
            if job.force and decision.action in ("change", "join") and decision.record is not None:
                # An operator's force: this generation's disruption does not wait for a generation.
                forced = decision.record.replace(force_generation=decision.record.generation)
                if decision.action == "join" and current is not None and forced != current:
                    await self._write_desired(conn, current, forced, now)
                    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job.game_id)
                decision = dataclasses.replace(decision, record=forced)
            if decision.action == "change":
                assert decision.record is not None
                await self._write_desired(conn, current, decision.record, now)
                if current is not None and replaces(current, decision.record):
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

    async def submit_many(self, items: list[Job | Rejection], defaults: RecordDefaults, *,
                          registry: bool = False) -> list[SubmitOutcome]:
        """``submit`` (or, for a Rejection, ``reject_entry``) of each item, in order, in ONE transaction.

        A flood of replays and malformed entries costs a handful of statements per batch instead of
        about eight round trips per entry: one fence check, one duplicate query, the games' locks
        and records at once, then the operation rows and results of the batch in two executemany
        calls. Operation ids are taken from the sequence in entry order first, and rows written at
        once (desired-state changes, supersedes) flush what is buffered before them, so ids and
        results keep the entries' order."""
        async with self._tx() as (conn, now):
            keyed = [(i.stream, i.entry_id) for i in items if i.stream]
            existing: dict[tuple[str, str], int] = {}
            if keyed:
                rows = await conn.fetch(
                    "SELECT o.stream, o.entry_id, o.id FROM runtime_operations o JOIN unnest($1::text[], $2::text[])"
                    " AS k(stream, entry_id) ON o.stream = k.stream AND o.entry_id = k.entry_id",
                    [k[0] for k in keyed], [k[1] for k in keyed])
                existing = {(r["stream"], r["entry_id"]): r["id"] for r in rows}
            games = sorted({i.game_id for i in items if isinstance(i, Job)})
            records: dict[str, RuntimeRecord] = {}
            if games:
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext(g)) FROM unnest($2::text[]) AS g"
                                   " ORDER BY g", _GAME_LOCK_SPACE, games)
                rows = await conn.fetch("SELECT * FROM runtime_records WHERE game_id = ANY($1::text[]) FOR UPDATE",
                                        games)
                records = {r["game_id"]: record_from_row(r) for r in rows}
            ids = [r[0] for r in await conn.fetch(
                "SELECT nextval(pg_get_serial_sequence('runtime_operations', 'id')) FROM generate_series(1, $1)",
                len(items))]
            ops: list[tuple] = []
            results: list[tuple] = []

            async def flush() -> None:
                if ops:
                    await conn.executemany(_INSERT_OP_WITH_ID, ops)
                    ops.clear()
                if results:
                    self._outbox_written.add(conn)
                    await conn.executemany(_INSERT_RESULT, results)
                    results.clear()

            outcomes: list[SubmitOutcome] = []
            notify: list[str] = []
            for item, op_id in zip(items, ids, strict=True):
                if item.stream and (item.stream, item.entry_id) in existing:
                    outcomes.append(SubmitOutcome(operation_id=existing[(item.stream, item.entry_id)],
                                                  decision=None, duplicate=True))
                    continue
                if isinstance(item, Rejection):
                    ops.append(_op_row(op_id, item.game_id, OpKind(item.kind.value), item.source, OpStatus.FAILED,
                                       0, item.stream, item.entry_id, {}, now, item.code, item.message))
                    results.append(_result_row(op_id, JobResult(
                        result_id=str(uuid.uuid4()), game_id=item.game_id, outcome=Outcome.FAILURE, job=item.kind,
                        job_entry_id=item.entry_id, error_code=item.code, error_message=item.message)))
                    outcomes.append(SubmitOutcome(operation_id=op_id, decision=None))
                    continue
                job = item
                current = records.get(job.game_id)
                decision = await self._decide(conn, current, job, now, defaults, registry)
                if decision.action == "skip":  # its operation id stays unused
                    outcomes.append(SubmitOutcome(operation_id=0, decision=decision))
                    continue
                params = {k: v for k, v in (("image_ref", job.image_ref),
                                            ("reason", job.reason.value if job.reason else None)) if v}
                status = OpStatus.QUEUED if decision.action in ("change", "join") else (
                    OpStatus.SUCCEEDED if decision.action == "replay" else OpStatus.FAILED)
                if decision.action == "change":
                    assert decision.record is not None
                    await flush()
                    records[job.game_id] = await self._write_desired(conn, current, decision.record, now)
                    if current is not None and replaces(current, decision.record):
                        await self._supersede_older(conn, decision.record, now)
                    notify.append(job.game_id)
                ops.append(_op_row(op_id, job.game_id, OpKind(job.kind.value), job.source, status,
                                   decision.op_generation, job.stream or None, job.entry_id or None, params, now,
                                   decision.error_code if status is OpStatus.FAILED else None,
                                   decision.message or None))
                if decision.action in ("replay", "reject"):
                    results.append(_result_row(op_id, JobResult(
                        result_id=str(uuid.uuid4()), game_id=job.game_id,
                        outcome=Outcome.SUCCESS if decision.action == "replay" else Outcome.FAILURE, job=job.kind,
                        job_entry_id=job.entry_id, container_id=decision.container_id,
                        engine_endpoint=decision.engine_endpoint, error_code=decision.error_code,
                        error_message=decision.message)))
                outcomes.append(SubmitOutcome(operation_id=op_id, decision=decision))
            await flush()
            if notify:
                await conn.execute("SELECT pg_notify($1, g) FROM unnest($2::text[]) AS g", NOTIFY_CHANNEL,
                                   sorted(set(notify)))
            return outcomes

    async def _decide(self, conn: asyncpg.Connection, current: RuntimeRecord | None, job: Job, now: datetime,
                      defaults: RecordDefaults, registry: bool) -> Decision:
        """``decide``, then, under the registry policy, the version of a new image: read FOR SHARE, so a
        concurrent disable or delete of the version waits for this job."""
        decision = decide(current, job, now, defaults)
        if (registry and job.image_ref and job.kind in (JobKind.START, JobKind.PATCH)
                and decision.action in ("change", "join")):
            row = await conn.fetchrow("SELECT * FROM engine_versions WHERE image_ref = $1 FOR SHARE", job.image_ref)
            refusal = versions.refuse_new(_version_from_row(row) if row else None, job.image_ref)
            if refusal is not None:
                return Decision(action="reject", record=current, error_code=ErrorCode.IMAGE_REJECTED, message=refusal)
        return decision

    async def reject_entry(self, *, kind: JobKind, game_id: str, stream: str, entry_id: str,
                           code: ErrorCode, message: str, source: OpSource = OpSource.LOBBY) -> SubmitOutcome:
        """An entry that could not be parsed: a failed operation and its failure result."""
        async with self._tx() as (conn, now):
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

    async def adopt(self, game_id: str, image_ref: str, defaults: RecordDefaults) -> RuntimeRecord:
        """An operator hands an unowned unit back to rtmanager: a record that wants it running on its
        own image and state directory. InvalidJob when the game already has a record."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _GAME_LOCK_SPACE, game_id)
            if await conn.fetchval("SELECT 1 FROM runtime_records WHERE game_id = $1", game_id):
                raise InvalidJob(ErrorCode.INVALID_REQUEST, f"game {game_id} already has a runtime record", game_id)
            record = RuntimeRecord(
                game_id=game_id, status=Status.STARTING, current_container_id=None, current_image_ref=None,
                engine_endpoint=defaults.endpoint(game_id), state_path=defaults.state_path(game_id),
                docker_network=defaults.docker_network, started_at=None, stopped_at=None, removed_at=None,
                last_op_at=now, created_at=now, desired_status=DesiredStatus.RUNNING, desired_image_ref=image_ref,
                generation=1, observed_generation=0)
            record = await self._write(conn, None, record, now)
            await self._insert_op(conn, game_id, OpKind.RECONCILE, OpSource.ADMIN, OpStatus.SUCCEEDED, 1, None,
                                  None, {"event": "adopt", "image_ref": image_ref}, now, None, None)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, game_id)
            return record

    # --------------------------------------------------------------- operations
    async def claim(self, game_id: str, generation: int) -> list[tuple[int, datetime]]:
        """Mark the queued operations of ``generation`` as running; return (id, accepted at) of each."""
        async with self._tx() as (conn, _):
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

    async def oldest_pending_age(self, game_id: str) -> float | None:
        """Seconds (database clock) since the oldest unanswered job of the game was accepted."""
        return await self.pool.fetchval(
            "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM runtime_operations"
            " WHERE game_id = $1 AND status IN ('queued', 'running')", game_id)

    async def snapshot_resync(self, game_id: str | None = None) -> int:
        """A snapshot with reason resync (and a new revision) of every live game, or of one."""
        async with self._tx() as (conn, now):
            rows = await conn.fetch(
                "SELECT * FROM runtime_records WHERE ($1::text IS NULL OR game_id = $1)"
                " AND (status <> 'removed' OR $1::text IS NOT NULL) ORDER BY game_id FOR UPDATE", game_id)
            for row in rows:
                cur = record_from_row(row)
                await self._write(conn, cur, cur, now, "resync")
            return len(rows)

    async def result_for(self, op_id: int) -> dict[str, str] | None:
        raw = await self.pool.fetchval("SELECT fields FROM job_results WHERE operation_id = $1", op_id)
        return json.loads(raw) if isinstance(raw, str) else raw

    # ------------------------------------------------------------------ outbox
    async def unpublished(self, limit: int = 100) -> list[PendingResult]:
        rows = await self.pool.fetch(
            "SELECT r.seq, r.result_id, r.game_id, r.fields, r.kind, r.created_at, o.created_at AS accepted_at"
            " FROM job_results r LEFT JOIN runtime_operations o ON o.id = r.operation_id"
            " WHERE r.published_at IS NULL ORDER BY r.seq LIMIT $1", limit)
        return [PendingResult(seq=r["seq"], result_id=str(r["result_id"]), game_id=r["game_id"],
                              fields=json.loads(r["fields"]) if isinstance(r["fields"], str) else r["fields"],
                              kind=r["kind"], written_at=r["created_at"], accepted_at=r["accepted_at"])
                for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM runtime_records GROUP BY status")
        counts = {s.value: 0 for s in Status}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    async def mark_published_many(self, marks: list[tuple[int, str]]) -> None:
        """(seq, stream entry id) of each entry published, in one statement."""
        async with self._tx() as (conn, _):
            await conn.execute(
                "UPDATE job_results r SET published_at = now(), stream_entry_id = m.entry_id"
                " FROM unnest($1::bigint[], $2::text[]) AS m(seq, entry_id) WHERE r.seq = m.seq",
                [s for s, _ in marks], [e for _, e in marks])

    async def mark_published(self, seq: int, stream_entry_id: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE job_results SET published_at = now(), stream_entry_id = $2 WHERE seq = $1",
                               seq, stream_entry_id)

    async def recently_published(self, kind: str, seconds: float, limit: int = 20000) -> list[tuple[int, str, str]]:
        """(seq, stream entry id, result_id) of the entries of ``kind`` published in the last ``seconds``."""
        rows = await self.pool.fetch(RECENTLY_PUBLISHED_SQL, seconds, limit, kind)
        return [(r["seq"], r["stream_entry_id"], str(r["result_id"])) for r in rows]

    async def mark_unpublished(self, seqs: list[int]) -> None:
        """Results the stream lost: the relay publishes them again (same result_id)."""
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE job_results SET published_at = NULL, stream_entry_id = NULL"
                               " WHERE seq = ANY($1::bigint[])", seqs)

    async def prune(self, older_than_days: float, batch: int = 1000) -> tuple[int, int]:
        """Retention: published results and finished operations older than the horizon.

        Small batches, each its own short transaction and not fenced (old history is
        nobody's to contend for), so that a large backlog never holds locks for long.
        A redelivered stream entry is recognised by its operation row, so the horizon
        must be far longer than any entry can stay pending (days against seconds).
        """
        seconds = older_than_days * 86400
        totals = [0, 0, 0]
        statements = (
            "DELETE FROM job_results WHERE seq IN (SELECT seq FROM job_results"
            " WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
            "DELETE FROM runtime_operations WHERE id IN (SELECT o.id FROM runtime_operations o"
            " WHERE o.finished_at < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM job_results r WHERE r.operation_id = o.id) LIMIT $2)",
            "DELETE FROM entry_attempts WHERE (stream, entry_id) IN (SELECT stream, entry_id FROM entry_attempts"
            " WHERE updated_at < now() - make_interval(secs => $1) LIMIT $2)",
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

    # ----------------------------------------------------- engine versions
    async def engine_version_of(self, image_ref: str) -> versions.EngineVersion | None:
        row = await self.pool.fetchrow("SELECT * FROM engine_versions WHERE image_ref = $1", image_ref)
        return _version_from_row(row) if row else None

    async def list_versions(self, status: versions.VersionStatus | None = None) -> list[versions.EngineVersion]:
        rows = await self.pool.fetch("SELECT * FROM engine_versions WHERE $1::text IS NULL OR status = $1"
                                     " ORDER BY version", status.value if status else None)
        return [_version_from_row(r) for r in rows]

    async def get_version(self, version: str) -> tuple[versions.EngineVersion, int]:
        """The entry and the number of live (not removed) games on it; NotFound."""
        row = await self.pool.fetchrow(
            "SELECT v.*, (SELECT count(*) FROM runtime_records r WHERE r.status <> 'removed'"
            " AND coalesce(r.desired_image_ref, r.current_image_ref) = v.image_ref) AS live_games"
            " FROM engine_versions v WHERE v.version = $1", version)
        if row is None:
            raise NotFound(version)
        return _version_from_row(row), int(row["live_games"])

    async def create_version(self, version: str, image_ref: str, status: versions.VersionStatus,
                             notes: str, stop_grace: int | None = None) -> versions.EngineVersion:
        """UniqueViolation (naming engine_versions_version_key or engine_versions_image_ref_key) when
        either exists: the database decides, so two racing creates give one entry and one conflict."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow(
                "INSERT INTO engine_versions (version, image_ref, status, notes, stop_grace) VALUES ($1, $2, $3, $4,"
                " $5) RETURNING *", version, image_ref, status.value, notes, stop_grace)
            await conn.execute("UPDATE runtime_records SET engine_version = $1 WHERE"
                               " coalesce(desired_image_ref, current_image_ref) = $2", version, image_ref)
            return _version_from_row(row)

    async def update_version(self, version: str, *, status: versions.VersionStatus | None,
                             notes: str | None, stop_grace: Any = _KEEP) -> versions.EngineVersion:
        """``stop_grace``: seconds, None (back to RTMANAGER_STOP_GRACE), or left as it is."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow(
                "UPDATE engine_versions SET status = coalesce($2, status), notes = coalesce($3, notes),"
                " stop_grace = CASE WHEN $4 THEN $5::integer ELSE stop_grace END,"
                " updated_at = now() WHERE version = $1 RETURNING *", version, status.value if status else None,
                notes, stop_grace is not _KEEP, None if stop_grace is _KEEP else stop_grace)
            if row is None:
                raise NotFound(version)
            return _version_from_row(row)

    async def delete_version(self, version: str) -> None:
        """NotFound, or VersionInUse while a game that is not removed runs or wants its image."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow("SELECT * FROM engine_versions WHERE version = $1 FOR UPDATE", version)
            if row is None:
                raise NotFound(version)
            users = await conn.fetch(
                "SELECT game_id FROM runtime_records WHERE status <> 'removed' AND (desired_image_ref = $1"
                " OR current_image_ref = $1) ORDER BY game_id LIMIT 5", row["image_ref"])
            if users:
                raise VersionInUse(f"engine version {version} is used by games that are not removed: "
                                   + ", ".join(r["game_id"] for r in users))
            await conn.execute("DELETE FROM engine_versions WHERE id = $1", row["id"])

    # ------------------------------------------------------------ intake marks
    async def stream_marks(self) -> dict[str, tuple[int, int]]:
        rows = await self.pool.fetch("SELECT stream, mark_ms, mark_seq FROM stream_marks")
        return {r["stream"]: (int(r["mark_ms"]), int(r["mark_seq"])) for r in rows}

    async def advance_mark(self, stream: str, mark: tuple[int, int]) -> tuple[int, int]:
        """Raise the stream's mark to ``mark`` (never lower it); return the stored mark."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow(
                "INSERT INTO stream_marks AS m (stream, mark_ms, mark_seq) VALUES ($1, $2, $3)"
                " ON CONFLICT (stream) DO UPDATE SET mark_ms = EXCLUDED.mark_ms, mark_seq = EXCLUDED.mark_seq,"
                " updated_at = now() WHERE (m.mark_ms, m.mark_seq) < (EXCLUDED.mark_ms, EXCLUDED.mark_seq)"
                " RETURNING mark_ms, mark_seq", stream, mark[0], mark[1])
            if row is None:
                row = await conn.fetchrow("SELECT mark_ms, mark_seq FROM stream_marks WHERE stream = $1", stream)
        return int(row["mark_ms"]), int(row["mark_seq"])

    async def count_attempt(self, stream: str, entry_id: str, error: str | None = None) -> int:
        """One more handling attempt of a re-read entry; returns how many so far."""
        async with self._tx() as (conn, _):
            return await conn.fetchval(
                "INSERT INTO entry_attempts AS a (stream, entry_id, attempts, last_error) VALUES ($1, $2, 1, $3)"
                " ON CONFLICT (stream, entry_id) DO UPDATE SET attempts = a.attempts + 1,"
                " last_error = coalesce($3, a.last_error), updated_at = now() RETURNING attempts",
                stream, entry_id, error)

    async def uncount_attempt(self, stream: str, entry_id: str) -> None:
        """The attempt ended in an outage, not in a failure of the entry: it does not count."""
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE entry_attempts SET attempts = greatest(attempts - 1, 0), updated_at = now()"
                               " WHERE stream = $1 AND entry_id = $2", stream, entry_id)

    async def forget_attempts(self, stream: str, entry_id: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("DELETE FROM entry_attempts WHERE stream = $1 AND entry_id = $2", stream, entry_id)

    # ----------------------------------------------------------------- helpers
    async def _write(self, conn: asyncpg.Connection, cur: RuntimeRecord | None, new: RuntimeRecord,
                     now: datetime, forced_reason: str | None = None) -> RuntimeRecord:
        """Write ``new`` over ``cur`` (insert when None): the status machine, the invariants, the
        changed columns only, and the snapshot Lobby is owed when status, turn or paused changed."""
        if cur is not None and new.status is not cur.status:
            check_transition(cur.status, new.status)
        image = new.desired_image_ref or new.current_image_ref
        if cur is None or image != (cur.desired_image_ref or cur.current_image_ref):
            version = await conn.fetchval("SELECT version FROM engine_versions WHERE image_ref = $1", image)
            new = new.replace(engine_version=version or "")
        reason = snapshots.reason_for(cur, new, forced_reason)
        if reason is not None:
            new = new.replace(snapshot_revision=(cur.snapshot_revision if cur else 0) + 1)
        new.validate()
        if cur is None:
            await _insert_record(conn, new)
        else:
            await _set_columns(conn, new.game_id, _changed(cur, new))
        if reason is not None:
            await self._insert_snapshot(conn, new, cur.status if cur else None, reason, now)
        return new

    async def _insert_snapshot(self, conn: asyncpg.Connection, record: RuntimeRecord, previous: Status | None,
                               reason: str, now: datetime) -> None:
        self._outbox_written.add(conn)
        snapshot_id = str(uuid.uuid4())
        body = snapshots.fields(record, previous=previous, reason=reason, snapshot_id=snapshot_id, now=now)
        await conn.execute(
            "INSERT INTO job_results (result_id, operation_id, game_id, fields, kind)"
            " VALUES ($1, NULL, $2, $3::jsonb, 'snapshot')", uuid.UUID(snapshot_id), record.game_id, json.dumps(body))

    async def _write_desired(self, conn: asyncpg.Connection, current: RuntimeRecord | None,
                             new: RuntimeRecord, now: datetime) -> RuntimeRecord:
        if current is not None:
            bad = set(_changed(current, new)) - _DESIRED_COLUMNS
            if bad:
                raise AssertionError(f"admission may not write observed columns {sorted(bad)}")
        return await self._write(conn, current, new, now)

    async def _supersede_older(self, conn: asyncpg.Connection, record: RuntimeRecord, now: datetime) -> None:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation < $2 ORDER BY id FOR UPDATE", record.game_id, record.generation)
        for row in rows:
            op = Operation.from_row(row)
            await self._end_op(conn, op, Outcome.FAILURE, ErrorCode.SUPERSEDED,
                               f"replaced by a newer job (generation {record.generation}) before it converged",
                               "", "", now)

    async def _pending_ops(self, conn: asyncpg.Connection, game_id: str, generation: int) -> list[Operation]:
        rows = await conn.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running')"
            " AND generation <= $2 ORDER BY id FOR UPDATE", game_id, generation)
        return [Operation.from_row(r) for r in rows]

    async def _finish_pending(self, conn: asyncpg.Connection, record: RuntimeRecord, finish: Finish,
                              now: datetime) -> int:
        # Older generations still pending were not replaced (a pause, a forced turn, a reconcile
        # came after them): they converge with this one and hear the same answer.
        ops = await self._pending_ops(conn, record.game_id, finish.generation)
        for op in ops:
            container_id, endpoint = "", ""
            if finish.outcome is Outcome.SUCCESS:
                container_id = record.current_container_id or ""
                endpoint = record.engine_endpoint if container_id else ""
            await self._end_op(conn, op, finish.outcome, finish.error_code, finish.message,
                               container_id, endpoint, now)
        return len(ops)

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

    async def _insert_note(self, conn: asyncpg.Connection, record: RuntimeRecord, note: ReconcilerNote,
                           now: datetime) -> None:
        await self._insert_op(conn, record.game_id, note.op, OpSource.RECONCILER,
                              OpStatus.FAILED if note.error_code else OpStatus.SUCCEEDED, record.generation,
                              None, None, note.params, now, note.error_code, note.message or None)

    async def _insert_result(self, conn: asyncpg.Connection, op_id: int | None, result: JobResult) -> None:
        self._outbox_written.add(conn)
        await conn.execute(_INSERT_RESULT, *_result_row(op_id, result))


# ------------------------------------------------------------- notifications
class Notifications:
    """NOTIFY from other processes (REST on another replica, operators' tools) on a connection of its own:
    the games to look at, and (with ``outbox``) the outbox written elsewhere, which raises ``outbox``.

    Best effort: asyncpg does not notice a dead listener by itself, so the connection is pinged,
    and reconnected with backoff; the periodic resync (and the relay's poll) is the fallback for what is missed."""

    def __init__(self, database_url: str, on_notify: Callable[[str], None], outbox: Signal | None = None) -> None:
        self.database_url = database_url
        self.on_notify = on_notify
        self.outbox = outbox

    async def run(self, stopping: asyncio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self.database_url, timeout=5)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *args: self.on_notify(args[3]))
                if self.outbox is not None:
                    await conn.add_listener(OUTBOX_CHANNEL, lambda *args: self.outbox.heard(args[3]))
                delay = 0.5
                while not stopping.is_set() and not conn.is_closed():
                    await conn.execute("SELECT 1", timeout=5)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stopping.wait(), 5)
            except Exception as exc:  # noqa: BLE001 - best effort: the resync is the fallback
                log.warning("listener lost Postgres, retrying in %.1fs: %s", delay, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 10)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close()
