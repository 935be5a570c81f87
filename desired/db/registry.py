"""The engine version registry (the decisions on it are desired/versions.py)."""

from __future__ import annotations

from typing import Any

import asyncpg

from desired import versions
from desired.db.base import StoreBase, log_fleet_change
from desired.db.pool import translating
from desired.db.rows import version_from_row
from desired.errors import NotFound
from desired.values import KEEP, VersionInUse


async def log_registry_change(conn: asyncpg.Connection, op: str, version: str, params: dict[str, Any],
                              actor: str | None) -> None:
    await log_fleet_change(conn, op, {"version": version, **params}, actor)


@translating
class Registry(StoreBase):
    """Create, read, update and delete engine versions; each change is in the operation log."""

    async def engine_version_of(self, image_ref: str) -> versions.EngineVersion | None:
        row = await self.pool.fetchrow("SELECT * FROM engine_versions WHERE image_ref = $1", image_ref)
        return version_from_row(row) if row else None

    async def list_versions(self, status: versions.VersionStatus | None = None) -> list[versions.EngineVersion]:
        rows = await self.pool.fetch("SELECT * FROM engine_versions WHERE $1::text IS NULL OR status = $1"
                                     " ORDER BY version", status.value if status else None)
        return [version_from_row(r) for r in rows]

    async def get_version(self, version: str) -> tuple[versions.EngineVersion, int]:
        """The entry and the number of live (not removed) games on it; NotFound."""
        row = await self.pool.fetchrow(
            "SELECT v.*, (SELECT count(*) FROM runtime_records r WHERE r.status <> 'removed'"
            " AND coalesce(r.desired_image_ref, r.current_image_ref) = v.image_ref) AS live_games"
            " FROM engine_versions v WHERE v.version = $1", version)
        if row is None:
            raise NotFound(version)
        return version_from_row(row), int(row["live_games"])

    async def create_version(self, version: str, image_ref: str, status: versions.VersionStatus,
                             notes: str, stop_grace: int | None = None, *,
                             actor: str | None = None) -> versions.EngineVersion:
        """UniqueViolation (naming engine_versions_version_key or engine_versions_image_ref_key) when
        either exists: the database decides, so two racing creates give one entry and one conflict."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow(
                "INSERT INTO engine_versions (version, image_ref, status, notes, stop_grace) VALUES ($1, $2, $3, $4,"
                " $5) RETURNING *", version, image_ref, status.value, notes, stop_grace)
            await conn.execute("UPDATE runtime_records SET engine_version = $1 WHERE"
                               " coalesce(desired_image_ref, current_image_ref) = $2", version, image_ref)
            await log_registry_change(conn, "version_create", version, {
                "image_ref": image_ref, "status": status.value, "stop_grace": stop_grace}, actor)
            return version_from_row(row)

    async def update_version(self, version: str, *, status: versions.VersionStatus | None,
                             notes: str | None, stop_grace: Any = KEEP,
                             actor: str | None = None) -> versions.EngineVersion:
        """``stop_grace``: seconds, None (back to RTMANAGER_STOP_GRACE), or left as it is."""
        async with self._tx() as (conn, _):
            row = await conn.fetchrow(
                "UPDATE engine_versions SET status = coalesce($2, status), notes = coalesce($3, notes),"
                " stop_grace = CASE WHEN $4 THEN $5::integer ELSE stop_grace END,"
                " updated_at = now() WHERE version = $1 RETURNING *", version, status.value if status else None,
                notes, stop_grace is not KEEP, None if stop_grace is KEEP else stop_grace)
            if row is None:
                raise NotFound(version)
            changed: dict[str, Any] = {"status": status.value} if status is not None else {}
            if notes is not None:
                changed["notes"] = True  # changed; the text is in the registry
            if stop_grace is not KEEP:
                changed["stop_grace"] = stop_grace
            await log_registry_change(conn, "version_update", version, changed, actor)
            return version_from_row(row)

    async def delete_version(self, version: str, *, actor: str | None = None) -> None:
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
            await log_registry_change(conn, "version_delete", version, {"image_ref": row["image_ref"]}, actor)
