"""The engine's own word on real Docker: unreachable and recovered, crash loops, finished games,
engines without an admin API, and the snapshots Lobby hears about each (stub engine fault modes)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from tests.support import eventually
from tests.support.api import STUB_10, control, snapshots

ADMIN = "/cgi-bin/admin/v1"
FAST = dict(engine_admin_path=ADMIN, health_interval="0.3", unreachable_after="2", resync_interval="1")


async def status_of(api, game: str) -> str:
    _, body = await api.get(f"/api/v1/runtimes/{game}")
    return body.get("status", "")


def assert_revisions_increase(snaps: list[dict[str, str]]) -> None:
    revisions = [int(s["revision"]) for s in snaps]
    assert revisions == sorted(set(revisions)), revisions
    assert len({s["snapshot_id"] for s in snaps}) == len(snaps)


async def test_an_engine_that_stops_answering_is_unreachable_then_recovered(api):
    await api.start(**FAST)
    game = "unr1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    mute = control(api, game, "mute")

    async def reasons():
        return [s["reason"] for s in await snapshots(api, game)]

    await eventually(lambda: _has(reasons, "engine_unreachable"), what="engine_unreachable snapshot")
    assert await status_of(api, game) == "engine_unreachable"
    mute.unlink()
    await eventually(lambda: _has(reasons, "recovered"), what="recovered snapshot")
    assert await status_of(api, game) == "running"
    snaps = await snapshots(api, game)
    assert_revisions_increase(snaps)
    unreachable = next(s for s in snaps if s["reason"] == "engine_unreachable")
    assert unreachable["status"] == "engine_unreachable" and unreachable["previous_status"] == "running"
    assert unreachable["error_code"] == "engine_unreachable" and unreachable["exit_code"] == ""
    recovered = next(s for s in snaps if s["reason"] == "recovered")
    assert recovered["previous_status"] == "engine_unreachable"
    assert all(set(s) == set(json.loads(json.dumps(s))) for s in snaps)


async def _has(reasons, reason: str) -> bool:
    return reason in await reasons()


async def test_a_crash_looping_game_publishes_crashed_snapshots_and_one_crash_loop(api):
    await api.start(crash_limit="3", **FAST)
    game = "loop1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    control(api, game, "exit-message", "dying again")
    control(api, game, "exit", "9")

    async def given_up():
        snaps = await snapshots(api, game)
        return snaps if any(s["reason"] == "stopped" for s in snaps) else None

    snaps = await eventually(given_up, 40, "crash loop given up and stopped")
    reasons = [s["reason"] for s in snaps]
    assert reasons.count("crash_loop") == 1 and reasons.count("crashed") >= 2, reasons
    loop = next(s for s in snaps if s["reason"] == "crash_loop")
    assert loop["desired_status"] == "stopped" and loop["exit_code"] == "9" and "crash loop" in loop["error_message"]
    assert_revisions_increase(snaps)


async def test_a_finishing_engine_publishes_finished_and_refuses_a_restart(api, docker_client):
    await api.start(**FAST)
    game = "fin1"
    status, res = await api.job(game, "start", {"image_ref": "galaxy/engine-stub:finish3"})
    assert res["outcome"] == "success", res
    control(api, game, "generation_seconds", "0.1")
    [c] = api.containers(game)
    ip = c.attrs["NetworkSettings"]["Networks"][api.env["RTMANAGER_DOCKER_NETWORK"]]["IPAddress"]
    # The engine takes admin calls only with its token (it is in its environment).
    token = next(e.split("=", 1)[1] for e in c.attrs["Config"]["Env"] if e.startswith("ENGINE_ADMIN_TOKEN="))
    for turn in range(3):  # the turns Lobby's scheduler would ask for (straight to the engine here)
        await asyncio.to_thread(_post_turn, ip, turn, token)
        await eventually(lambda turn=turn: _engine_turn(ip, turn + 1, token), 10, f"turn {turn + 1}")
    await eventually(lambda: _status_is(api, game, "finished"), what="finished")

    async def finished_published():  # the relay publishes after the commit the status is read from
        snaps = await snapshots(api, game)
        return snaps if any(s["reason"] == "finished" for s in snaps) else None

    snaps = await eventually(finished_published, what="the finished snapshot published")
    finished = [s for s in snaps if s["reason"] == "finished"]
    assert len(finished) == 1 and finished[0]["turn"] == "3"
    status, res = await api.job(game, "restart")
    assert res["error_code"] == "invalid_request" and "finished" in res["error_message"], res
    status, res = await api.job(game, "stop", {"reason": "finished"})
    assert res["outcome"] == "success", res


async def _status_is(api, game: str, status: str) -> bool:
    return await status_of(api, game) == status


def _post_turn(ip: str, expected: int, token: str) -> None:
    req = urllib.request.Request(f"http://{ip}:8080{ADMIN}/turns", data=json.dumps(
        {"expected_turn": expected}).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 202


async def _engine_turn(ip: str, turn: int, token: str) -> bool:
    def get():
        req = urllib.request.Request(f"http://{ip}:8080{ADMIN}/status", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = json.load(resp)
        return body["turn"] >= turn and body["phase"] != "generating"
    return await asyncio.to_thread(get)


async def test_an_engine_without_admin_api_starts_stops_and_reports_as_before(api):
    await api.start(**FAST)
    game = "plain1"
    status, res = await api.job(game, "start", {"image_ref": "galaxy/engine-stub:plain"})
    assert res["outcome"] == "success", res

    async def probed():
        _, body = await api.get(f"/api/v1/runtimes/{game}")
        return body if body["admin_api"] is False else None

    body = await eventually(probed, what="its admin API found missing")
    assert body["status"] == "running" and body["turn"] is None
    status, res = await api.job(game, "stop")
    assert res["outcome"] == "success", res

    async def stopped_published():  # the REST answer is read from the database; the relay publishes after
        reasons = [s["reason"] for s in await snapshots(api, game)]
        return reasons if reasons and reasons[-1] == "stopped" else None

    reasons = await eventually(stopped_published, what="the stopped snapshot published")
    assert "started" in reasons


async def test_a_snapshot_resync_publishes_every_live_game_with_a_new_revision(api):
    ctl = await api.start(**FAST)
    for game in ("rs1", "rs2"):
        status, res = await api.job(game, "start", {"image_ref": STUB_10})
        assert res["outcome"] == "success", res

    async def published() -> dict[str, int] | None:
        # Every committed snapshot is on the stream (a result can be answered before the relay has
        # published a snapshot committed with it): the revisions the resync must follow.
        got = {g: max((int(s["revision"]) for s in await snapshots(api, g)), default=0) for g in ("rs1", "rs2")}
        committed = {g: (await ctl.store.get(g)).snapshot_revision for g in got}
        return got if got == committed else None

    before = await eventually(published, what="every committed snapshot published")
    status, body, _ = await api.request("POST", "/api/v1/snapshots/resync")
    assert status == 200 and body["snapshots"] == 2

    async def resynced():
        got = {g: [s for s in await snapshots(api, g) if s["reason"] == "resync"] for g in ("rs1", "rs2")}
        return got if all(got.values()) else None

    got = await eventually(resynced, what="resync snapshots")
    for g, snaps in got.items():
        assert int(snaps[0]["revision"]) == before[g] + 1 and snaps[0]["status"] == "running"
    status, body, _ = await api.request("POST", "/api/v1/snapshots/resync", params={"game_id": "nope"})
    assert status == 404


async def test_a_pause_on_an_unreachable_engine_is_answered_and_leaves_it_running(api):
    """Issue 21 #3: the pause waited for the engine's health, failed, rolled back to the same image,
    failed again and stopped the game."""
    await api.start(**FAST, start_timeout="1.5", unreachable_restart_after="0")
    game = "unr-pause"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    [engine] = api.containers(game)
    mute = control(api, game, "mute")
    await eventually(lambda: _status_is(api, game, "engine_unreachable"), what="engine_unreachable")
    status, res = await api.job(game, "pause")
    assert (res["outcome"], res["error_code"], res["container_id"]) == ("success", "", engine.id), res
    # Well past two health waits (the confirm, and the 'rollback' one): still the same engine, wanted running.
    deadline = asyncio.get_running_loop().time() + 4 * 1.5
    while asyncio.get_running_loop().time() < deadline:
        _, body = await api.get(f"/api/v1/runtimes/{game}")
        assert body["desired_status"] == "running" and body["status"] == "engine_unreachable", body
        engine.reload()
        assert engine.status == "running"
        await asyncio.sleep(0.3)
    assert body["paused"] is True
    mute.unlink()
    await eventually(lambda: _status_is(api, game, "running"), what="recovered")
    assert [c.id for c in api.containers(game)] == [engine.id]


async def _status_is(api, game: str, status: str) -> bool:
    return await status_of(api, game) == status
