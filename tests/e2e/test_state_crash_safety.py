"""kill -9 of ``rtmanager run`` while failing replacements copy, roll back and restore state
directories: each game ends on its old image with the state its old engine left, and no copy stays."""

from __future__ import annotations

import random
import time
from pathlib import Path

import redis

from tests.support import ControllerProcess, ResultReader, eventually_sync, migrate


def test_kill_9_during_failing_replacements_restores_every_games_old_state(rtm_env, docker_client, tmp_path, unique):
    rtm_env = {**rtm_env, "RTMANAGER_LEASE_TTL": "1", "RTMANAGER_START_TIMEOUT": "5",
               "RTMANAGER_STATE_SCAN_INTERVAL": "1"}
    migrate(rtm_env)
    seed = unique  # this run's own: printed, and pytest shows it when the test fails
    print(f"random seed: {seed!r} (replay with random.Random of that string)")
    rng = random.Random(seed)
    r = redis.Redis.from_url(rtm_env["RTMANAGER_REDIS_URL"], decode_responses=True)
    results = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])
    root = Path(rtm_env["RTMANAGER_STATE_ROOT"])
    games = [f"k9s-{unique}-{i}" for i in range(4)]
    log = tmp_path / "rtmanager.log"
    starts = rtm_env["RTMANAGER_START_STREAM"]
    try:
        ctl = ControllerProcess(rtm_env, log).start()
        for g in games:
            res = results.for_entry(r.xadd(starts, {"game_id": g, "image_ref": "galaxy/engine-stub:1.0"}), 60)
            assert res["outcome"] == "success", (res, ctl.log()[-3000:])
        ctl.wait_started()
        assert ctl.stop() == 0
        before = {}
        for g in games:
            (root / g / "marker").write_text(f"old engine of {g}")
            before[g] = (root / g / "boots").read_text()
        # Another image for each running game: it exits at once (after writing its boot).
        entries = {g: r.xadd(starts, {"game_id": g, "image_ref": "galaxy/engine-stub:crash"}) for g in games}
        for _ in range(3):  # kills at random moments of the work
            ctl = ControllerProcess(rtm_env, log).start()
            time.sleep(rng.uniform(1.2, 3.0))
            ctl.kill9()
        ctl = ControllerProcess(rtm_env, log).start()
        for g in games:
            res = results.for_entry(entries[g], timeout=90)
            assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed", res

        def back_on_the_old_image_and_state(g: str) -> bool:
            running = docker_client.containers.list(filters={"label": f"com.galaxy.game-id={g}"})
            copies = root / ".backups" / g
            return (len(running) == 1 and running[0].image.tags == ["galaxy/engine-stub:1.0"]
                    and (not copies.exists() or not any(copies.iterdir())))

        for g in games:
            eventually_sync(lambda g=g: back_on_the_old_image_and_state(g), 90, f"{g} back on its old image, no copy",
                            detail=lambda: ctl.log()[-4000:])
            assert (root / g / "marker").read_text() == f"old engine of {g}"
            boots = (root / g / "boots").read_text()
            # the old engine's boots, then the rollback engine's: no crashed engine's boot survives
            assert boots.startswith(before[g]), (g, boots)
            assert len(boots.splitlines()) == len(before[g].splitlines()) + 1, (g, boots, ctl.log()[-4000:])
        ctl.wait_started()
        assert ctl.stop() == 0
    finally:
        r.close()
        results.close()
