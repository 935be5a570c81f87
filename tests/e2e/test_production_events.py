"""Production events around ``rtmanager run`` as a process: an empty database next to running
games, a Postgres outage longer than the lease, a replica whose clock is behind."""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.request

import asyncpg
import pytest
import redis

from tests.support import (
    ControllerProcess,
    PostgresCluster,
    ResultReader,
    cli,
    eventually_sync,
    free_port,
    migrate,
    running,
)
from tests.support.http import resyncs
from tests.support.local import admin_sql, dsn_for

STUB = "galaxy/engine-stub:1.0"


wait_until = functools.partial(eventually_sync, interval=0.2)


def http_status(url: str, timeout: float = 3.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


# --------------------------------------------------------------- defect 5: an empty database
def test_a_controller_on_an_empty_database_never_disposes_of_running_games(rtm_env, docker_client, tmp_path,
                                                                          unique):
    env = {**rtm_env, "RTMANAGER_ORPHAN_GRACE": "0", "RTMANAGER_RESYNC_INTERVAL": "0.5"}
    migrate(env)
    games = [f"keep-{unique}-a", f"keep-{unique}-b"]
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "first.log").start()
    try:
        entries = [r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": STUB}) for g in games]
        for e in entries:
            assert reader.for_entry(e, timeout=60)["outcome"] == "success"
    finally:
        assert ctl.stop() == 0
    before = {g: running(docker_client, g) for g in games}
    assert all(len(ids) == 1 for ids in before.values())

    # The database is lost (a new volume, `compose down -v`): same instance, empty schema.
    fresh = f"rtm_test_{os.getpid()}_fresh_{unique}"
    admin_sql(f'CREATE DATABASE "{fresh}"')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env2 = {**env, "RTMANAGER_DATABASE_URL": dsn_for(fresh),  # Redis and its consumer group are kept
            "RTMANAGER_HTTP_PORT": str(port)}
    migrate(env2)
    ctl = ControllerProcess(env2, tmp_path / "second.log").start()
    try:
        wait_until(lambda: "unowned" in ctl.log(), 30, "the unowned containers reported")
        seen = resyncs(base)
        wait_until(lambda: resyncs(base) >= seen + 6, 30, "six more resyncs: plenty of chances to dispose of them")
        assert {g: running(docker_client, g) for g in games} == before, ctl.log()[-3000:]
        status = cli(env2, "status")
        assert status.returncode == 0, status.stderr
        for g in games:
            assert any(g in line and "unowned" in line for line in status.stdout.splitlines()), status.stdout

        # An operator hands one back to rtmanager and disposes of the other.
        adopt = cli(env2, "adopt", games[0])
        assert adopt.returncode == 0, adopt.stderr
        # The empty database is another database than the one that created the games: a removal needs the
        # operator's word that the first one is gone for good.
        dispose = cli(env2, "dispose", games[1])
        assert dispose.returncode == 1 and "another database" in dispose.stderr, dispose.stderr
        assert len(running(docker_client, games[1])) == 1
        dispose = cli(env2, "dispose", "--other-database", games[1])
        assert dispose.returncode == 0, dispose.stderr

        def settled():
            return running(docker_client, games[1]) == [] and len(running(docker_client, games[0])) == 1

        wait_until(settled, 30, "the adopted game running and the disposed one gone")
        out = cli(env2, "status").stdout
        line = next(line for line in out.splitlines() if games[0] in line)
        assert "running" in line and "unowned" not in line, out
        # the adopted game is managed again: a stop works as usual
        stop = r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": games[0], "reason": "cancelled"})
        res = reader.for_entry(stop, timeout=30)
        assert res["outcome"] == "success" and res["error_code"] == "", res
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        admin_sql(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        r.close()
        reader.close()


# --------------------------------------------------------------- defect 6: a Postgres outage past the lease
@pytest.mark.parametrize("outage", [5.0, 20.0])
def test_a_postgres_outage_longer_than_the_lease_does_not_end_the_process(rtm_env, tmp_path, unique, outage):
    pg = PostgresCluster()
    pg.start()
    port = free_port()
    env = {**rtm_env, "RTMANAGER_DATABASE_URL": pg.url, "RTMANAGER_LEASE_TTL": "2",
           "RTMANAGER_HTTP_PORT": str(port), "RTMANAGER_HTTP_HOST": "127.0.0.1"}
    ctl = None
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    try:
        migrate(env)
        ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
        warm = r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": "warm-up", "reason": "cancelled"})
        reader.for_entry(warm, timeout=30)
        pg.stop()
        during = [r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": f"pgo-{unique}-{i}", "reason": "cancelled"})
                  for i in range(5)]
        deadline = time.monotonic() + outage
        saw_not_ready = False
        while time.monotonic() < deadline:
            assert ctl.proc.poll() is None, f"the controller exited: {ctl.log()[-3000:]}"
            assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
            saw_not_ready |= http_status(f"http://127.0.0.1:{port}/readyz") == 503
            time.sleep(0.5)
        assert saw_not_ready
        pg.start()
        for e in during:
            res = reader.for_entry(e, timeout=60)
            assert res["outcome"] == "success", res
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 30, "ready again")
        assert ctl.proc.poll() is None
    finally:
        if ctl is not None:
            assert ctl.stop() == 0, ctl.log()[-3000:]
        pg.remove()
        r.close()
        reader.close()


# --------------------------------------------------------------- the database clock
def test_a_replica_whose_clock_is_an_hour_behind_keeps_every_record_valid(rtm_env, docker_client, tmp_path,
                                                                          unique):
    env = {**rtm_env, "RTMANAGER_LEASE_TTL": "2"}
    migrate(env)
    game = f"clock-{unique}"
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "first.log").start()
    try:
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": STUB})
        assert reader.for_entry(e, timeout=60)["outcome"] == "success"
    finally:
        assert ctl.stop() == 0
    # The next leader's wall clock is an hour behind (monotonic time is left alone).
    slow = ControllerProcess({**env, "FAKETIME": "-1h", "DONT_FAKE_MONOTONIC": "1",
                              "LD_PRELOAD": _libfaketime()}, tmp_path / "second.log").start()
    try:
        e = r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": game, "reason": "cancelled"})
        res = reader.for_entry(e, timeout=60)
        assert res["outcome"] == "success" and res["error_code"] == "", (res, slow.log()[-3000:])
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": STUB})
        res = reader.for_entry(e, timeout=60)
        assert res["outcome"] == "success", (res, slow.log()[-3000:])
    finally:
        assert slow.stop() == 0, slow.log()[-3000:]
        r.close()
        reader.close()

    async def times():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return await conn.fetchrow("SELECT started_at, stopped_at, last_op_at, created_at, now() AS now"
                                       " FROM runtime_records WHERE game_id = $1", game)
        finally:
            await conn.close()

    import asyncio
    row = asyncio.run(times())
    assert row["last_op_at"] >= row["created_at"] and abs((row["now"] - row["last_op_at"]).total_seconds()) < 600, \
        json.dumps({k: str(v) for k, v in row.items()})


