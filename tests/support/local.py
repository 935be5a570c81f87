"""The machine's shared services the tests use (deploy/local/services.sh, or whatever
RTMANAGER_TEST_DATABASE_URL / RTMANAGER_TEST_REDIS_URL point at): their addresses, SQL on the admin
connection, and the removal of a test's Docker objects."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import docker

ADMIN_DSN = os.environ.get("RTMANAGER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:55432/postgres")
REDIS_URL = os.environ.get("RTMANAGER_TEST_REDIS_URL", "redis://127.0.0.1:56379/0")
STUB_REPO = "galaxy/engine-stub"
STUB_IMAGE = f"{STUB_REPO}:1.0"


def dsn_for(dbname: str) -> str:
    parts = urlsplit(ADMIN_DSN)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


def admin_sql(*statements: str) -> None:
    """Run statements on the admin connection (CREATE / DROP DATABASE cannot run in a transaction)."""
    async def run() -> None:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
        try:
            for sql in statements:
                await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run())


def cleanup_docker(client: docker.DockerClient, instance: str, network: str) -> None:
    for c in client.containers.list(all=True, filters={"label": f"com.galaxy.instance={instance}"}):
        c.remove(force=True)
    for n in client.networks.list(names=[network]):
        if n.name == network:
            n.remove()
