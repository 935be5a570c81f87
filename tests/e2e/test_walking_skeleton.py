"""End to end: ``rtmanager run`` against real Postgres, Redis and Docker.

Two start jobs become two running engine containers and two success results;
the containers carry the contract's name, hostname, network, labels and
mount; a stop job stops one of them and is answered.
"""

from __future__ import annotations

import os

import redis

from tests.support import ControllerProcess, ResultReader, migrate


def test_start_two_games_then_stop_one(rtm_env, docker_client, tmp_path, unique):
    migrate(rtm_env)
    ctl = ControllerProcess(rtm_env, tmp_path / "rtmanager.log").start()
    results = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])
    r = redis.Redis.from_url(rtm_env["RTMANAGER_REDIS_URL"], decode_responses=True)
    games = [f"e2e-{unique}-a", f"e2e-{unique}-b"]
    try:
        entries = {g: r.xadd(rtm_env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": "galaxy/engine-stub:1.0"})
                   for g in games}
        for game, entry in entries.items():
            res = results.for_entry(entry, timeout=40)
            assert res["outcome"] == "success", (res, ctl.log()[-3000:])
            assert res["game_id"] == game
            assert res["job"] == "start"
            assert res["error_code"] == "" and res["error_message"] == ""
            assert res["engine_endpoint"] == f"http://galaxy-game-{game}:8080"
            assert len(res["container_id"]) == 64
            assert res["result_id"]
            assert set(res) == {"game_id", "outcome", "container_id", "engine_endpoint", "error_code",
                                "error_message", "job", "job_entry_id", "result_id"}

            c = docker_client.containers.get(res["container_id"])
            assert c.name == f"galaxy-game-{game}"
            assert c.status == "running"
            cfg, host = c.attrs["Config"], c.attrs["HostConfig"]
            assert cfg["Hostname"] == f"galaxy-game-{game}"
            assert cfg["Image"] == "galaxy/engine-stub:1.0"
            assert list(c.attrs["NetworkSettings"]["Networks"]) == [rtm_env["RTMANAGER_DOCKER_NETWORK"]]
            labels = cfg["Labels"]
            assert labels["com.galaxy.managed-by"] == "rtmanager"
            assert labels["com.galaxy.instance"] == rtm_env["RTMANAGER_INSTANCE"]
            assert labels["com.galaxy.game-id"] == game
            assert labels["com.galaxy.spec-hash"]
            mounts = c.attrs["Mounts"]
            assert len(mounts) == 1 and mounts[0]["Type"] == "bind"
            assert mounts[0]["Source"] == f"{rtm_env['RTMANAGER_STATE_ROOT']}/{game}"
            assert mounts[0]["Destination"] == "/var/lib/galaxy-engine"
            assert host["CapDrop"] == ["ALL"] and not host["Privileged"]
            assert "no-new-privileges:true" in host["SecurityOpt"]
            assert host["RestartPolicy"]["Name"] == "no"
            assert host["PidsLimit"] and host["Memory"] and host["NanoCpus"]
            # isolation by default: non-root, read-only root filesystem, a small tmpfs at /tmp
            assert cfg["User"] == "10000:10000" and host["ReadonlyRootfs"] is True
            assert host["Tmpfs"]["/tmp"].endswith(f"size={64 * 1024 ** 2}")
            state = os.stat(mounts[0]["Source"])
            assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (10000, 10000, 0o700)
            top = c.top(ps_args="-o pid,uid")
            uid = top["Titles"].index("UID")
            assert top["Processes"] and all(p[uid] == "10000" for p in top["Processes"])

        stop_entry = r.xadd(rtm_env["RTMANAGER_STOP_STREAM"], {"game_id": games[0], "reason": "finished"})
        res = results.for_entry(stop_entry, timeout=30)
        assert res["outcome"] == "success" and res["job"] == "stop" and res["error_code"] == ""
        assert docker_client.containers.get(f"galaxy-game-{games[0]}").status == "exited"
        assert docker_client.containers.get(f"galaxy-game-{games[1]}").status == "running"
    finally:
        code = ctl.stop()
        results.close()
        r.close()
    assert code == 0, ctl.log()[-3000:]
