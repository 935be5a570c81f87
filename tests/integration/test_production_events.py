"""Ordinary production events that once lost a job's effect or hurt a healthy game.

Each test reproduces one defect found by an acceptance run against the contract
only (a backlog larger than one read, a failed patch, SIGKILL on restart, hostile
bytes from an engine, an odd HTTP header, an overdue cleanup, a flood of /readyz,
an engine streaming an endless health answer), on real Postgres, Redis and Docker.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from observed.engine import EngineClient
from tests.support import eventually
from tests.support.api import STUB_10, STUB_11
from tests.support.http import serve_local


async def record(api, game: str) -> dict:
    status, body = await api.get(f"/api/v1/runtimes/{game}")
    assert status == 200, body
    return body


def running_ids(api, game: str) -> list[str]:
    return [c.id for c in api.containers(game) if c.status == "running"]


# --------------------------------------------------------------- defect 1: order across a long backlog
async def test_a_later_stop_never_overtakes_an_earlier_start_behind_a_long_backlog(api):
    """110 starts of one game, then a start and a stop of another, all queued before the
    controller starts: XREADGROUP's COUNT is per stream, so a naive read returns the stop
    before the start it follows."""
    starts, stops = api.env["RTMANAGER_START_STREAM"], api.env["RTMANAGER_STOP_STREAM"]
    for _ in range(110):
        await api.redis.xadd(starts, {"game_id": "filler", "image_ref": STUB_10})
    start_id = await api.redis.xadd(starts, {"game_id": "target", "image_ref": STUB_10})
    stop_id = await api.redis.xadd(stops, {"game_id": "target", "reason": "cancelled"})
    await api.start()
    stop_res = await api.result(stop_id, "stop", timeout=60)
    start_res = await api.result(start_id, "start", timeout=5)
    assert stop_res["error_code"] != "replay_no_op", stop_res  # the stop knew the game
    assert api.results.index(start_res) < api.results.index(stop_res)
    rec = await record(api, "target")
    assert rec["desired_status"] == "stopped" and rec["status"] == "stopped", rec
    assert running_ids(api, "target") == []


async def test_a_stop_delivered_early_is_not_applied_before_its_start_when_the_round_is_cut(api, database_url):
    """Issue 21: the first read of a round takes 100 entries of each stream, so the stop, far
    behind its start, is delivered with the oldest starts. A Postgres statement timeout (here a
    table lock held past it) cuts the round; the pending pass must not apply that stop before the
    start it never read (it was answered replay_no_op, and the start then ran the game for good)."""
    admin = await asyncpg.connect(database_url)
    try:
        db = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{db}" SET statement_timeout = \'2s\'')  # the controller's sessions
        ctl = await api.start()
        await eventually(lambda: ctl.is_leader and ctl.intake.healthy, 30, "leading, the intake reading")
        await admin.execute("SET statement_timeout = 0")
        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE runtime_operations IN ACCESS EXCLUSIVE MODE")
        starts, stops = api.env["RTMANAGER_START_STREAM"], api.env["RTMANAGER_STOP_STREAM"]
        refused = {"image_ref": "refused/engine:1.0"}
        async with api.redis.pipeline(transaction=True) as pipe:  # all at once, as a backlog
            for i in range(250):
                pipe.xadd(starts, {"game_id": f"early{i}", **refused})
            pipe.xadd(starts, {"game_id": "target", "image_ref": STUB_10})
            for i in range(49):
                pipe.xadd(starts, {"game_id": f"late{i}", **refused})
            pipe.xadd(stops, {"game_id": "target", "reason": "cancelled"})
            ids = await pipe.execute()
        start_id, stop_id = ids[250], ids[-1]
        group = api.env["RTMANAGER_CONSUMER_GROUP"]

        async def round_cut_with_the_stop_delivered():
            pending = await api.redis.xpending(stops, group)
            return pending["pending"] == 1 and not ctl.intake.healthy  # healthy again only after an outage

        await eventually(round_cut_with_the_stop_delivered, 30, "the stop delivered and the round cut by a timeout")
        await lock.rollback()
    finally:
        await admin.close()
    stop_res = await api.result(stop_id, "stop", timeout=90)
    start_res = await api.result(start_id, "start", timeout=5)
    assert stop_res["error_code"] != "replay_no_op", stop_res  # the stop knew the game
    assert stop_res["outcome"] == "success", stop_res
    assert api.results.index(start_res) < api.results.index(stop_res)
    rec = await record(api, "target")
    assert rec["desired_status"] == "stopped" and rec["status"] == "stopped", rec
    assert running_ids(api, "target") == []
    answered = {r["job_entry_id"] for r in api.results}
    assert set(ids) <= answered  # every entry answered


# --------------------------------------------------------------- defect 2: a failed patch keeps the game
@pytest.mark.parametrize("bad_image, code", [
    ("galaxy/engine-stub:does-not-exist", "image_unavailable"),   # the pull fails: nothing is touched
    ("galaxy/engine-stub:mute", "engine_unhealthy"),               # the new engine never answers
    ("galaxy/engine-stub:crash", "container_start_failed"),        # the new engine exits at once
])
async def test_a_failed_patch_leaves_the_game_running_on_its_old_image(api, bad_image, code):
    await api.start(start_timeout="3")
    game = "pf1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    before = running_ids(api, game)
    state = Path(api.env["RTMANAGER_STATE_ROOT"]) / game
    (state / "precious").write_text("keep me")

    status, res = await api.job(game, "patch", {"image_ref": bad_image}, wait=60)
    assert res["outcome"] == "failure" and res["error_code"] == code, res
    assert "rolled back" in res["error_message"] or code == "image_unavailable", res

    async def back_on_old_image():
        rec = await record(api, game)
        ok = (rec["status"] == "running" and rec["desired_status"] == "running"
              and rec["current_image_ref"] == STUB_10 and rec["desired_image_ref"] == STUB_10
              and rec["observed_generation"] == rec["generation"])
        return rec if ok else None

    await eventually(back_on_old_image, 30, "the game running again on its old image")
    now_running = running_ids(api, game)
    assert len(now_running) == 1 and api.containers(game)[0].image.tags == [STUB_10]
    if code == "image_unavailable":
        assert now_running == before  # pulled before anything was touched
    assert (state / "precious").read_text() == "keep me"
    _, ops = await api.get(f"/api/v1/runtimes/{game}/operations")
    if code != "image_unavailable":
        assert any(o["op"] == "patch" and o["source"] == "reconciler" and o["params"].get("event") == "rollback"
                   for o in ops["operations"]), ops
    # and a later good patch still works
    status, res = await api.job(game, "patch", {"image_ref": STUB_11})
    assert res["outcome"] == "success", res


# --------------------------------------------------------------- defect 3: graceful stop on every path
@pytest.mark.parametrize("kind, body", [("stop", None), ("restart", None), ("patch", {"image_ref": STUB_11})])
async def test_every_path_that_takes_an_engine_down_sends_sigterm_first(api, kind, body):
    await api.start(stop_grace="5")
    game = f"term-{kind}"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    events = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "events"
    assert "sigterm" not in events.read_text()
    status, res = await api.job(game, kind, body)
    assert res["outcome"] == "success", res
    assert "sigterm" in events.read_text(), events.read_text()


# --------------------------------------------------------------- defect 4: hostile bytes from an engine
async def test_a_nul_byte_in_an_engines_last_words_does_not_stall_its_start(api):
    await api.start(start_timeout="5")
    t0 = time.monotonic()
    status, res = await api.job("nul1", "start", {"image_ref": "galaxy/engine-stub:nulcrash"}, wait=30)
    assert status == 200 and res["outcome"] == "failure", res
    assert res["error_code"] == "container_start_failed", res
    assert "\x00" not in res["error_message"] and "boom" in res["error_message"], res
    assert time.monotonic() - t0 < 15


async def test_a_nul_byte_in_a_running_engines_crash_is_recorded_and_the_game_restarted(api):
    await api.start()
    game = "nul2"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    first = running_ids(api, game)
    control = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "stub-control"
    control.mkdir(exist_ok=True)
    (control / "exit-message").write_bytes(b"boom\x00tail \xff\xfe\n")
    (control / "exit").write_text("7")

    async def crashed():
        rec = await record(api, game)
        return rec if rec["crash_count"] >= 1 and rec["last_exit_code"] == 7 else None

    rec = await eventually(crashed, 20, "the crash recorded")
    assert "\x00" not in (rec["last_error_message"] or "")
    (control / "exit").unlink()

    boots = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "boots"

    async def restarted():
        rec = await record(api, game)
        return (running_ids(api, game) == first and rec["status"] == "running" and rec["health"] == "healthy"
                and len(boots.read_text().splitlines()) >= 2)

    await eventually(restarted, 30, "the game restarted in place")


# --------------------------------------------------------------- defect 7: a non-UTF-8 header
async def test_a_non_utf8_authorization_header_is_401_not_500(api):
    await api.start()

    def raw_request() -> bytes:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
            s.sendall(b"GET /api/v1/runtimes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    answer = await asyncio.to_thread(raw_request)
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"401", answer[:200]


# --------------------------------------------------------------- also in scope
async def test_an_overdue_cleanup_does_not_reverse_a_removal(api, database_url, monkeypatch):
    """A cleanup whose Docker calls keep failing past the job timeout is answered, and the
    game stays on its way to removal (removal is final once asked for)."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # Docker away for good
    await api.start(job_timeout="1")
    game = "od1"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO runtime_records (game_id, status, current_image_ref, engine_endpoint, state_path,"
            " docker_network, stopped_at, started_at, last_op_at, created_at, desired_status, desired_image_ref,"
            " generation, observed_generation) VALUES ($1, 'stopped', $2, 'http://galaxy-game-od1:8080', $3,"
            " 'n', now(), now(), now(), now(), 'stopped', $2, 1, 1)",
            game, STUB_10, str(Path(api.env["RTMANAGER_STATE_ROOT"]) / game))
    finally:
        await conn.close()
    status, res = await api.job(game, "cleanup", wait=30)
    assert res["outcome"] == "failure" and res["error_code"] == "docker_unavailable", res
    rec = await record(api, game)
    assert rec["desired_status"] == "removed", rec
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["error_code"] == "invalid_request", res


