"""What Redis forgets must not make a job apply twice, nor lose a result: a Redis restored from an
older copy of its append-only file, and a consumer group deleted (or renamed) by hand."""

from __future__ import annotations

import asyncio
import functools
import shutil
import time

import asyncpg
import redis

from tests.support import ControllerProcess, RedisServer, ResultReader, eventually_sync, migrate

wait_until = functools.partial(eventually_sync, interval=0.2)


def ops_per_entry(env) -> dict[str, int]:
    async def run():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            rows = await conn.fetch("SELECT entry_id, count(*) AS n FROM runtime_operations"
                                    " WHERE entry_id IS NOT NULL GROUP BY entry_id")
            return {r["entry_id"]: r["n"] for r in rows}
        finally:
            await conn.close()
    return asyncio.run(run())


def marks(env) -> dict[str, tuple[int, int]]:
    async def run():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return {r["stream"]: (int(r["mark_ms"]), int(r["mark_seq"]))
                    for r in await conn.fetch("SELECT * FROM stream_marks")}
        finally:
            await conn.close()
    return asyncio.run(run())


def stops(r, env, prefix: str, n: int) -> list[str]:
    return [r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": f"{prefix}-{i}", "reason": "cancelled"})
            for i in range(n)]


def test_a_deleted_group_is_created_again_from_the_mark_and_nothing_applies_twice(rtm_env, tmp_path, unique):
    env = {**rtm_env, "RTMANAGER_CLAIM_IDLE": "2"}
    migrate(env)
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    try:
        first = stops(r, env, f"old-{unique}", 5)
        for e in first:
            reader.for_entry(e)
        wait_until(lambda: marks(env).get(env["RTMANAGER_STOP_STREAM"], (0, 0)) >= tuple(
            int(x) for x in first[-1].split("-")), 30, "the mark past the handled entries")
        # Retention has forgotten them, and an operator deletes the group by hand.
        asyncio.run(_forget_operations(env))
        r.xgroup_destroy(env["RTMANAGER_STOP_STREAM"], env["RTMANAGER_CONSUMER_GROUP"])
        later = stops(r, env, f"new-{unique}", 3)
        for e in later:
            reader.for_entry(e, timeout=30)
        time.sleep(1.0)  # a pass that re-applied the old entries would have done it by now
        applied = ops_per_entry(env)
        assert not any(e in applied for e in first), applied  # the old entries were not applied again
        assert all(applied.get(e) == 1 for e in later), applied
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()


async def _forget_operations(env) -> None:
    conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
    try:
        await conn.execute("DELETE FROM job_results")
        await conn.execute("DELETE FROM runtime_operations")
    finally:
        await conn.close()


def test_a_redis_restored_from_an_older_copy_loses_no_result_and_applies_nothing_twice(rtm_env, tmp_path, unique):
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    env = {**rtm_env, "RTMANAGER_REDIS_URL": server.url, "RTMANAGER_CLAIM_IDLE": "2"}
    migrate(env)
    r = redis.Redis.from_url(server.url, decode_responses=True)
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    try:
        before = stops(r, env, f"a-{unique}", 3)
        reader = ResultReader(server.url, env["RTMANAGER_RESULTS_STREAM"])
        for e in before:
            reader.for_entry(e)
        reader.close()
        server.stop()  # an operator's backup of the append-only file, taken now
        shutil.copytree(tmp_path / "redis", tmp_path / "backup")
        server.start()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        after = stops(r, env, f"b-{unique}", 3)
        reader = ResultReader(server.url, env["RTMANAGER_RESULTS_STREAM"])
        for e in after:
            reader.for_entry(e, timeout=30)
        reader.close()
        # Disaster: Redis comes back from the backup. The later entries and their results are gone.
        server.stop()
        shutil.rmtree(tmp_path / "redis")
        shutil.copytree(tmp_path / "backup", tmp_path / "redis")
        server.start()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        lost = {f["job_entry_id"] for f in _results(r, env)}
        assert not set(after) & lost  # the restore really lost them
        # rtmanager notices the restarted server and publishes again what the stream lost
        wait_until(lambda: set(after) <= {f["job_entry_id"] for f in _results(r, env)}, 40,
                   "the lost results published again")
        by_entry: dict[str, set[str]] = {}
        for f in _results(r, env):
            by_entry.setdefault(f["job_entry_id"], set()).add(f["result_id"])
        assert all(len(ids) == 1 for ids in by_entry.values()), by_entry  # the same result_id
        assert all(n == 1 for n in ops_per_entry(env).values())  # nothing applied twice
        assert "missing from" in ctl.log()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        server.stop()


def _results(r, env) -> list[dict[str, str]]:
    return [f for _, f in r.xrange(env["RTMANAGER_RESULTS_STREAM"])]
