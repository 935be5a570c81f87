"""Restarts of the Docker daemon are not engine crashes.

Without live-restore a dockerd restart stops every container. rtmanager starts the
games again at once, without counting a crash: five restarts within the crash window
must not give any game up (they used to, at RTMANAGER_CRASH_LIMIT=5). The daemon restarted is a
private one of the test's own: the machine's main daemon is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import redis

from tests.support import ControllerProcess, PrivateDockerd, ResultReader, cli, migrate, wait_for


@contextlib.contextmanager
def private_daemon(image: str) -> Iterator[PrivateDockerd]:
    """A private dockerd with ``image`` loaded, removed afterwards."""
    daemon = PrivateDockerd()
    daemon.start()
    try:
        daemon.load_images(image)
        yield daemon
    finally:
        daemon.remove()


def test_five_daemon_restarts_in_a_row_give_no_game_up(rtm_env, stub_images, tmp_path, unique):
    with private_daemon("galaxy/engine-stub:1.0") as daemon:
        _five_restarts(daemon, rtm_env, tmp_path, unique)


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


def test_five_daemon_restarts_with_engines_deaf_to_sigterm_give_no_game_up(rtm_env, stub_images, tmp_path,
                                                                           unique):
    """Engines whose PID 1 does not exit on SIGTERM (galaxy/engine-stub:termdeaf): a stopping dockerd
    SIGKILLs each of them after its stop timeout, so every exit is 137, late in the daemon's shutdown,
    while dockerd still answers on the connections it has. That is still the daemon's doing: three
    games, the default crash limit (5), five restarts, and no game is given up. Then a real crash
    (the engine exits 3 by itself) and a kill -9 from outside, with no daemon restart, still count.

    dockerd gives each container its own stop timeout (10 s; rtmanager sets none) before the SIGKILL,
    whatever daemon.json's shutdown-timeout says. rtmanager sets it from the engine version's
    stop_grace: the termdeaf image is registered with 3 s, so each SIGKILL still comes late in the
    daemon's shutdown, and a restart takes about 4 s instead of 11 (the default 10 s)."""
    with private_daemon("galaxy/engine-stub:termdeaf") as daemon:
        _five_deaf_restarts(daemon, rtm_env, tmp_path, unique)


def _five_deaf_restarts(daemon: PrivateDockerd, rtm_env, tmp_path, unique) -> None:
    image = "galaxy/engine-stub:termdeaf"
    env = {**rtm_env, "RTMANAGER_RESYNC_INTERVAL": "1", "DOCKER_HOST": daemon.host}
    env.pop("RTMANAGER_CRASH_LIMIT", None)  # the default limit: five counted restarts give a game up
    migrate(env)
    out = cli(env, "versions", "add", "deaf", image, "--stop-grace", "3")  # the containers' stop timeout
    assert out.returncode == 0, out.stderr
    games = [f"dd-{unique}-{i}" for i in range(3)]
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()

    def containers(game: str):
        client = daemon.client(timeout=10)
        try:
            return client.containers.list(all=True, filters={"label": f"com.galaxy.game-id={game}"})
        finally:
            client.close()

    async def records():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return {r["game_id"]: dict(r) for r in await conn.fetch(
                "SELECT game_id, status, desired_status, crash_count, last_error_code FROM runtime_records")}
        finally:
            await conn.close()

    def all_running() -> bool:
        recs = asyncio.run(records())
        return all(any(c.status == "running" for c in containers(g)) and recs[g]["status"] == "running"
                   and recs[g]["desired_status"] == "running" for g in games)

    def detail() -> str:
        return f"records: {asyncio.run(records())}\nlog: {ctl.log()[-3000:]}"

    try:
        for g in games:
            entry = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": image})
            assert reader.for_entry(entry, timeout=60)["outcome"] == "success"
            assert [c.attrs["Config"].get("StopTimeout") for c in containers(g)] == [3]
        for n in range(5):
            daemon.restart()
            wait_for(f"restart {n + 1}: every game running again", all_running, timeout=60, detail=detail)
        recs = asyncio.run(records())
        for g in games:
            assert recs[g]["desired_status"] == "running" and recs[g]["crash_count"] == 0, recs[g]
        # Every exit was a SIGKILL from the stopping daemon, not the engine's own.
        for g in games:
            assert (Path(env["RTMANAGER_STATE_ROOT"]) / g / "events").read_text().count("sigterm-ignored") >= 5

        # A real crash still counts: the engine exits 3 by itself, the daemon stays up.
        control = Path(env["RTMANAGER_STATE_ROOT"]) / games[0] / "stub-control"
        control.mkdir(exist_ok=True)
        (control / "exit").write_text("3")
        wait_for("the engine's own exit counted as a crash",
                 lambda: asyncio.run(records())[games[0]]["crash_count"] >= 1, timeout=30, detail=detail)
        (control / "exit").unlink()
        # ... and so does a kill -9 from outside.
        next(c for c in containers(games[1]) if c.status == "running").kill()
        wait_for("a kill -9 from outside counted as a crash",
                 lambda: asyncio.run(records())[games[1]]["crash_count"] >= 1, timeout=30, detail=detail)
        wait_for("every game running again after the crashes", all_running, timeout=60, detail=detail)
        assert asyncio.run(records())[games[2]]["crash_count"] == 0
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()


