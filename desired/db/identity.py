"""Which instance the database belongs to, and what an operator asks of the database itself."""

from __future__ import annotations

from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.values import Identity, WrongInstance


@translating
class Identities(StoreBase):
    """The database's identity, its lease as the status page shows it, its migrations."""

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

    async def lease_info(self, instance: str) -> dict | None:
        row = await self.pool.fetchrow(
            "SELECT holder, epoch, expires_at > now() AS live FROM leader_leases WHERE instance = $1", instance)
        return dict(row) if row is not None else None

    async def applied_migrations(self) -> set[str]:
        return {r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations")}
