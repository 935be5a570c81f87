"""Reads of the runtime records and the operation log, and the state directories' columns."""

from __future__ import annotations

import builtins  # the class defines list(): its annotations spell the builtin type in full
import json
import time
from datetime import datetime
from typing import Any

from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.db.rows import SELECT_WITH_VERSION, operation_from_row, record_from_row, records_from_rows
from desired.errors import NotFound
from desired.model import UP, RuntimeRecord, Status
from desired.paging import PageRequest
from desired.values import Operation


@translating
class Records(StoreBase):
    """Records and operations as they are: reads on the pool (the state directories' sizes are
    written outside the record's compare-and-swap)."""

    async def get(self, game_id: str) -> RuntimeRecord:
        """The record, and a reading of the database's clock with it: the pass-through compares the record's
        stop mark (the database's time) with ``clock``, also on a standby, whose fenced writes never read it."""
        async with self.pool.acquire() as conn:
            before = time.monotonic()  # once a connection is had: a wait for one is no part of the reading
            row = await conn.fetchrow("SELECT xmin AS row_version, *, now() AS db_now FROM runtime_records"
                                      " WHERE game_id = $1", game_id)
            after = time.monotonic()
        if row is None:
            raise NotFound(game_id)
        self.clock.observe_db(row["db_now"], before, after)
        return record_from_row(row)

    async def find(self, game_id: str) -> RuntimeRecord | None:
        row = await self.pool.fetchrow(f"{SELECT_WITH_VERSION} WHERE game_id = $1", game_id)
        return record_from_row(row) if row is not None else None

    async def list(self) -> list[RuntimeRecord]:
        rows = await self.pool.fetch("SELECT * FROM runtime_records ORDER BY game_id")
        return [record_from_row(r) for r in rows]

    async def page(self, request: PageRequest) -> tuple[builtins.list[RuntimeRecord], bool]:
        """Up to ``request.limit`` records after the keyset, by game_id, and whether more follow (the
        primary key's index serves the order and the keyset)."""
        f = request.filter
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE ($1::text IS NULL OR game_id > $1)"
            " AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR engine_version = $3)"
            " AND ($4::text IS NULL OR node_id = $4) ORDER BY game_id LIMIT $5",
            request.after, f.status.value if f.status else None, f.engine_version, f.node, request.limit + 1)
        return [record_from_row(r) for r in rows[:request.limit]], len(rows) > request.limit

    async def list_up(self) -> builtins.list[RuntimeRecord]:
        """Games whose engine's container should be running (every UP status)."""
        rows = await self.pool.fetch(f"{SELECT_WITH_VERSION} WHERE status = ANY($1::text[]) ORDER BY game_id",
                                     [s.value for s in UP])
        return await records_from_rows(rows)

    async def list_by_status(self, status: Status) -> builtins.list[RuntimeRecord]:
        rows = await self.pool.fetch("SELECT * FROM runtime_records WHERE status = $1 ORDER BY game_id",
                                     status.value)
        return [record_from_row(r) for r in rows]

    async def list_live(self) -> builtins.list[RuntimeRecord]:
        """Every record the controller may still have to act on (one query, for resync)."""
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE status <> 'removed' OR desired_status <> 'removed'"
            " OR observed_generation <> generation")
        return await records_from_rows(rows)

    async def games_with_queued_operations(self) -> set[str]:
        """The games with an operation no reconcile has claimed yet (one query over the pending index)."""
        rows = await self.pool.fetch("SELECT DISTINCT game_id FROM runtime_operations"
                                     " WHERE status = 'queued'")
        return {r["game_id"] for r in rows}

    async def game_ids(self, game_ids: builtins.list[str]) -> set[str]:
        """Which of these games have a record (removed ones included)."""
        rows = await self.pool.fetch("SELECT game_id FROM runtime_records WHERE game_id = ANY($1::text[])",
                                     game_ids)
        return {r["game_id"] for r in rows}

    async def count_by_status(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM runtime_records GROUP BY status")
        counts = {s.value: 0 for s in Status}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

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

    async def removed_with_state(self, retention: float, limit: int = 100,
                                 after: tuple[datetime, str] | None = None) -> builtins.list[RuntimeRecord]:
        """Removed games whose state directory is still there, removed at least ``retention`` seconds
        ago (the database clock), oldest first (then by game); ``after``: past this (removed_at, game_id)."""
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE status = 'removed' AND state_disposed_at IS NULL"
            " AND removed_at <= now() - make_interval(secs => $1)"
            " AND ($3::timestamptz IS NULL OR (removed_at, game_id) > ($3::timestamptz, $4::text))"
            " ORDER BY removed_at, game_id LIMIT $2",
            float(retention), limit, after[0] if after else None, after[1] if after else None)
        return [record_from_row(r) for r in rows]

    async def mark_state_disposed(self, game_id: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE runtime_records SET state_disposed_at = now(), state_bytes = NULL,"
                               " state_measured_at = NULL WHERE game_id = $1 AND status = 'removed'", game_id)

    async def operations(self, game_id: str, limit: int = 100) -> builtins.list[Operation]:
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 ORDER BY id DESC LIMIT $2", game_id, limit)
        return [operation_from_row(r) for r in rows]

    async def operation_log(self, *, before: int | None = None, limit: int = 100, game_id: str | None = None,
                            actor: str | None = None, op: str | None = None) -> builtins.list[dict[str, Any]]:
        """The operation log of every game and of the version registry, newest first: ids below ``before``."""
        rows = await self.pool.fetch(
            "SELECT id, game_id, op, source, status, generation, stream, entry_id, params, error_code,"
            " error_message, created_at, finished_at, actor, requested_by FROM runtime_operations"
            " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR game_id = $2)"
            " AND ($3::text IS NULL OR actor = $3) AND ($4::text IS NULL OR op = $4)"
            " ORDER BY id DESC LIMIT $5", before, game_id, actor, op, limit)
        out = []
        for r in rows:
            entry = dict(r)
            if isinstance(entry["params"], str):
                entry["params"] = json.loads(entry["params"])
            out.append(entry)
        return out

    async def log_disposal(self, game_id: str, container_id: str, actor: str) -> None:
        """``rtmanager dispose`` of an unowned container (a game without a record) in the operation log."""
        async with self._tx() as (conn, now):
            await conn.execute(
                "INSERT INTO runtime_operations (game_id, op, source, status, params, actor, created_at, finished_at)"
                " VALUES ($1, 'cleanup', 'admin', 'succeeded', $2::jsonb, $3, $4, $4)",
                game_id, json.dumps({"event": "dispose", "container_id": container_id}), actor, now)

    async def operation(self, op_id: int) -> Operation:
        row = await self.pool.fetchrow("SELECT * FROM runtime_operations WHERE id = $1", op_id)
        if row is None:
            raise NotFound(str(op_id))
        return operation_from_row(row)

    async def pending_operations(self, game_id: str) -> builtins.list[Operation]:
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_operations WHERE game_id = $1 AND status IN ('queued', 'running') ORDER BY id",
            game_id)
        return [operation_from_row(r) for r in rows]

    async def oldest_pending_age(self, game_id: str) -> float | None:
        """Seconds (database clock) since the oldest unanswered job of the game was accepted."""
        return await self.pool.fetchval(
            "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM runtime_operations"
            " WHERE game_id = $1 AND status IN ('queued', 'running')", game_id)
