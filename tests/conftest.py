"""Fixtures for the tiers that need real services.

The services are the ones deploy/local/services.sh starts (or whatever
RTMANAGER_TEST_DATABASE_URL / RTMANAGER_TEST_REDIS_URL / DOCKER_HOST point at).
A test that needs a service that does not answer *fails* with a message saying
how to start it; nothing here skips.

Isolation per test: a database copied from a template built once from the
migrations, stream and group names with a unique prefix, a unique Docker
instance label and network, and a temporary state root.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import docker
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from tests.support.local import ADMIN_DSN, REDIS_URL, STUB_IMAGE, STUB_REPO, admin_sql, cleanup_docker, dsn_for

# Property tests. The default profile ("ci") is derandomized: the same examples on every run and
# machine, so a suite is never green or red by luck, and no example database is kept between runs.
# "explore" draws new examples on each run (the seed is printed with a failure, and
# `--hypothesis-seed=N` replays it) and ten times as many where a test does not fix its count:
#   HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/unit
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True, max_examples=1000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
HOW_TO = "start the local services with `deploy/local/services.sh up` (as root)"


def _need(what: str, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        pytest.fail(f"{what} is not reachable ({exc.__class__.__name__}: {exc}); {HOW_TO}", pytrace=False)


@pytest.fixture(scope="session")
def template_db() -> str:
    """A database with the schema, built once per session; tests copy it."""
    name = f"rtm_template_{os.getpid()}"

    async def migrate_it() -> None:
        from desired.db.migrate import migrate

        conn = await asyncpg.connect(dsn_for(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    _need("Postgres", lambda: admin_sql(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    _drop_leftovers()
    asyncio.run(migrate_it())
    yield name
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_leftovers() -> None:
    """Databases left by interrupted runs: each name carries the pid of the pytest process that
    made it, and only those of processes that are gone are dropped (runs may overlap)."""
    async def run() -> None:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            names = await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'rtm\\_test\\_%'"
                                      " OR datname LIKE 'rtm\\_template\\_%'")
            for row in names:
                pid = row["datname"].split("_")[2]
                if pid.isdigit() and Path(f"/proc/{pid}").exists():
                    continue  # a run still going
                try:
                    await admin.execute(f'DROP DATABASE "{row["datname"]}" WITH (FORCE)')
                except asyncpg.PostgresError:
                    pass
        finally:
            await admin.close()

    asyncio.run(run())


@pytest.fixture
def database_url(template_db: str) -> str:
    name = f"rtm_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    admin_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield dsn_for(name)
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(database_url: str):
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    yield p
    await p.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    _need("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping())
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = _need("Docker", lambda: docker.from_env(timeout=30))
    _need("Docker", client.ping)
    return client


@pytest.fixture(scope="session")
def stub_images(docker_client: docker.DockerClient) -> str:
    """The stub engine images, built by the project's own script when missing."""
    tags = ("1.0", "1.1", "plain", "slowgen", "genfail", "finish3", "crash", "nulcrash", "mute", "flaky",
            "termdeaf")
    wanted = [f"{STUB_REPO}:{t}" for t in tags]
    missing = [t for t in wanted if not docker_client.images.list(name=t)]
    if missing:
        subprocess.run(["bash", str(ROOT / "deploy/engine-stub/build.sh")], check=True)
    if not docker_client.images.list(name="galaxy/statedir-helper:1"):  # the Swarm tier's state directory helper
        subprocess.run(["bash", str(ROOT / "deploy/statedir-helper/build.sh")], check=True)
    return STUB_IMAGE


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def rtm_env(database_url: str, redis_url: str, docker_client, stub_images, tmp_path: Path, unique: str):
    """Environment for one controller under test: isolated names everywhere."""
    state_root = tmp_path / "games"
    env = {
        "RTMANAGER_DATABASE_URL": database_url,
        "RTMANAGER_REDIS_URL": redis_url,
        "RTMANAGER_DOCKER_NETWORK": f"rtm-test-{unique}",
        "RTMANAGER_STATE_ROOT": str(state_root),
        "RTMANAGER_INSTANCE": f"test-{unique}",
        "RTMANAGER_IMAGE_ALLOWLIST": f"{STUB_REPO}:*",
        "RTMANAGER_START_STREAM": f"t{unique}:start_jobs",
        "RTMANAGER_STOP_STREAM": f"t{unique}:stop_jobs",
        "RTMANAGER_CONTROL_STREAM": f"t{unique}:control_jobs",
        "RTMANAGER_RESULTS_STREAM": f"t{unique}:job_results",
        "RTMANAGER_SNAPSHOT_STREAM": f"t{unique}:snapshots",
        "RTMANAGER_DEAD_LETTER_STREAM": f"t{unique}:dead_letters",
        "RTMANAGER_CONSUMER_GROUP": "rtmanager",
        "RTMANAGER_START_TIMEOUT": "10",
        "RTMANAGER_STOP_GRACE": "2",
        "RTMANAGER_RESYNC_INTERVAL": "2",
        "RTMANAGER_HTTP_PORT": "0",
        "RTMANAGER_LOG_FORMAT": "text",
        "RTMANAGER_LOG_LEVEL": "INFO",
    }
    yield env
    cleanup_docker(docker_client, env["RTMANAGER_INSTANCE"], env["RTMANAGER_DOCKER_NETWORK"])
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"t{unique}:*"):
        r.delete(key)
    r.close()



@pytest.fixture
def other_env(rtm_env, template_db, redis_url, docker_client, tmp_path: Path):
    """A second instance next to ``rtm_env``'s: its own database, streams, state root and instance name;
    the same Docker host (or swarm) and the same engine network. Its units are removed after the test;
    the network is ``rtm_env``'s to remove."""
    tag = uuid.uuid4().hex[:8]
    name = f"rtm_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    admin_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    env = {**rtm_env, "RTMANAGER_DATABASE_URL": dsn_for(name), "RTMANAGER_INSTANCE": f"other-{tag}",
           "RTMANAGER_STATE_ROOT": str(tmp_path / "other-games")}
    for key, value in rtm_env.items():
        if key.endswith("_STREAM"):
            env[key] = value.replace(value.split(":")[0], f"o{tag}", 1)
    yield env
    mine = {"label": f"com.galaxy.instance={env['RTMANAGER_INSTANCE']}"}
    for c in docker_client.containers.list(all=True, filters=mine):
        c.remove(force=True)
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"o{tag}:*"):
        r.delete(key)
    r.close()
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

# ---------------------------------------------------------------------------------------------
# Tiers: each folder under tests/ is a tier, and its tests carry the tier's marker (`-m unit`,
# `-m "not chaos"`). The per-test timeout (pytest-timeout) is pyproject's default except where a
# tier needs another: the unit tier is milliseconds, the swarm and deploy tiers may build images.
TIERS = ("unit", "integration", "e2e", "chaos", "swarm", "deploy")
TIER_TIMEOUTS = {"unit": 60, "swarm": 3600, "deploy": 3600}


def pytest_collection_modifyitems(config, items) -> None:
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            tier = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if tier not in TIERS:
            continue
        item.add_marker(tier)
        if tier in TIER_TIMEOUTS and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS[tier]))
