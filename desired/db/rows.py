"""Rows of the store's tables to and from the model's values, and the SQL that several parts share."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from desired import versions
from desired.model import (
    BOOKKEEPING_FIELDS,
    DesiredStatus,
    ErrorCode,
    Health,
    JobKind,
    JobResult,
    OpSource,
    OpStatus,
    RuntimeRecord,
    Status,
    StopReason,
)
from desired.values import Operation

GAME_LOCK_SPACE = 0x72746D67  # "rtmg": advisory locks keyed by game

RECORD_COLUMNS = (
    "game_id", "status", "current_container_id", "current_image_ref", "engine_endpoint",
    "state_path", "docker_network", "started_at", "stopped_at", "removed_at", "last_op_at",
    "created_at", "desired_status", "desired_image_ref", "generation", "observed_generation",
    "spec_revision", "stop_reason", "health", "last_error_code", "last_error_message",
    "crash_count", "last_exit_code", "last_oom_killed", "last_crash_at", "restart_not_before",
    "health_checked_at", "rollback_image_ref", "rolling_back", "turn", "phase", "admin_api", "probe_failures",
    "unreachable_since", "generation_started_at", "last_turn_at", "snapshot_revision", "paused", "turn_interval",
    "desired_turn", "clock_from", "engine_version", "node_id", "disruption_wait_since", "force_generation",
    "admin_token", "node_lost_since", "avoid_nodes", "disruption_until", "disruption_generation", "stopping_since",
    "disruption_wait_turn", "stopping_unit",
)
DESIRED_COLUMNS = frozenset({"desired_status", "desired_image_ref", "generation", "spec_revision",
                              "stop_reason", "last_op_at", "paused", "turn_interval", "desired_turn",
                              "clock_from", "force_generation", "disruption_until",
                              "disruption_generation"})
_ENUMS = {"status": Status, "desired_status": DesiredStatus, "stop_reason": StopReason,
          "health": Health, "last_error_code": ErrorCode}


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(RuntimeRecord)) - BOOKKEEPING_FIELDS
assert _RECORD_FIELDS == set(RECORD_COLUMNS), "RECORD_COLUMNS and RuntimeRecord's fields differ"
assert "__post_init__" not in vars(RuntimeRecord), "record_from_row would skip RuntimeRecord.__post_init__"
# RuntimeRecord has slots (no per-record dict: about 0.44 KiB a record instead of 1.6): their setters,
# the columns stored as they come apart from the enums and avoid_nodes, which are converted first.
_SETTER = {col: getattr(RuntimeRecord, col).__set__ for col in RECORD_COLUMNS}
_PLAIN_SETTERS = tuple((col, put) for col, put in _SETTER.items() if col not in _ENUMS and col != "avoid_nodes")
_ENUM_SETTERS = tuple((col, enum_type, _SETTER[col]) for col, enum_type in _ENUMS.items())
_set_avoid_nodes = _SETTER["avoid_nodes"]
_set_row_version = vars(RuntimeRecord)["row_version"].__set__

# A record read with its row's version (``RuntimeRecord.row_version``): what a compare-and-swap that
# skips the lock needs (desired/db/base.py ``_swap``).
SELECT_WITH_VERSION = "SELECT xmin AS row_version, * FROM runtime_records"


def record_from_row(row: asyncpg.Record) -> RuntimeRecord:
    """A record as the database holds it. Built without the frozen dataclass's ``__init__`` (its
    checks and keyword handling for 50 fields): the resync and the health round decode every live
    record, and at 100,000 games that ``__init__`` was a large part of their time. Each column goes
    straight into its slot (the asserts above keep the columns and the fields one list); a row may
    carry more columns (state_bytes, a join's), which are not read."""
    rec = object.__new__(RuntimeRecord)
    for col, put in _PLAIN_SETTERS:
        put(rec, row[col])
    for col, enum_type, put in _ENUM_SETTERS:
        v = row[col]
        put(rec, None if v is None else enum_type(v))
    _set_avoid_nodes(rec, tuple(row["avoid_nodes"] or ()))
    _set_row_version(rec, row.get("row_version"))
    return rec


DECODE_SLICE = 2000  # records decoded between two yields to the event loop (about 10 ms)


async def records_from_rows(rows: list[asyncpg.Record]) -> list[RuntimeRecord]:
    """Every row of a large read (the resync's, the health round's), decoded a slice at a time with
    the event loop let go in between: at 100,000 records one decode held it for seconds, and a
    lease renewal waits as long as the loop is held."""
    out: list[RuntimeRecord] = []
    for k in range(0, len(rows), DECODE_SLICE):
        if k:
            await asyncio.sleep(0)
        out.extend(record_from_row(r) for r in rows[k:k + DECODE_SLICE])
    return out


def _db_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


SELECT_FOR_UPDATE = "SELECT * FROM runtime_records WHERE game_id = $1 FOR UPDATE"


def changed(old: RuntimeRecord, new: RuntimeRecord) -> dict[str, Any]:
    return {c: getattr(new, c) for c in RECORD_COLUMNS if getattr(old, c) != getattr(new, c)}


def record_write(cur: RuntimeRecord | None, new: RuntimeRecord, first: int = 1) -> tuple[str, list[Any]] | None:
    """The statement that writes ``new`` over ``cur`` (an INSERT when None; an UPDATE of the changed columns
    only, the names from code, never from input) and its arguments, numbered from ``$first``; None when
    nothing changed."""
    if cur is None:
        cols = ", ".join(f"${i}" for i in range(first, first + len(RECORD_COLUMNS)))
        return (f"INSERT INTO runtime_records ({', '.join(RECORD_COLUMNS)}) VALUES ({cols})",
                [_db_value(getattr(new, c)) for c in RECORD_COLUMNS])
    changes = changed(cur, new)
    if not changes:
        return None
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(changes, start=first + 1))
    return (f"UPDATE runtime_records SET {sets} WHERE game_id = ${first}",
            [new.game_id, *[_db_value(v) for v in changes.values()]])


