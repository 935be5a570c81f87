"""Issue 21: one game's poison value or a Redis that refuses writes must not stop ``rtmanager run``.

Before: an engine at turn 2147483647 made the turn clock ask for turn 2147483648, the write failed,
the task died and the process exited 1 (again at every restart); a Redis refusing writes
(NOREPLICAS) killed the intake or the relay the same way."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.support import ControllerProcess, RedisServer, ResultReader, free_port, migrate

MAX_TURN = 2**31 - 1
IMAGE = "galaxy/engine-stub:1.0"


def engine_state(env: dict[str, str], game: str) -> Path:
    return Path(env["RTMANAGER_STATE_ROOT"]) / game / "engine" / "status.json"


def turn_of(env: dict[str, str], game: str) -> int:
    try:
        return json.loads(engine_state(env, game).read_text())["turn"]
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def wait_until(check, timeout: float, what: str, ctl: ControllerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert ctl.proc is not None and ctl.proc.poll() is None, f"rtmanager ended: {ctl.log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not within {timeout}s: {ctl.log()[-3000:]}"
        time.sleep(0.1)


def test_an_engine_at_the_largest_turn_fails_its_own_turns_and_the_others_go_on(rtm_env, tmp_path, unique):
    env = {**rtm_env, "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1", "RTMANAGER_HEALTH_INTERVAL": "0.5"}
    migrate(env)
    top, other = f"max-{unique}", f"oth-{unique}"
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    results = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    snapshots = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_SNAPSHOT_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    try:
        for game, interval in ((top, "0"), (other, "1")):
            e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": IMAGE, "turn_interval": interval})
            assert results.for_entry(e, timeout=60)["outcome"] == "success", ctl.log()[-3000:]
        # The engine reports the largest turn there is (valid by the contract), idle.
        state = engine_state(env, top)
        tmp = state.with_name("status.json.test")
        tmp.write_text(json.dumps({"turn": MAX_TURN, "phase": "idle", "last_generation": None},
                                  separators=(",", ":")) + "\n")
        os.chmod(tmp, 0o666)
        tmp.replace(state)
        snapshots.wait_for(lambda f: f["game_id"] == top and f["turn"] == str(MAX_TURN), 30, "snapshot at the top")
        # Now a turn is due every second: a schedule for it, and a forced turn.
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": top, "image_ref": IMAGE, "turn_interval": "1"})
        assert results.for_entry(e, timeout=30)["outcome"] == "success", ctl.log()[-3000:]
        force = r.xadd(env["RTMANAGER_CONTROL_STREAM"], {"game_id": top, "op": "force_next_turn"})
        res = results.for_entry(force, timeout=30)
        assert res["outcome"] == "failure" and res["error_code"] == "generation_failed", res
        assert str(MAX_TURN) in res["error_message"]
        # The process goes on, and so do the other game's turns.
        start_turn = turn_of(env, other)
        wait_until(lambda: turn_of(env, other) >= start_turn + 3, 60, "three more turns of the other game", ctl)
        assert turn_of(env, top) == MAX_TURN
        assert "ended unexpectedly" not in ctl.log()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        results.close()
        snapshots.close()


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_redis_that_refuses_writes_for_ten_seconds_does_not_stop_rtmanager(rtm_env, tmp_path, unique):
    """The recipe: CONFIG SET min-replicas-to-write 1 for ten seconds (every write is refused with
    NOREPLICAS), on a Redis of the test's own; jobs sent meanwhile (REST) are answered after."""
    server = RedisServer(tmp_path)
    server.start()
    port, token = free_port(), "a-token-of-at-least-thirty-two-characters"
    env = {**rtm_env, "RTMANAGER_REDIS_URL": server.url, "RTMANAGER_HTTP_PORT": str(port),
           "RTMANAGER_API_TOKEN": token}
    migrate(env)
    r = redis.Redis.from_url(server.url, decode_responses=True)
    results = ResultReader(server.url, env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    try:
        before = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": f"a-{unique}", "image_ref": IMAGE})
        assert results.for_entry(before, timeout=60)["outcome"] == "success", ctl.log()[-3000:]

        r.config_set("min-replicas-to-write", 1)
        refused_at = time.monotonic()
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": "nobody", "image_ref": IMAGE})
        # A job sent meanwhile, through the REST API (Postgres takes it; Redis refuses to publish).
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/runtimes/b-{unique}/start?wait=0",
                                     data=json.dumps({"image_ref": IMAGE}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        # /readyz says so: Redis answers pings, but the loops that write to it are failing.
        wait_until(lambda: (lambda s: s[0] == 503 and "NOREPLICAS" in s[1]["checks"].get("loops", ""))(readyz(port)),
                   10, "/readyz showing the refusing Redis", ctl)
        while time.monotonic() - refused_at < 10:  # the recipe's ten seconds; the process must live through them
            assert ctl.proc is not None and ctl.proc.poll() is None, ctl.log()[-3000:]
            time.sleep(0.2)
        r.config_set("min-replicas-to-write", 0)

        res = results.wait_for(lambda f: f["game_id"] == f"b-{unique}" and f["job"] == "start", 60,
                               "the REST job's result")
        assert res["outcome"] == "success", res
        after = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": f"c-{unique}", "image_ref": IMAGE})
        assert results.for_entry(after, timeout=60)["outcome"] == "success", ctl.log()[-3000:]
        wait_until(lambda: readyz(port)[0] == 200, 20, "/readyz ready again", ctl)
        assert "ended unexpectedly" not in ctl.log()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        results.close()
        server.stop()
