"""Apply the numbered SQL files in ``migrations/`` once each, in order.

Each file runs in its own transaction and is recorded in ``schema_migrations``;
a session-level advisory lock makes concurrent ``rtmanager migrate`` runs (two
replicas starting together) wait for each other instead of racing.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass

import asyncpg

MIGRATION_LOCK_KEY = 0x72746D6D  # "rtmm"
FILE_PATTERN = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    found = []
    for entry in importlib.resources.files("migrations").iterdir():
        m = FILE_PATTERN.fullmatch(entry.name)
        if m:
            found.append(Migration(version=m.group(1), name=entry.name, sql=entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is pending; return the names applied (empty when up to date)."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    text PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for mig in load_migrations():
            if mig.version in done:
                if done[mig.version] != mig.checksum:
                    raise RuntimeError(f"migration {mig.name} was changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version, mig.name, mig.checksum,
                )
            applied.append(mig.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


async def schema_refusal(conn: asyncpg.Connection) -> str | None:
    """Why this binary must not run on the database's schema, or None. A migration it does not know means
    a newer rtmanager migrated it (a binary rolled back, an old replica of a rolling upgrade): rows may
    hold values this binary cannot read, and one such row would fail the resync of every game. A missing
    one means a column or a constraint this binary writes is not there."""
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    except asyncpg.UndefinedTableError:
        return "the database has no rtmanager schema: run `rtmanager migrate` (or set RTMANAGER_AUTO_MIGRATE=1)"
    known = {m.version for m in load_migrations()}
    unknown = [r["name"] for r in rows if r["version"] not in known]
    if unknown:
        return (f"the database's schema is newer than this rtmanager: it knows no migration {', '.join(unknown)}; "
                "run the rtmanager that applied them")
    applied = {r["version"] for r in rows}
    pending = [m.name for m in load_migrations() if m.version not in applied]
    if pending:
        return (f"the database lacks migrations {', '.join(pending)}: run `rtmanager migrate` "
                "(or set RTMANAGER_AUTO_MIGRATE=1)")
    return None