# The relay's check of what Redis may have lost, at every start, new term and outage: it reads the
# recent window by job_results_published_idx, never the whole table (which grows with retention).
RECENTLY_PUBLISHED_SQL = (
    "SELECT seq, stream_entry_id, result_id FROM job_results WHERE kind = $3 AND published_at > now() -"
    " make_interval(secs => $1) AND stream_entry_id IS NOT NULL ORDER BY seq DESC LIMIT $2")


def operation_from_row(row: asyncpg.Record) -> Operation:
    params = row["params"]
    return Operation(id=row["id"], game_id=row["game_id"], op=JobKind(row["op"]), source=OpSource(row["source"]),
                     status=OpStatus(row["status"]), generation=row["generation"], stream=row["stream"],
                     entry_id=row["entry_id"], params=json.loads(params) if isinstance(params, str) else params,
                     error_code=row["error_code"], error_message=row["error_message"],
                     created_at=row["created_at"], finished_at=row["finished_at"],
                     actor=row.get("actor"), requested_by=row.get("requested_by"))


def operation_from_json(obj: dict[str, Any]) -> Operation:
    """An operation from its row as ``to_jsonb`` writes it (the timestamps as ISO 8601 text)."""
    for col in ("created_at", "finished_at"):
        if obj.get(col) is not None:
            obj[col] = datetime.fromisoformat(obj[col])
    return operation_from_row(obj)  # a mapping with the same keys as the row


INSERT_OP_WITH_ID = (
    "INSERT INTO runtime_operations (id, game_id, op, source, status, generation, stream, entry_id, params,"
    " error_code, error_message, created_at, finished_at, actor, requested_by, idempotency_key)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15, $16)")
INSERT_RESULT = "INSERT INTO job_results (result_id, operation_id, game_id, fields) VALUES ($1, $2, $3, $4::jsonb)"


def op_row(op_id: int, game_id: str, op: JobKind, source: OpSource, status: OpStatus, generation: int,
            stream: str | None, entry_id: str | None, params: dict[str, Any], now: datetime, code: ErrorCode | None,
            message: str | None, actor: str | None = None, requested_by: str | None = None,
            idempotency_key: str | None = None) -> tuple[Any, ...]:
    return (op_id, game_id, op.value, source.value, status.value, generation, stream, entry_id, json.dumps(params),
            code.value if code else None, message, now, now if status.is_final else None, actor or None,
            requested_by or None, idempotency_key or None)


def result_row(op_id: int | None, result: JobResult) -> tuple[Any, ...]:
    return (uuid.UUID(result.result_id), op_id, result.game_id, json.dumps(result.fields()))


def version_from_row(row: asyncpg.Record) -> versions.EngineVersion:
    return versions.EngineVersion(version=row["version"], image_ref=row["image_ref"],
                                  status=versions.VersionStatus(row["status"]), notes=row["notes"],
                                  created_at=row["created_at"], updated_at=row["updated_at"],
                                  stop_grace=row["stop_grace"])
