"""A drain of a Swarm node while turns run, on a two-node swarm sharing the state root (conftest): every game on
the worker is moved to the manager, max_parallel at a time, each between two turns (its unit replaced by one
constrained away from the worker; the stub records a cut generation as "interrupted <turn>"), and
keeps its turn (the state root is the same directory on both nodes here: RTMANAGER_STATE_SHARED=1);
no new game lands on the drained node; undrain puts the node back in use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import eventually
from tests.support.api import FAST, STUB_10, Api, control, events, runtime
from tests.swarm.nodes import task_node

GENERATION = 1  # seconds a generation takes
# Seconds the worker's generations take once the drain comes: its moves have to wait. Longer than Swarm
# takes to stop a task after a scale-down (seconds), so that a move that did not wait would cut the turn.
LONG = 10


@pytest.fixture
async def api(shared2, rtm_env, docker_client, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", shared2.manager.host)  # the backend's client follows DOCKER_HOST
    a = Api({**rtm_env, "RTMANAGER_BACKEND": "swarm", "RTMANAGER_PROBE_ADDRESS": "published",
             "RTMANAGER_STATE_SHARED": "1"}, docker_client)
    try:
        yield a
    finally:
        try:
            await a.stop_all()
        finally:
            await a.close()


def engine_state(api, game: str) -> dict:
    return json.loads((Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "engine" / "status.json").read_text())


async def test_a_drained_node_moves_its_games_between_turns_and_undrain_puts_it_back_in_use(shared2, api):
    manager, worker = shared2.manager.node_id, shared2.nodes[1].node_id
    client = shared2.manager_client()
    try:
        ctl = await api.start(stop_grace="2", **FAST)
        ctl.backend.start_wait = 20
        games = [f"sd-{i}" for i in range(4)]
        for g in games:  # one after the other: Swarm spreads them over the two nodes
            status, res = await api.job(g, "start", {"image_ref": STUB_10, "turn_interval": 1}, wait=90)
            assert res["outcome"] == "success", res
            control(api, g, "generation_seconds", str(GENERATION))
        placed = {g: task_node(client, g) for g in games}
        on_worker = [g for g in games if placed[g] == worker]
        assert on_worker and len(on_worker) < len(games), placed

        async def turning(g: str) -> bool:
            return ((await runtime(api, g))["turn"] or 0) >= 1

        long_from = {}
        for g in on_worker:
            await eventually(lambda g=g: turning(g), 60, f"{g}: turns running")
            control(api, g, "generation_seconds", str(LONG))  # read by each generation from now on
            long_from[g] = engine_state(api, g)["turn"] + 2    # (the one under way may be a short one)

        async def generating_long(g: str) -> bool:
            st = engine_state(api, g)
            return st["phase"] == "generating" and st["turn"] + 1 >= long_from[g] and \
                (await runtime(api, g))["status"] == "generation_in_progress"

        for g in on_worker:  # the drain comes in the middle of a long generation
            await eventually(lambda g=g: generating_long(g), 30, f"{g}: generating a long turn")
        status, body, _ = await api.request("POST", "/api/v1/drains", json={"node": worker, "local_state": "x"})
        assert status == 400 and "field local_state" in body["error"], body
        status, drain, _ = await api.request("POST", "/api/v1/drains",
                                             json={"node": worker, "max_parallel": 2, "deadline": 300})
        assert status == 201 and drain["target"] == worker, drain
        turns_before = {g: engine_state(api, g)["turn"] for g in on_worker}

        async def drained() -> dict | None:
            _, body = await api.get(f"/api/v1/drains/{drain['id']}")
            return body if body["status"] == "drained" else None

        done = await eventually(drained, 120, "the worker drained")
        assert sorted(g["game_id"] for g in done["games"]) == sorted(on_worker), done
        for g in done["games"]:
            assert g["action"] == "move" and g["state"] == "done" and g["to_node"] == manager, done
        for g in on_worker:
            rec = await runtime(api, g)
            assert rec["node_id"] == manager and task_node(client, g) == manager, rec
            place = client.api.inspect_service(f"galaxy-game-{g}")["Spec"]["TaskTemplate"]["Placement"]
            # Pinned where it runs now (the node chosen at its creation), and kept off the drained node.
            assert sorted(place["Constraints"]) == sorted([f"node.id!={worker}", f"node.id=={manager}"]), place
            ev = events(api, g)
            assert ev.count("boot") == 2 and "interrupted" not in ev, (g, ev)  # moved between turns
            assert engine_state(api, g)["turn"] >= turns_before[g], g  # its state went with it

        # While the worker is drained, a new game goes to the manager.
        status, res = await api.job("sd-new", "start", {"image_ref": STUB_10}, wait=90)
        assert res["outcome"] == "success" and task_node(client, "sd-new") == manager, res

        status, body, _ = await api.request("POST", f"/api/v1/drains/{drain['id']}/undrain")
        assert status == 200, body

        async def undrained() -> bool:
            _, body = await api.get(f"/api/v1/drains/{drain['id']}")
            return body["status"] == "undrained"

        await eventually(undrained, 30, "the drain undrained")
        # The worker is empty and in use again: Swarm spreads the next game there.
        status, res = await api.job("sd-back", "start", {"image_ref": STUB_10}, wait=90)
        assert res["outcome"] == "success" and task_node(client, "sd-back") == worker, res
    finally:
        client.close()
