"""The intake's stream marks and the handling attempts of re-read entries."""

from __future__ import annotations

from desired.db.base import StoreBase
from desired.db.pool import translating


@translating
class Marks(StoreBase):
    """Stream marks (raised, never lowered) and entry attempts."""

    async def stream_marks(self) -> dict[str, tuple[int, int]]:
        rows = await self.pool.fetch("SELECT stream, mark_ms, mark_seq FROM stream_marks")
        return {r["stream"]: (int(r["mark_ms"]), int(r["mark_seq"])) for r in rows}

    async def highest_entries(self) -> dict[str, tuple[int, int]]:
        """Per stream, the highest entry id of an operation still in the log (one read of the whole log: only
        when a Redis numbers a stream below what was handled, controller/intake.py ``ensure_groups``)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT ON (stream) stream, split_part(entry_id, '-', 1)::numeric AS ms,"
            " split_part(entry_id, '-', 2)::numeric AS seq FROM runtime_operations"
            " WHERE stream IS NOT NULL AND entry_id ~ '^[0-9]{1,20}-[0-9]{1,20}$' ORDER BY stream, ms DESC, seq DESC")
        return {r["stream"]: (int(r["ms"]), int(r["seq"])) for r in rows}

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
