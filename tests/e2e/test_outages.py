"""Crashes and outages around the results outbox and Redis, with ``rtmanager run`` as a process."""

from __future__ import annotations

import json
import time
import uuid

import asyncpg
import redis

from tests.support import ControllerProcess, PostgresCluster, RedisServer, ResultReader, migrate


def test_a_result_left_in_the_outbox_is_published_once(rtm_env, tmp_path):
    """The state kill -9 leaves after the result was committed and before XADD."""
    migrate(rtm_env)
    result_id = str(uuid.uuid4())
    fields = {"game_id": "outbox-1", "outcome": "success", "container_id": "", "engine_endpoint": "",
              "error_code": "replay_no_op", "error_message": "", "job": "stop", "job_entry_id": "1-0",
              "result_id": result_id}

    async def put() -> None:
        conn = await asyncpg.connect(rtm_env["RTMANAGER_DATABASE_URL"])
        await conn.execute("INSERT INTO job_results (result_id, game_id, fields) VALUES ($1, $2, $3::jsonb)",
                           uuid.UUID(result_id), "outbox-1", json.dumps(fields))
        await conn.close()

    import asyncio
    asyncio.run(put())
    for n in range(2):  # start, publish, stop; start again: nothing more
        log = tmp_path / f"rtmanager-{n}.log"
        ctl = ControllerProcess(rtm_env, log).start()
        reader = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])
        reader.wait_for(lambda f: f["result_id"] == result_id, timeout=20)
        deadline = time.monotonic() + 20
        while "elected leader" not in ctl.log():  # this process has read the outbox too
            assert time.monotonic() < deadline, ctl.log()
            time.sleep(0.1)
        assert ctl.stop() == 0
        entries = reader.r.xrange(rtm_env["RTMANAGER_RESULTS_STREAM"])
        reader.close()
        assert [f["result_id"] for _, f in entries] == [result_id]
        assert entries[0][1] == fields


def test_redis_outage_during_a_burst_loses_no_job(rtm_env, tmp_path, docker_client, unique):
    server = RedisServer(tmp_path)
    server.start()
    env = {**rtm_env, "RTMANAGER_REDIS_URL": server.url}
    migrate(env)
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    sent: list[tuple[str, str]] = []

    def send(i: int) -> None:
        if i % 10 == 0:
            sent.append(("start", r.xadd(env["RTMANAGER_START_STREAM"],
                                         {"game_id": f"burst-{unique}-{i}", "image_ref": "galaxy/engine-stub:1.0"})))
        else:
            sent.append(("stop", r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": f"burst-{unique}-{i}",
                                                                       "reason": "cancelled"})))
    try:
        time.sleep(1.0)
        for i in range(25):
            send(i)
        server.stop()          # mid-burst: the controller is reading and publishing
        time.sleep(3)
        server.start()
        r = redis.Redis.from_url(server.url, decode_responses=True)
        for i in range(25, 50):
            send(i)
        reader = ResultReader(server.url, env["RTMANAGER_RESULTS_STREAM"])
        deadline = time.monotonic() + 60
        wanted = set(sent)
        while time.monotonic() < deadline:
            got = {(f["job"], f["job_entry_id"]) for f in reader.seen}
            if wanted <= got:
                break
            try:
                reader.wait_for(lambda f: False, timeout=0.5, what="more")
            except AssertionError:
                pass
        by_job: dict[tuple[str, str], set[str]] = {}
        for f in reader.seen:
            by_job.setdefault((f["job"], f["job_entry_id"]), set()).add(f["result_id"])
        missing = wanted - set(by_job)
        assert not missing, (missing, ctl.log()[-3000:])
        assert all(len(ids) == 1 for ids in by_job.values())
        assert sum(1 for f in reader.seen if f["job_entry_id"]) == len(reader.seen)
        counts = {k: sum(1 for f in reader.seen if (f["job"], f["job_entry_id"]) == k) for k in wanted}
        assert set(counts.values()) == {1}, counts  # exactly one result per job
        reader.close()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        server.stop()


def test_postgres_outage_during_a_burst_loses_no_job(rtm_env, tmp_path, unique):
    pg = PostgresCluster()
    pg.start()
    env = {**rtm_env, "RTMANAGER_DATABASE_URL": pg.url}
    ctl = None
    try:
        migrate(env)
        ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
        r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
        reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
        sent = []

        def send(i: int) -> None:
            sent.append(r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": f"pg-{unique}-{i}", "reason": "cancelled"}))

        reader.for_entry(r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": "warm-up", "reason": "cancelled"}))
        for i in range(15):
            send(i)
        pg.stop()  # mid-burst
        for i in range(15, 30):
            send(i)  # Redis still takes jobs; they must wait, not be lost
        time.sleep(3)
        assert ctl.proc.poll() is None, "the controller must keep running without Postgres"
        pg.start()
        for entry in sent:
            res = reader.for_entry(entry, timeout=60)
            assert res["outcome"] == "success" and res["error_code"] == "replay_no_op", (res, ctl.log()[-3000:])
        ids = [(f["job"], f["job_entry_id"]) for f in reader.seen]
        assert len(ids) == len(set(ids))  # one result each
        reader.close()
        r.close()
    finally:
        if ctl is not None:
            assert ctl.stop() == 0, ctl.log()[-3000:]
        pg.remove()
