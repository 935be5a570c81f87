"""A forced turn and a kill -9 of the controller right after it: exactly one turn."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from tests.support import ControllerProcess, ResultReader, migrate


@pytest.mark.parametrize("kill_when", ["asked", "generating"])
def test_a_kill_9_right_after_a_forced_turn_never_advances_the_game_twice(rtm_env, tmp_path, unique, kill_when):
    env = {**rtm_env, "RTMANAGER_LEASE_TTL": "1", "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1",
           "RTMANAGER_HEALTH_INTERVAL": "0.5"}
    migrate(env)
    game = f"k9t-{unique}"
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    status_file = Path(env["RTMANAGER_STATE_ROOT"]) / game / "engine" / "status.json"
    ctl = ControllerProcess(env, tmp_path / "first.log").start()
    try:
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": "galaxy/engine-stub:slowgen"})
        assert reader.for_entry(e, timeout=60)["outcome"] == "success"
        force = r.xadd(env["RTMANAGER_CONTROL_STREAM"], {"game_id": game, "op": "force_next_turn"})
        deadline = time.monotonic() + 20
        while True:  # the engine took the request
            if status_file.exists() and json.loads(status_file.read_text())["phase"] == "generating":
                break
            assert time.monotonic() < deadline, ctl.log()[-3000:]
            time.sleep(0.02)
        if kill_when == "generating":
            time.sleep(1.0)
        ctl.kill9()
        ctl = ControllerProcess(env, tmp_path / "second.log").start()
        res = reader.for_entry(force, timeout=60)
        assert res["outcome"] == "success" and res["job"] == "force_next_turn", (res, ctl.log()[-3000:])
        assert json.loads(status_file.read_text())["turn"] == 1
        time.sleep(1.0)  # a second request would have started a second generation by now
        assert json.loads(status_file.read_text()) ["turn"] == 1
        assert json.loads(status_file.read_text())["phase"] == "idle"
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()
