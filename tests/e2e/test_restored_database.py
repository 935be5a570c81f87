"""A database restored from an older backup of itself, the recipe of issue 21: ``pg_dump -Fc``, three
more games, rtmanager stopped, the database dropped, created and ``pg_restore``d, rtmanager started.
The three games carry this database's identity and a term it knows, and have no record: they are
left running and untouched, reported, and handed to an operator."""

from __future__ import annotations

import functools
import json
import subprocess
from urllib.parse import urlsplit

import redis

from tests.support import ControllerProcess, ResultReader, cli, eventually_sync, free_port, migrate, running
from tests.support.http import get, resyncs
from tests.support.local import admin_sql

STUB = "galaxy/engine-stub:1.0"
wait_until = functools.partial(eventually_sync, interval=0.2)


def test_a_restored_backup_keeps_the_games_started_after_it(rtm_env, docker_client, tmp_path, unique):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**rtm_env, "RTMANAGER_ORPHAN_GRACE": "0", "RTMANAGER_RESYNC_INTERVAL": "0.5",
           "RTMANAGER_HTTP_PORT": str(port)}
    migrate(env)
    dsn = env["RTMANAGER_DATABASE_URL"]
    dbname = urlsplit(dsn).path.lstrip("/")
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    before_backup = f"kept-{unique}"
    after_backup = [f"after-{unique}-{i}" for i in range(3)]
    backup = tmp_path / "backup.dump"

    ctl = ControllerProcess(env, tmp_path / "first.log").start()
    try:
        e = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": before_backup, "image_ref": STUB})
        assert reader.for_entry(e, timeout=60)["outcome"] == "success"
        subprocess.run(["pg_dump", "-Fc", "-f", str(backup), dsn], check=True, timeout=60)
        entries = [r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": STUB}) for g in after_backup]
        for e in entries:
            assert reader.for_entry(e, timeout=60)["outcome"] == "success"
    finally:
        assert ctl.stop() == 0
    games = [before_backup, *after_backup]
    containers = {g: running(docker_client, g) for g in games}
    assert all(len(ids) == 1 for ids in containers.values()), containers

    admin_sql(f'DROP DATABASE "{dbname}" WITH (FORCE)', f'CREATE DATABASE "{dbname}"')
    subprocess.run(["pg_restore", "-d", dsn, str(backup)], check=True, timeout=60)

    ctl = ControllerProcess(env, tmp_path / "second.log").start()
    try:
        def reported() -> bool:
            status, body = get(f"{base}/readyz")
            return status == 200 and json.loads(body).get("unowned") == 3

        wait_until(reported, 60, "three unowned units in /readyz", detail=lambda: ctl.log()[-3000:])
        seen = resyncs(base)
        wait_until(lambda: resyncs(base) >= seen + 6, 30, "six more resyncs, well past the orphan grace")
        assert {g: running(docker_client, g) for g in games} == containers, ctl.log()[-3000:]
        errors = [line for line in ctl.log().splitlines() if "unaccounted unit" in line]
        assert sorted(g for g in after_backup if any(g in line for line in errors)) == after_backup
        assert len(errors) == 3, errors  # once each
        _, metrics = get(f"{base}/metrics")
        assert "rtmanager_unowned_containers 3.0" in metrics.splitlines()
        status = cli(env, "status").stdout
        for g in after_backup:
            assert any(g in line and "unowned" in line for line in status.splitlines()), status

        # The operator decides: one adopted, one disposed of, one left for later.
        adopt = cli(env, "adopt", after_backup[0])
        assert adopt.returncode == 0, adopt.stderr
        dispose = cli(env, "dispose", after_backup[1])
        assert dispose.returncode == 0, dispose.stderr
        wait_until(lambda: running(docker_client, after_backup[1]) == [], 30, "the disposed game gone")
        line = lambda g: next(x for x in cli(env, "status").stdout.splitlines() if g in x)  # noqa: E731
        wait_until(lambda: "running" in line(after_backup[0]) and "unowned" not in line(after_backup[0]), 30,
                   "the adopted game managed again")
        assert running(docker_client, after_backup[0]) == containers[after_backup[0]]  # adopted, not recreated
        assert running(docker_client, after_backup[2]) == containers[after_backup[2]]
        assert running(docker_client, before_backup) == containers[before_backup]
    finally:
        assert ctl.stop() == 0
