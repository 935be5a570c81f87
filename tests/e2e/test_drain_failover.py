"""A drain of the Docker host survives a kill -9 of the leader: two ``rtmanager run`` processes, the
drain asked with the CLI while turns run, the leader killed once the drain has taken a game; the
standby takes over and finishes the drain from its rows (every game stopped between turns), new
starts are refused, and ``rtmanager undrain --host`` brings the games back."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from tests.support import ControllerProcess, ResultReader, eventually_sync, free_port, migrate
from tests.support.services import cli

GENERATION = 2  # seconds a generation takes


def test_a_host_drain_goes_on_after_a_kill_9_of_the_leader(rtm_env, tmp_path, unique):
    env = {**rtm_env, "RTMANAGER_LEASE_TTL": "2", "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1",
           "RTMANAGER_HEALTH_INTERVAL": "0.3", "RTMANAGER_RESYNC_INTERVAL": "1"}
    migrate(env)
    root = Path(env["RTMANAGER_STATE_ROOT"])
    games = [f"dk-{unique}-{i}" for i in range(3)]
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    procs = [ControllerProcess({**env, "RTMANAGER_HTTP_PORT": str(free_port()),
                                "RTMANAGER_CONSUMER_NAME": f"replica-{n}"}, tmp_path / f"{n}.log").start()
             for n in ("a", "b")]

    def status(game: str) -> dict:
        return json.loads((root / game / "engine" / "status.json").read_text())

    def drain() -> dict:
        out = cli(env, "drains", "1", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        for g in games:
            e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": "galaxy/engine-stub:1.0",
                                                       "turn_interval": "1"})
            assert reader.for_entry(e, timeout=60)["outcome"] == "success"
            (root / g / "stub-control").mkdir(exist_ok=True)
            (root / g / "stub-control" / "generation_seconds").write_text(str(GENERATION))
        for g in games:
            eventually_sync(lambda g=g: status(g)["turn"] >= 1 and status(g)["phase"] == "generating", 30,
                            f"{g}: turns running", retry_on=(AssertionError, OSError, ValueError))
        out = cli(env, "drain", "--host", "--max-parallel", "1", "--deadline", "120")
        assert out.returncode == 0 and out.stdout.startswith("drain 1: the host draining"), (out.stdout, out.stderr)

        eventually_sync(lambda: drain()["games"], 30, "the drain taking a game")
        leader = next(p for p in procs if '"leader": true' in _readyz(p))
        leader.kill9()
        procs.remove(leader)
        done = eventually_sync(lambda: (d := drain())["status"] == "drained" and d, 60, "the host drained",
                               detail=lambda: procs[0].log()[-3000:])
        assert sorted(g["game_id"] for g in done["games"]) == games and \
            all(g["state"] == "done" for g in done["games"]), done
        for g in games:
            events = (root / g / "events").read_text().split()
            assert "sigterm" in events and "interrupted" not in events, (g, events)
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": f"dk-{unique}-new",
                                                   "image_ref": "galaxy/engine-stub:1.0"})
        assert reader.for_entry(e, timeout=30)["error_code"] == "host_drained"

        out = cli(env, "undrain", "--host")
        assert out.returncode == 0, out.stderr
        eventually_sync(lambda: drain()["status"] == "undrained", 30, "undrained")
        for g in games:
            eventually_sync(lambda g=g: (root / g / "events").read_text().split().count("boot") == 2, 60,
                            f"{g} started again")
    finally:
        for p in procs:
            p.stop()
        r.close()
        reader.close()


def _readyz(proc: ControllerProcess) -> str:
    import urllib.request

    port = proc.env["RTMANAGER_HTTP_PORT"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return resp.read().decode()
    except Exception as exc:  # noqa: BLE001 - a 503 body is still an answer
        body = getattr(exc, "read", None)
        return body().decode() if body else ""
