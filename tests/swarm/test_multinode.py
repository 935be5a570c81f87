"""Two Swarm nodes on this machine, and games placed on both.

A swarm of two private dockerds, each in a network namespace of its own with a veth pair to the
host and one to the other node (tests/swarm/nodes.py): the manager and a worker. An in-process
controller (real Postgres and Redis of the test environment) runs the Swarm backend against the
manager with RTMANAGER_PROBE_ADDRESS=published: it reaches every engine at the port Swarm
published on the engine's node, at that node's address.

What is checked, with node-local state (each node has a state disk of its own, bind-mounted at the
state root in its mount namespace; the controller's host has a third): a game's state directory is
made on the node that runs it (mode 0700, the engine user's), on no other node and not where the
controller runs; games land on both nodes and are pinned to the node that first ran them (a restart
goes back there even when the other node is emptier, and so does a recreate with a new image); a
container on one node reaches an engine on the other over the overlay, by hostname; a node that
dies is not a crash loop: its games become ``node_lost`` (no crash counted, no start tried there),
a stop of such a game completes, and under RTMANAGER_NODE_LOSS=wait a game waits for its node
(its state is there) and runs there again once it is back, one engine of it.

With shared storage (every node sees the host's state root), under
RTMANAGER_NODE_LOSS=reschedule and RTMANAGER_STATE_SHARED=1: the games of a worker killed for
longer than the grace period are moved to the manager with their turn intact, and when the worker
comes back nothing of them runs there: one engine per game.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from desired.db.store import Store
from desired.model import DesiredStatus, Status
from tests.support import Harness, eventually
from tests.swarm.nodes import task_node


def harness(cluster, rtm_env, docker_client, monkeypatch, **extra: str):
    monkeypatch.setenv("DOCKER_HOST", cluster.manager.host)  # the backend's client follows DOCKER_HOST
    env = {**rtm_env, "RTMANAGER_BACKEND": "swarm", "RTMANAGER_PROBE_ADDRESS": "published",
           "RTMANAGER_HEALTH_INTERVAL": "1", "RTMANAGER_UNREACHABLE_AFTER": "2", **extra}
    return Harness(env, docker_client)


@pytest.fixture
async def h(cluster2, rtm_env, docker_client, monkeypatch):
    harness_ = harness(cluster2, rtm_env, docker_client, monkeypatch, RTMANAGER_NODE_LOSS="wait",
                       RTMANAGER_NODE_LOSS_GRACE="1")
    try:
        yield harness_
    finally:
        try:
            await harness_.stop_all()
        finally:
            await harness_.redis.aclose()


@pytest.fixture
async def hs(shared2, rtm_env, docker_client, monkeypatch):
    harness_ = harness(shared2, rtm_env, docker_client, monkeypatch, RTMANAGER_NODE_LOSS="reschedule",
                       RTMANAGER_NODE_LOSS_GRACE="3", RTMANAGER_STATE_SHARED="1",
                       RTMANAGER_ENGINE_ADMIN_PATH="/cgi-bin/admin/v1")
    try:
        yield harness_
    finally:
        try:
            await harness_.stop_all()
        finally:
            await harness_.redis.aclose()


def running_containers(node, game: str) -> list:
    c = node.client()
    try:
        return c.containers.list(filters={"label": f"com.galaxy.game-id={game}"})
    finally:
        c.close()


def running_tasks(client, game: str) -> list:
    return [t for t in client.api.tasks(filters={"service": f"galaxy-game-{game}"})
            if t["Status"]["State"] in ("running", "starting", "preparing", "assigned", "accepted", "pending")]


async def _has(reasons, reason: str) -> bool:
    return reason in await reasons


async def snapshot_reasons(h: Harness, game: str) -> list[str]:
    entries = await h.redis.xrange(h.env["RTMANAGER_SNAPSHOT_STREAM"])
    return [f["reason"] for _, f in entries if f["game_id"] == game]


async def test_games_on_two_nodes_stay_where_they_first_ran(cluster2, h, pool):
    store = Store(pool)
    manager, worker = cluster2.manager.node_id, cluster2.nodes[1].node_id
    client = cluster2.manager_client()
    try:
        ctl = await h.start(stop_grace="2")
        ctl.backend.start_wait = 10  # a restart waits this long for a node that can run it
        games = [f"mn-{i}" for i in range(4)]
        for g in games:  # one after the other: Swarm spreads them over the nodes
            res = await h.result(await h.submit_start(g))
            assert res["outcome"] == "success", res
        placed = {g: task_node(client, g) for g in games}
        assert set(placed.values()) == {manager, worker}, placed
        for g in games:
            rec = await store.get(g)
            assert rec.node_id == placed[g] and rec.current_container_id == client.api.inspect_service(
                f"galaxy-game-{g}")["ID"]
            constraints = client.api.inspect_service(f"galaxy-game-{g}")["Spec"]["TaskTemplate"]["Placement"]
            assert constraints["Constraints"] == [f"node.id=={placed[g]}"]
            # Its state directory was made on its node, and only there (not where the controller runs).
            here = cluster2.state_dirs[0 if placed[g] == manager else 1]
            other = cluster2.state_dirs[1 if placed[g] == manager else 0]
            st = os.lstat(here / g)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 10000, st
            assert not (other / g).exists() and not (Path(h.env["RTMANAGER_STATE_ROOT"]) / g).exists()
            # The engine wrote its state there (the stub keeps its status in its state directory).
            await eventually(lambda g=g, here=here: (here / g / "engine").is_dir(), timeout=10,
                             what=f"{g}'s engine writing its state on its node")

        # An engine on the worker answers a container on the manager, over the overlay, by hostname.
        on_worker = [g for g in games if placed[g] == worker]
        on_manager = [g for g in games if placed[g] == manager]
        out = client.containers.run(
            "galaxy/engine-stub:1.0", entrypoint=["/bin/busybox", "sh", "-c"], remove=True,
            command=[f'printf "GET /healthz HTTP/1.0\\r\\n\\r\\n" | nc -w 5 galaxy-game-{on_worker[0]} 8080'],
            network=h.env["RTMANAGER_DOCKER_NETWORK"])
        assert b"200 OK" in out and out.rstrip().endswith(b"ok"), out

        # Pinned: with the manager emptied, a restart of a worker's game still goes to the worker.
        moved = on_worker[0]
        for g in [*on_manager, moved]:
            assert (await h.result(await h.submit_stop(g), job="stop"))["outcome"] == "success"
        res = await h.result(await h.submit_start(moved))
        assert res["outcome"] == "success", res
        assert task_node(client, moved) == worker
        # A recreate (a new image) makes a new service, constrained from the record: the worker again.
        first = res["container_id"]
        res = await h.result(await h.submit_start(moved, "galaxy/engine-stub:1.1"))
        assert res["outcome"] == "success" and res["container_id"] != first, res
        assert task_node(client, moved) == worker and (await store.get(moved)).node_id == worker

        # The worker dies: its games are node_lost, not crashed; they cannot move (their state is on the
        # worker, RTMANAGER_NODE_LOSS=wait) and nothing is started for them anywhere.
        lost = next(g for g in on_worker if g != moved)
        service = client.api.inspect_service(f"galaxy-game-{lost}")["ID"]
        cluster2.nodes[1].stop()

        async def noticed(game):
            r = await store.get(game)
            return r if r.status is Status.NODE_LOST else None

        for g in (lost, moved):
            rec = await eventually(lambda g=g: noticed(g), timeout=60, what=f"{g}'s node noticed lost")
            assert rec.crash_count == 0 and rec.last_exit_code is None and rec.node_id == worker
            # The snapshot is published by the relay after the commit that recorded it: wait for it.
            await eventually(lambda g=g: _has(snapshot_reasons(h, g), "node_lost"), timeout=10,
                             what=f"{g}'s node_lost snapshot published")
        # A stop of such a game completes at once (nothing to wait for on a dead node).
        res = await h.result(await h.submit_stop(lost), job="stop", timeout=30)
        assert res["outcome"] == "success", res
        assert (await store.get(lost)).status is Status.STOPPED
        assert not [t for t in client.api.tasks(filters={"service": service})
                    if t["DesiredState"] in ("running", "ready")]
        for g in on_manager:
            assert (await store.get(g)).status is Status.STOPPED  # stopped above, untouched since

        # The worker comes back: its dockerd stopped the engines when it went down; nothing of the stopped
        # game runs again, and the waiting game runs again on the worker, on its state, one engine of it.
        cluster2.nodes[1].start()
        await eventually(lambda: all(n["Status"]["State"] == "ready" for n in client.api.nodes()), timeout=60,
                         what="the worker back")

        async def back():
            r = await store.get(moved)
            return r if r.status is Status.RUNNING else None

        rec = await eventually(back, timeout=60, what=f"{moved} running again")
        assert rec.node_id == worker and rec.crash_count == 0 and task_node(client, moved) == worker
        assert len(running_tasks(client, moved)) == 1 and len(running_containers(cluster2.nodes[1], moved)) == 1
        assert running_containers(cluster2.manager, moved) == []
        # On its own state: every boot of it (first start, restart, new image, after the node came back) is
        # in the one directory on the worker; the manager never had one.
        boots = (cluster2.state_dirs[1] / moved / "boots").read_text().splitlines()
        assert len(boots) >= 4, boots
        assert not (cluster2.state_dirs[0] / moved).exists()
        await eventually(lambda: not [t for t in client.api.tasks(filters={"service": service})
                                      if t["Status"]["State"] not in ("shutdown", "complete", "failed")],
                         timeout=60, what="the lost task shut down")
        assert running_containers(cluster2.nodes[1], lost) == []
    finally:
        client.close()


async def test_reschedule_moves_a_lost_workers_games_with_their_state(shared2, hs, pool):
    """RTMANAGER_NODE_LOSS=reschedule with shared storage: the worker's dockerd killed for longer than the
    grace; its game becomes node_lost (no crash), then runs on the manager with its turn intact; the
    manager's game is untouched; the worker back, one engine per game."""
    h, cluster = hs, shared2
    store = Store(pool)
    manager, worker = cluster.manager.node_id, cluster.nodes[1].node_id
    client = cluster.manager_client()
    try:
        await h.start(stop_grace="2")
        games = ["rs-0", "rs-1"]
        for g in games:  # one after the other: placed on the node with fewer engines
            res = await h.result(await h.submit_start(g))
            assert res["outcome"] == "success", res
        placed = {g: task_node(client, g) for g in games}
        assert set(placed.values()) == {manager, worker}, placed
        for g in games:  # a turn each, kept in the engine's state directory
            entry = await h.redis.xadd(h.env["RTMANAGER_CONTROL_STREAM"], {"game_id": g, "op": "force_next_turn"})
            res = await h.result(entry, job="force_next_turn")
            assert res["outcome"] == "success", res
            assert (await store.get(g)).turn == 1
        on_worker = next(g for g in games if placed[g] == worker)
        on_manager = next(g for g in games if placed[g] == manager)
        untouched = (await store.get(on_manager)).current_container_id

        cluster.nodes[1].stop()  # its dockerd and containerd, and with them its engines

        async def moved():
            r = await store.get(on_worker)
            return r if r.status is Status.RUNNING and r.node_id == manager else None

        rec = await eventually(moved, timeout=60, what=f"{on_worker} running on the manager")
        assert rec.turn == 1 and rec.crash_count == 0 and rec.avoid_nodes == (worker,), rec
        assert rec.desired_status is DesiredStatus.RUNNING
        reasons = await snapshot_reasons(h, on_worker)
        assert "node_lost" in reasons and "crashed" not in reasons and "crash_loop" not in reasons, reasons
        assert task_node(client, on_worker) == manager
        other = await store.get(on_manager)
        assert other.status is Status.RUNNING and other.current_container_id == untouched

        # The worker comes back: the moved game's old service is gone, so its agent runs nothing of it. Looked
        # at all the while it rejoins: never two engines of one game.
        cluster.nodes[1].start()

        def at_most_one_engine_each() -> None:
            for g in games:
                try:
                    on_worker_now = len(running_containers(cluster.nodes[1], g))
                except Exception:  # noqa: BLE001 - its dockerd not answering yet: it runs no container either
                    on_worker_now = 0
                n = on_worker_now + len(running_containers(cluster.manager, g))
                assert n <= 1, f"{n} engines of {g} run"

        def rejoined() -> bool:
            at_most_one_engine_each()
            return all(n["Status"]["State"] == "ready" for n in client.api.nodes())

        await eventually(rejoined, timeout=60, what="the worker back", retry_on=())
        for _ in range(10):  # and a few seconds after it rejoined, while its agent catches up
            at_most_one_engine_each()
            await asyncio.sleep(0.3)
        for g in games:
            await eventually(lambda g=g: len(running_tasks(client, g)) == 1, timeout=30, what=f"one task of {g}")
            assert running_containers(cluster.nodes[1], g) == [], g
            assert len(running_containers(cluster.manager, g)) == 1, g
        assert (await store.get(on_worker)).node_id == manager
    finally:
        client.close()