async def test_a_flood_of_readyz_does_not_cost_the_leader_its_lease(api, database_url):
    ctl = await api.start(lease_ttl="2")
    epoch = ctl.fence.epoch
    stop_at = time.monotonic() + 8  # four lease terms
    answered = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def hammer() -> None:
        while time.monotonic() < stop_at:
            async with session.get(f"{api.base}/readyz") as resp:
                await resp.read()
                answered.append(resp.status)

    try:
        await asyncio.gather(*(hammer() for _ in range(500)))
    finally:
        await session.close()
    assert ctl.is_leader and ctl.fence.epoch == epoch, "the leader lost its lease under the flood"
    assert answered and set(answered) == {200}, set(answered)
    # the answers came from a cache: far fewer Docker pings than requests
    assert ctl.readiness_probes < len(answered) / 20, (ctl.readiness_probes, len(answered))


async def test_the_health_probe_reads_a_bounded_answer():
    """An engine that streams an endless body must not grow the controller."""
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            while True:
                await resp.write(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    runner, port = await serve_local("/healthz", endless)
    probe = EngineClient(port=port, path="/healthz", attempt_timeout=5)
    try:
        t0 = time.monotonic()
        ok, detail = await probe.check("127.0.0.1")
        assert time.monotonic() - t0 < 2, detail
        assert ok, detail  # a 2xx is a 2xx; the body is not read to its end
    finally:
        await probe.close()
        await runner.cleanup()
