"""Restarts of the Docker daemon are not engine crashes.

Without live-restore a dockerd restart stops every container. rtmanager starts the
games again at once, without counting a crash: five restarts within the crash window
must not give any game up (they used to, at RTMANAGER_CRASH_LIMIT=5). The daemon restarted is a
private one of the test's own: the machine's main daemon is never touched."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import redis

from tests.e2e.test_walking_skeleton import migrate
from tests.support import ControllerProcess, PrivateDockerd, ResultReader

pytestmark = pytest.mark.e2e


def test_five_daemon_restarts_in_a_row_give_no_game_up(rtm_env, stub_images, tmp_path, unique):
    daemon = PrivateDockerd()
    daemon.start()
    daemon.load_images("galaxy/engine-stub:1.0")
    try:
        _five_restarts(daemon, rtm_env, tmp_path, unique)
    finally:
        daemon.remove()


def _five_restarts(daemon: PrivateDockerd, rtm_env, tmp_path, unique) -> None:
    env = {**rtm_env, "RTMANAGER_CRASH_LIMIT": "3", "RTMANAGER_RESYNC_INTERVAL": "1", "DOCKER_HOST": daemon.host}
    migrate(env)
    games = [f"dr-{unique}-{i}" for i in range(2)]
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()

    def running(game: str) -> bool:
        client = daemon.client(timeout=10)
        try:
            return any(c.status == "running" for c in
                       client.containers.list(all=True, filters={"label": f"com.galaxy.game-id={game}"}))
        finally:
            client.close()

    async def records():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return {r["game_id"]: r for r in await conn.fetch(
                "SELECT game_id, status, desired_status, crash_count FROM runtime_records")}
        finally:
            await conn.close()

    try:
        for g in games:
            entry = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": "galaxy/engine-stub:1.0"})
            assert reader.for_entry(entry, timeout=60)["outcome"] == "success"
        for n in range(5):
            daemon.restart()
            deadline = time.monotonic() + 60
            while not all(running(g) for g in games):
                assert time.monotonic() < deadline, f"restart {n + 1}: games not back: {ctl.log()[-3000:]}"
                time.sleep(0.3)
            while True:
                recs = asyncio.run(records())
                if all(recs[g]["status"] == "running" for g in games):
                    break
                assert time.monotonic() < deadline, recs
                time.sleep(0.3)
        recs = asyncio.run(records())
        for g in games:
            assert recs[g]["desired_status"] == "running" and recs[g]["crash_count"] == 0, dict(recs[g])
        assert "stopped by a restart of the container daemon" in ctl.log()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()
