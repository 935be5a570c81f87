"""The Swarm backend's reading of nodes (no daemon): a unit on a lost node, the placement constraints of
a spec that avoids nodes, and the state directory helper's service."""

from __future__ import annotations

import re

import pytest

from observed.errors import Refused
from observed.model import ContainerSpec
from observed.swarm import SwarmBackend
from observed.swarm_statedir import helper_spec, node_drained, node_lost, relative_name

LABELS = {"com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": "i", "com.galaxy.game-id": "g1"}


def spec(**kw) -> ContainerSpec:
    base = dict(name="galaxy-game-g1", image="galaxy/engine-stub:1.0", game_id="g1", instance="i", network="net",
                state_path="/srv/games/g1", state_target="/state", env={}, memory_bytes=64 << 20,
                nano_cpus=10**9, pids_limit=64, generation=1, spec_revision=0, user="10000:10000")
    return ContainerSpec(**{**base, **kw})


def service(constraints=(), replicas=1) -> dict:
    return {"ID": "s1", "Spec": {"Name": "galaxy-game-g1", "Labels": LABELS, "Mode": {"Replicated": {"Replicas":
            replicas}}, "TaskTemplate": {"ContainerSpec": {"Image": "x"},
                                         "Placement": {"Constraints": list(constraints)}}}}


def task(node: str, state: str = "running", desired: str = "running") -> dict:
    return {"ID": "t1", "ServiceID": "s1", "NodeID": node, "DesiredState": desired, "CreatedAt": "2026-01-01T00:00:00Z",
            "Status": {"State": state, "ContainerStatus": {"ContainerID": "c1", "ExitCode": 0}}}


@pytest.fixture
def backend() -> SwarmBackend:
    b = SwarmBackend(instance="i", network="net")
    b._nodes = {"up": {"state": "ready", "availability": "active", "addr": ""},
                "dead": {"state": "down", "availability": "active", "addr": ""},
                "drained": {"state": "ready", "availability": "drain", "addr": ""}}
    return b


def test_a_running_task_on_a_dead_node_is_a_unit_on_a_lost_node_without_an_exit_code(backend) -> None:
    seen = backend._observe(service(["node.id==dead"]), backend._settle([task("dead", desired="shutdown")]))
    assert seen.state == "exited" and seen.node_lost and seen.exit_code is None and seen.node == "dead"
    ok = backend._observe(service(["node.id==up"]), backend._settle([task("up")]))
    assert ok.state == "running" and not ok.node_lost


def test_a_unit_with_no_task_pinned_to_a_lost_node_is_on_a_lost_node_and_a_drained_one_is_not_lost(backend) -> None:
    drained = backend._observe(service(["node.id==drained"], replicas=0), [])
    assert drained.node_drained and not drained.node_lost and drained.node == "drained"
    dead = backend._observe(service(["node.id==dead"], replicas=0), [])
    assert dead.node_lost and not dead.node_drained and dead.node == "dead"  # the pin names the node
    assert not backend._observe(service(["node.id==up"], replicas=0), []).node_lost
    assert not backend._observe(service([], replicas=0), []).node_lost


def test_node_states() -> None:
    assert [node_lost({"state": s, "availability": "active"}) for s in ("ready", "down", "unknown", "disconnected")] \
        == [False, True, True, True]
    # An operator's drain (maintenance) is not a lost node: the node is up, the state there intact.
    assert not node_lost({"state": "ready", "availability": "drain"}) and not node_lost(None)
    assert node_drained({"state": "ready", "availability": "drain"})
    assert not node_drained({"state": "down", "availability": "drain"}) and not node_drained(None)
    assert node_drained({"state": "ready", "availability": "pause"})  # taken out of use too: nothing starts there
    assert not node_drained({"state": "ready", "availability": "active"})


def test_a_spec_that_avoids_nodes_is_placed_off_them_and_its_hash_ignores_them(backend) -> None:
    body = backend._service_spec(spec(node="up", avoid_nodes=("dead",)))
    assert body["TaskTemplate"]["Placement"]["Constraints"] == ["node.id==up", "node.id!=dead"]
    assert "Placement" not in backend._service_spec(spec())["TaskTemplate"]
    assert spec(avoid_nodes=("dead",)).spec_hash == spec().spec_hash == spec(node="up").spec_hash
    assert spec(spec_revision=1).spec_hash != spec().spec_hash  # what a move changes


def test_the_state_directory_helper_mounts_only_the_root_and_refuses_other_paths() -> None:
    body = helper_spec("/srv/games", spec(), "n1", "busybox", "i")
    cs = body["TaskTemplate"]["ContainerSpec"]
    assert cs["Mounts"] == [{"Type": "bind", "Source": "/srv/games", "Target": "/rtm-state-root", "ReadOnly": False}]
    assert cs["Command"][-2:] == ["g1", "10000:10000"] and cs["CapabilityDrop"] == ["ALL"] and cs["ReadOnly"]
    assert body["TaskTemplate"]["Placement"]["Constraints"] == ["node.id==n1"]
    assert "com.galaxy.instance" not in body["Labels"]  # never listed as a game
    for bad in ("/srv/other/g1", "/srv/games", "/srv/games/a/b", "/srv/games/.."):
        with pytest.raises(Refused):
            relative_name("/srv/games", bad)
    assert relative_name("/srv/games/", "/srv/games/g1") == "g1"


def test_the_state_directory_helpers_of_two_instances_never_share_a_name() -> None:
    """An attempt first removes a leftover helper of its name: two instances (or, by mistake, two
    instances asked for one game id at once) must never name theirs alike, or one would remove the
    other's mid-run. Every name is a service name: at most 63 characters, also for a 51-character id."""
    def name(instance: str, game: str) -> str:
        s = spec(name=f"galaxy-game-{game}", game_id=game, instance=instance, state_path=f"/srv/games/{game}")
        return str(helper_spec("/srv/games", s, "n1", "busybox", instance)["Name"])

    longest = "g" * 50 + "1"
    names = {name(i, g) for i in ("blue", "green", "default") for g in ("g1", "g2", longest, "g" * 50 + "2")}
    assert len(names) == 12
    for n in names:
        assert len(n) <= 63 and re.fullmatch(r"galaxy-statedir-[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", n), n
    assert name("blue", "g1").startswith("galaxy-statedir-g1-")  # an operator still sees whose it is
    assert name("blue", "g1") == name("blue", "g1")  # a leftover of a killed attempt is found again


async def test_a_paused_node_takes_no_new_unit_pinned_or_not(backend) -> None:
    """Red-team, stop 44: a node its operator paused (availability pause, a first step of maintenance) keeps
    its tasks but Swarm places none there. It was counted neither lost nor drained, so a patch or restart of
    a game pinned there removed the running engine and then waited for a task Swarm would never place."""
    import time

    backend._nodes["paused"] = {"state": "ready", "availability": "pause", "addr": ""}
    backend._nodes_read_at = time.monotonic()
    assert "paused" in await backend.unavailable_nodes() and "drained" in await backend.unavailable_nodes()
    assert "up" not in await backend.unavailable_nodes()
    assert not await backend.placeable(frozenset(), node="paused")
    assert not await backend.placeable(frozenset(), node="drained")
    assert await backend.placeable(frozenset(), node="up")
    assert not await backend.placeable(frozenset({"up"}))  # unpinned: only "up" is usable
    assert await backend.placeable(frozenset())
    from observed.errors import NodeLost
    with pytest.raises(NodeLost):
        await backend.make_state_dir("/srv/games", spec(node="paused"))
