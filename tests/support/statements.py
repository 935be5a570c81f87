"""Counting the SQL statements this process sends (tests of what a path costs the database)."""

from __future__ import annotations

import collections

import asyncpg

# What a pool made with asyncpg's default ``reset`` sends when a connection goes back (the tests' pool;
# the controller's has none: desired/db/pool.py): the pool's, not the code's.
POOL_RESET = "SELECT pg_advisory_unlock_all();"

class Counter:
    """Every statement an asyncpg connection of this process sends (BEGIN and COMMIT included)."""

    METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")

    def __init__(self) -> None:
        self.queries: collections.Counter[str] = collections.Counter()
        self.saved = {}

    def __enter__(self) -> Counter:
        for name in self.METHODS:
            orig = getattr(asyncpg.connection.Connection, name)
            self.saved[name] = orig

            def wrap(orig=orig):
                async def counted(conn, query, *args, **kwargs):
                    text = " ".join(str(query).split())
                    if not text.startswith(POOL_RESET):
                        self.queries[text[:90]] += 1
                    return await orig(conn, query, *args, **kwargs)
                return counted
            setattr(asyncpg.connection.Connection, name, wrap())
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self.saved.items():
            setattr(asyncpg.connection.Connection, name, orig)

    def reset(self) -> None:
        self.queries.clear()

    @property
    def total(self) -> int:
        return sum(self.queries.values())