def _libfaketime() -> str:
    for path in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"):
        if os.path.exists(path):
            return path
    raise AssertionError("libfaketime.so.1 not found; deploy/test.sh installs Debian's faketime")


# --------------------------------------------------------------- snapshots survive a kill -9
def test_a_snapshot_committed_before_a_kill_9_is_published_after_it_with_the_same_id(rtm_env, tmp_path, unique):
    from tests.support import RedisServer

    redis_server = RedisServer(tmp_path)
    redis_server.start()
    env = {**rtm_env, "RTMANAGER_REDIS_URL": redis_server.url, "RTMANAGER_LEASE_TTL": "1",
           "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1", "RTMANAGER_HEALTH_INTERVAL": "0.3",
           "RTMANAGER_UNREACHABLE_AFTER": "2"}
    migrate(env)
    game = f"snap-{unique}"
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    reader = ResultReader(redis_server.url, env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "first.log").start()

    async def pending_unreachable():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return await conn.fetchval(
                "SELECT result_id::text FROM job_results WHERE kind = 'snapshot' AND published_at IS NULL"
                " AND fields->>'reason' = 'engine_unreachable' AND game_id = $1", game)
        finally:
            await conn.close()

    import asyncio
    try:
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": STUB})
        assert reader.for_entry(e, timeout=60)["outcome"] == "success"
        redis_server.stop()  # the change can be committed, not published
        control = tmp_path / "games" / game / "stub-control"
        control.mkdir(exist_ok=True)
        (control / "mute").write_text("")
        snapshot_id = wait_until(lambda: asyncio.run(pending_unreachable()), 30, "the snapshot in the outbox")
        ctl.kill9()
        redis_server.start()
        ctl = ControllerProcess(env, tmp_path / "second.log").start()

        def published():
            return [f for _, f in redis.Redis.from_url(redis_server.url, decode_responses=True).xrange(
                env["RTMANAGER_SNAPSHOT_STREAM"]) if f["snapshot_id"] == snapshot_id]

        found = wait_until(published, 30, "the same snapshot published after the restart")
        assert len(found) == 1 and found[0]["reason"] == "engine_unreachable"
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        reader.close()
        redis_server.stop()
