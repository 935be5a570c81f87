"""Two Swarm nodes on this machine, and games placed on both.

A swarm of two private dockerds, each in a network namespace of its own with a veth pair to the
host and one to the other node (tests/swarm/nodes.py): the manager and a worker. An in-process
controller (real Postgres and Redis of the test environment) runs the Swarm backend against the
manager with RTMANAGER_PROBE_ADDRESS=published: it reaches every engine at the port Swarm
published on the engine's node, at that node's address.

What is checked: games land on both nodes and are pinned to the node that first ran them (a
restart goes back there even when the other node is emptier, and so does a recreate with a new
image); a container on one node reaches an engine on the other over the overlay, by hostname;
a node that dies leaves its games unreachable (they cannot move: their state is there) and a
stop of such a game still completes.

Both nodes share this machine's filesystem, so every state directory exists on both: this is
the "state root on shared storage" case of docs/swarm.md, not a test of node-local disks.
"""

from __future__ import annotations

import pytest

from desired.db.store import Store
from tests.support import Harness, eventually
from tests.swarm.nodes import STUBS, Cluster


@pytest.fixture
def cluster2(docker_client, stub_images):
    with Cluster(2) as cluster:
        cluster.load_images(*STUBS)
        yield cluster


@pytest.fixture
async def h(cluster2, rtm_env, docker_client, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", cluster2.manager.host)  # the backend's client follows DOCKER_HOST
    env = {**rtm_env, "RTMANAGER_BACKEND": "swarm", "RTMANAGER_PROBE_ADDRESS": "published",
           "RTMANAGER_HEALTH_INTERVAL": "1", "RTMANAGER_UNREACHABLE_AFTER": "2"}
    harness = Harness(env, docker_client)
    try:
        yield harness
    finally:
        try:
            await harness.stop_all()
        finally:
            await harness.redis.aclose()


def task_node(client, game: str) -> str | None:
    tasks = [t for t in client.api.tasks(filters={"service": f"galaxy-game-{game}"})
             if t["Status"]["State"] == "running"]
    return tasks[0]["NodeID"] if len(tasks) == 1 else None


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

        # The worker dies: its games cannot be reached, nor moved (pinned to the worker: their state is
        # there). Swarm calls their tasks running on a node that is down; the backend calls them lost:
        # a crash without an exit code, and restarts that wait for the node, counted as crashes.
        lost = next(g for g in on_worker if g != moved)
        service = client.api.inspect_service(f"galaxy-game-{lost}")["ID"]
        cluster2.nodes[1].stop()

        async def noticed():
            r = await store.get(lost)
            return r if r.crash_count >= 1 and "is down" in (r.last_error_message or "") else None

        rec = await eventually(noticed, timeout=60, what=f"{lost}'s node noticed down")
        assert rec.last_exit_code is None and rec.node_id == worker
        # A stop of such a game completes (nothing to wait for on a dead node), and no task of it is meant
        # to run any more: a restart waiting for the node (a pending task) is scaled away, a lost task
        # Swarm has already given up.
        res = await h.result(await h.submit_stop(lost), job="stop", timeout=90)
        assert res["outcome"] == "success", res
        assert (await store.get(lost)).status.value == "stopped"
        tasks = client.api.tasks(filters={"service": service})
        assert not [t for t in tasks if t["DesiredState"] in ("running", "ready")], tasks

        # The worker comes back: its dockerd stopped the engines when it went down, and nothing of the
        # stopped game runs again; the game left running there goes on being probed.
        cluster2.nodes[1].start()
        await eventually(lambda: all(n["Status"]["State"] == "ready" for n in client.api.nodes()), timeout=60,
                         what="the worker back")
        await eventually(lambda: not [t for t in client.api.tasks(filters={"service": service})
                                      if t["Status"]["State"] not in ("shutdown", "complete", "failed")],
                         timeout=60, what="the lost task shut down")
        worker_client = cluster2.nodes[1].client()
        try:
            assert worker_client.containers.list(filters={"label": f"com.galaxy.game-id={lost}"}) == []
        finally:
            worker_client.close()
    finally:
        client.close()
