"""Which instance the database belongs to, and what an operator asks of the database itself."""

from __future__ import annotations

from typing import Any

from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.values import Identity, WrongInstance


@translating
class Identities(StoreBase):
    """The database's identity, its lease as the status page shows it, its migrations."""

    async def claim_identity(self, instance: str) -> Identity:
        """The database's identity, claimed for ``instance`` when it has none; WrongInstance when it
        belongs to another instance."""
        # Two statements, not one: a statement's snapshot is taken before its insert waits on a
        # replica inserting at the same moment, so a single "insert or select" sees no row when it
        # loses that race. The second statement's snapshot includes the winner's commit.
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO controller_identity (instance) VALUES ($1)"
                " ON CONFLICT (singleton) DO NOTHING RETURNING instance, uid, claimed_at", instance)
            if row is None:
                row = await conn.fetchrow("SELECT instance, uid, claimed_at FROM controller_identity")
        if row is None:  # claimed and removed between the two statements: only an operator does that
            raise WrongInstance("the database's identity vanished while it was claimed; start again")
        identity = Identity(instance=row["instance"], uid=str(row["uid"]), claimed_at=row["claimed_at"])
        if identity.instance != instance:
            raise WrongInstance(f"the database belongs to instance {identity.instance!r}, not {instance!r}")
        return identity

    async def identity(self) -> Identity | None:
        """The database's identity as it is, without claiming it (None: no controller has claimed it yet)."""
        row = await self.pool.fetchrow("SELECT instance, uid, claimed_at FROM controller_identity")
        if row is None:
            return None
        return Identity(instance=row["instance"], uid=str(row["uid"]), claimed_at=row["claimed_at"])

    async def lease_info(self, instance: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT holder, epoch, expires_at > now() AS live FROM leader_leases WHERE instance = $1", instance)
        return dict(row) if row is not None else None

    async def applied_migrations(self) -> set[str]:
        return {r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations")}
