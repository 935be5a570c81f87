"""kill -9 of ``rtmanager run`` at arbitrary moments: the next run finishes the work, one container per game."""

from __future__ import annotations

import random
import time

import redis

from tests.support import ControllerProcess, ResultReader, migrate


def test_kill_9_during_starts_never_duplicates_containers(rtm_env, docker_client, tmp_path, unique):
    rtm_env = {**rtm_env, "RTMANAGER_LEASE_TTL": "1"}  # a killed leader's lease lapses after 1 s
    migrate(rtm_env)
    seed = unique  # this run's own: printed, and pytest shows it when the test fails
    print(f"random seed: {seed!r} (replay with random.Random of that string)")
    rng = random.Random(seed)
    r = redis.Redis.from_url(rtm_env["RTMANAGER_REDIS_URL"], decode_responses=True)
    results = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])
    games = [f"k9-{unique}-{i}" for i in range(6)]
    entries = {g: r.xadd(rtm_env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": "galaxy/engine-stub:1.0"})
               for g in games}
    log = tmp_path / "rtmanager.log"
    try:
        for round_ in range(3):  # start, let it work for a moment, kill -9
            ctl = ControllerProcess(rtm_env, log).start()
            # start-up takes ~0.4 s and the previous lease lapses after 1 s: kills land mid-work
            time.sleep(rng.uniform(1.4, 2.0) if round_ else rng.uniform(0.5, 0.9))
            ctl.kill9()
        ctl = ControllerProcess(rtm_env, log).start()
        got = {g: results.for_entry(entries[g], timeout=60) for g in games}
        for g, res in got.items():
            assert res["outcome"] == "success", (res, ctl.log()[-4000:])
            containers = docker_client.containers.list(all=True, filters={"label": f"com.galaxy.game-id={g}"})
            assert [c.id for c in containers] == [res["container_id"]]
            assert containers[0].status == "running"
        ctl.wait_started()  # the results may all be the killed rounds' work: this one may be young
        assert ctl.stop() == 0  # flushed and gone: nothing more can be published
        by_entry: dict[str, set[str]] = {}
        for _, f in r.xrange(rtm_env["RTMANAGER_RESULTS_STREAM"]):  # the whole stream, read again
            by_entry.setdefault(f["job_entry_id"], set()).add(f["result_id"])
        assert set(by_entry) == set(entries.values())
        assert all(len(ids) == 1 for ids in by_entry.values()), by_entry  # re-publishes keep the result_id
    finally:
        r.close()
        results.close()
