"""A drain of the Docker host, on real Docker with the stub engine while turns run: every game is stopped
at a turn boundary (the stub records a cut generation as "interrupted <turn>" in its events file),
max_parallel at a time, across a restart of the controller (the drain is rows, not memory); a new
start is refused with host_drained; undrain starts the games it stopped again as they were (image,
schedule, pause), except one stopped by another job meanwhile, and the host takes new games again."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import eventually
from tests.support.api import FAST, STUB_10, control, events, runtime

GENERATION = 3  # seconds each generation takes: the drain's stops have to wait for them


async def drain_of(api, drain_id: int) -> dict:
    status, body = await api.get(f"/api/v1/drains/{drain_id}")
    assert status == 200, body
    return body


async def test_a_host_drain_stops_every_game_at_a_turn_boundary_and_undrain_brings_them_back(api):
    await api.start(**FAST)
    games = ["dr-a", "dr-b", "dr-c"]
    for g in games:
        status, res = await api.job(g, "start", {"image_ref": STUB_10, "turn_interval": 1}, wait=60)
        assert res["outcome"] == "success", res
        control(api, g, "generation_seconds", str(GENERATION))
    status, res = await api.job("dr-a", "pause", wait=30)
    assert res["outcome"] == "success", res

    async def turning(g: str) -> bool:
        body = await runtime(api, g)
        return (body["turn"] or 0) >= 1 and body["status"] == "generation_in_progress"

    for g in ("dr-b", "dr-c"):
        await eventually(lambda g=g: turning(g), 30, f"{g}: turns running")

    # Bad requests name their field; the Docker backend drains its host.
    status, body, _ = await api.request("POST", "/api/v1/drains", json={"node": "abc"})
    assert status == 400 and "field node" in body["error"], body
    status, body, _ = await api.request("POST", "/api/v1/drains", json={"host": True, "max_parallel": 0})
    assert status == 400 and "field max_parallel" in body["error"], body
    status, body, _ = await api.request("POST", "/api/v1/drains", json={"host": True}, auth=False)
    assert status == 401, body

    status, drain, _ = await api.request("POST", "/api/v1/drains",
                                         json={"host": True, "max_parallel": 2, "deadline": 120})
    assert status == 201 and drain["status"] == "draining" and drain["target"] == "host", drain
    status, again, _ = await api.request("POST", "/api/v1/drains", json={"host": True})
    assert status == 409 and f"drain {drain['id']}" in again["error"], again
    # New starts are refused while the host is drained.
    status, res = await api.job("dr-new", "start", {"image_ref": STUB_10}, wait=30)
    assert res["outcome"] == "failure" and res["error_code"] == "host_drained", res

    async def taken(n: int) -> dict | None:
        body = await drain_of(api, drain["id"])
        return body if len(body["games"]) >= n else None

    await eventually(lambda: taken(1), 30, "the drain taking games")
    # The controller stops and another one takes over: the drain goes on from its rows.
    await api.stop_all()
    api.port = 0
    await api.start(**FAST)

    async def drained() -> dict | None:
        body = await drain_of(api, drain["id"])
        return body if body["status"] == "drained" else None

    done = await eventually(drained, 90, "the host drained")
    assert sorted(g["game_id"] for g in done["games"]) == games, done
    assert all(g["action"] == "stop" and g["state"] == "done" for g in done["games"]), done
    # Taken in order: the paused (idle) game first, then the generating ones; never more than 2 in flight.
    taken_order = sorted(done["games"], key=lambda g: g["taken_at"])
    assert taken_order[0]["game_id"] == "dr-a", taken_order
    assert taken_order[2]["taken_at"] >= min(g["done_at"] for g in taken_order[:2]), taken_order
    for g in games:
        body = await runtime(api, g)
        assert body["status"] == "stopped" and body["desired_status"] == "stopped", body
        ev = events(api, g)
        assert "sigterm" in ev and "interrupted" not in ev, (g, ev)  # stopped between turns, not in one
        st = json.loads((Path(api.env["RTMANAGER_STATE_ROOT"]) / g / "engine" / "status.json").read_text())
        assert st["phase"] == "idle", (g, st)

    async def metrics() -> str | None:
        _, text = await api.get("/metrics")
        return text if 'rtmanager_drains{status="drained"} 1.0' in text else None

    text = await eventually(metrics, 10, "the drained drain in the metrics")
    assert 'rtmanager_drain_actions_total{action="stop",forced="false"}' in text, text

    # Another job stops dr-c after the drain did: undrain does not bring it back.
    status, res = await api.job("dr-c", "stop", {"reason": "cancelled"}, wait=30)
    assert res["outcome"] == "success", res
    status, listed = await api.get("/api/v1/drains")
    assert status == 200 and listed["drains"][0]["id"] == drain["id"], listed

    status, body, _ = await api.request("POST", f"/api/v1/drains/{drain['id']}/undrain")
    assert status == 200 and body["status"] in ("undraining", "undrained"), body

    async def undrained() -> dict | None:
        body = await drain_of(api, drain["id"])
        return body if body["status"] == "undrained" else None

    over = await eventually(undrained, 30, "the drain undrained")
    states = {g["game_id"]: g["state"] for g in over["games"]}
    assert states == {"dr-a": "restored", "dr-b": "restored", "dr-c": "skipped"}, over

    async def up_again(g: str) -> dict | None:
        body = await runtime(api, g)
        return body if body["status"] in ("running", "generation_in_progress") else None

    a = await eventually(lambda: up_again("dr-a"), 60, "dr-a running again")
    b = await eventually(lambda: up_again("dr-b"), 60, "dr-b running again")
    assert a["paused"] is True and a["turn_interval"] == 1 and a["current_image_ref"] == STUB_10, a
    assert b["paused"] is False and b["turn_interval"] == 1 and b["current_image_ref"] == STUB_10, b
    assert (await runtime(api, "dr-c"))["status"] == "stopped"
    status, res = await api.job("dr-new", "start", {"image_ref": STUB_10}, wait=60)
    assert res["outcome"] == "success", res