def test_with_live_restore_a_daemon_restart_leaves_the_engines_running(rtm_env, stub_images, tmp_path, unique):
    """What the README asks of a game host: with "live-restore" a dockerd restart stops nothing, and
    rtmanager finds the engine as it was: the same container, one boot, no crash, no restart."""
    daemon = PrivateDockerd()
    (daemon.run_dir / "daemon.json").write_text('{"live-restore": true}\n')
    daemon.start()
    daemon.load_images("galaxy/engine-stub:termdeaf")
    env = {**rtm_env, "RTMANAGER_RESYNC_INTERVAL": "1", "DOCKER_HOST": daemon.host}
    game = f"lr-{unique}"
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = None
    try:
        migrate(env)
        ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
        entry = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": "galaxy/engine-stub:termdeaf"})
        first = reader.for_entry(entry, timeout=60)
        assert first["outcome"] == "success"
        daemon.restart()
        entry = r.xadd(env["RTMANAGER_CONTROL_STREAM"], {"game_id": game, "op": "reconcile"})
        again = reader.for_entry(entry, timeout=60)
        assert again["outcome"] == "success" and again["container_id"] == first["container_id"], again
        client = daemon.client(timeout=10)
        try:
            assert client.containers.get(first["container_id"]).status == "running"
        finally:
            client.close()
        boots = (Path(env["RTMANAGER_STATE_ROOT"]) / game / "boots").read_text().splitlines()
        assert len(boots) == 1, boots
        assert "engine crashed" not in ctl.log() and "stopped by a restart" not in ctl.log()
    finally:
        if ctl is not None:
            assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()
        daemon.remove()


def test_a_daemon_restart_while_rtmanager_was_down_is_not_a_crash_and_a_crash_then_is(rtm_env, stub_images,
                                                                                     tmp_path, unique):
    """A restart nobody saw: rtmanager is stopped, dockerd restarted, rtmanager started again. No
    gap was seen, and the event stream came after the exits; no engine outlived them (none survives
    a restart without live-restore), so they are the daemon's: no crash. Then, rtmanager down again,
    one engine exits 3 by itself while the other runs on: the older engine that outlived the exit
    proves the daemon stayed, and the exit counts as a crash."""
    daemon = PrivateDockerd()
    daemon.start()
    daemon.load_images("galaxy/engine-stub:1.0")
    env = {**rtm_env, "RTMANAGER_RESYNC_INTERVAL": "1", "DOCKER_HOST": daemon.host}
    games = [f"nb-{unique}-{i}" for i in range(2)]
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    reader = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    ctl = None

    async def records():
        conn = await asyncpg.connect(env["RTMANAGER_DATABASE_URL"])
        try:
            return {r["game_id"]: dict(r) for r in await conn.fetch(
                "SELECT game_id, status, crash_count, current_container_id FROM runtime_records")}
        finally:
            await conn.close()

    def state(game: str) -> str:
        client = daemon.client(timeout=10)
        try:
            return client.containers.get(f"galaxy-game-{game}").status
        finally:
            client.close()

    def detail() -> str:
        return f"records: {asyncio.run(records())}\nlog: {ctl.log()[-3000:] if ctl else ''}"

    def all_running() -> bool:
        recs = asyncio.run(records())
        return all(state(g) == "running" and recs[g]["status"] == "running" for g in games)

    try:
        migrate(env)
        ctl = ControllerProcess(env, tmp_path / "rtmanager-1.log").start()
        for g in games:
            entry = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": "galaxy/engine-stub:1.0"})
            assert reader.for_entry(entry, timeout=60)["outcome"] == "success"
        assert ctl.stop() == 0, ctl.log()[-3000:]
        daemon.restart()
        assert all(state(g) == "exited" for g in games)
        ctl = ControllerProcess(env, tmp_path / "rtmanager-2.log").start()
        wait_for("every game running again", all_running, timeout=60, detail=detail)
        assert all(rec["crash_count"] == 0 for rec in asyncio.run(records()).values()), detail()
        assert "stopped by a restart of the container daemon" in ctl.log()

        assert ctl.stop() == 0, ctl.log()[-3000:]
        control = Path(env["RTMANAGER_STATE_ROOT"]) / games[0] / "stub-control"
        control.mkdir(exist_ok=True)
        (control / "exit").write_text("3")
        wait_for("the engine exited by itself", lambda: state(games[0]) == "exited", timeout=30)
        (control / "exit").unlink()
        assert state(games[1]) == "running"
        ctl = ControllerProcess(env, tmp_path / "rtmanager-3.log").start()
        wait_for("the exit counted as a crash", lambda: asyncio.run(records())[games[0]]["crash_count"] == 1,
                 timeout=30, detail=detail)
        wait_for("every game running again after the crash", all_running, timeout=60, detail=detail)
        assert asyncio.run(records())[games[1]]["crash_count"] == 0
    finally:
        if ctl is not None:
            assert ctl.stop() == 0, ctl.log()[-3000:]
        r.close()
        reader.close()
        daemon.remove()
