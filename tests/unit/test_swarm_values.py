"""Odd types in a Swarm manager's answers fail nothing (stop 41's open finding). A task's ``Version`` of
null or a list, an ``Index`` that is a string, a ``DesiredState`` that is a list, a service's ``Replicas``
of a string or a ``Mode`` of a list raised in the list call, so in every resync and health round, for
every game. Each is now read as unknown, as the Docker backend reads its own odd values."""

from __future__ import annotations

import asyncio
import json

import pytest

from observed.model import LABEL_GAME_ID
from observed.swarm import SwarmBackend, TaskPoller, _latest, _replicas, _state, _tasks

GOOD_TASK = {"ID": "t1", "ServiceID": "s1", "CreatedAt": "2026-12-06T01:00:00Z", "DesiredState": "running",
             "Version": {"Index": 7}, "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c1"}},
             "Spec": {"ContainerSpec": {"Labels": {LABEL_GAME_ID: "g1"}}}}


def service(**over) -> dict:
    s = {"ID": "s1", "Version": {"Index": 3}, "CreatedAt": "2026-12-06T00:59:00Z",
         "Spec": {"Name": "galaxy-game-g1", "Labels": {LABEL_GAME_ID: "g1"},
                  "Mode": {"Replicated": {"Replicas": 1}},
                  "TaskTemplate": {"ContainerSpec": {"Image": "engine:1", "Env": []}}}}
    s.update(over)
    return s


ODD_TASKS = [
    {"Version": None}, {"Version": ["x"]}, {"Version": 5}, {"Version": {"Index": "12"}},
    {"Version": {"Index": None}}, {"Version": {"Index": [1]}}, {"Version": {"Index": 10**30}},
    {"DesiredState": ["running"]}, {"DesiredState": {"x": 1}}, {"DesiredState": 3},
    {"Status": ["running"]}, {"Status": {"State": ["running"]}}, {"Status": {"State": 1}},
    {"Status": {"State": "exited", "ContainerStatus": ["c"]}}, {"NodeID": ["n"]}, {"Spec": ["x"]},
    {"Spec": {"ContainerSpec": {"Labels": [LABEL_GAME_ID + "=g2"]}}}, {"CreatedAt": 5}, {"ServiceID": ["s"]},
]


@pytest.mark.parametrize("odd", ODD_TASKS, ids=repr)
def test_a_task_with_an_odd_field_fails_neither_the_pick_nor_the_state(odd):
    tasks = [dict(GOOD_TASK), {**GOOD_TASK, "ID": "t2", "CreatedAt": "2026-12-06T01:00:00Z", **odd}]
    assert _latest(tasks) is not None
    state, _ = _state(service(), tasks)
    assert state in ("running", "restarting", "exited", "created")
    b = SwarmBackend(instance="i", network="n")
    seen = b._observe(service(), b._settle(tasks))
    assert seen.id == "s1" and seen.name == "galaxy-game-g1"


@pytest.mark.parametrize("odd", ODD_TASKS, ids=repr)
def test_the_task_poller_reads_past_an_odd_task(odd):
    poller = TaskPoller.__new__(TaskPoller)
    other = {**GOOD_TASK, "ID": "t2", "ServiceID": "s2", "Spec": {"ContainerSpec": {"Labels": {LABEL_GAME_ID: "g2"}}}}
    out = poller._snapshot([dict(GOOD_TASK), {**other, **odd}, "no object", None])
    assert out["g1"] == ("t1", "running", "running")


@pytest.mark.parametrize("mode, replicas", [
    ({"Replicated": {"Replicas": "2"}}, None), ({"Replicated": {"Replicas": None}}, None),
    ({"Replicated": {"Replicas": [1]}}, None), ({"Replicated": {"Replicas": True}}, None),
    ({"Replicated": {"Replicas": -1}}, None), ({"Replicated": {"Replicas": 1.0}}, None),
    ({"Replicated": ["x"]}, None), (["x"], None), ("x", None), ({"Global": {}}, None),
    ({"Replicated": {"Replicas": 2}}, 2), ({"Replicated": {"Replicas": 0}}, 0),
])
def test_an_odd_replica_count_is_no_count_and_may_run(mode, replicas):
    """Review: an odd count read as 0 made a stop skip its scale-down (and wait for ever for the task to
    end), and a service with no task look stopped while Swarm was about to run it."""
    s = service()
    s["Spec"]["Mode"] = mode
    assert _replicas(s) == replicas
    b = SwarmBackend(instance="i", network="n")
    assert b._observe(s, []).state == ("created" if replicas == 0 else "restarting")


class FakeApi:
    """The manager's API as docker-py's low-level client is used by SwarmBackend: one service, its tasks."""

    def __init__(self, svc: dict, tasks: list[dict]) -> None:
        self.svc, self.tasks, self.updates = svc, tasks, []

    def inspect_service(self, name_or_id):
        return self.svc

    def _url(self, path, *args):
        return path.format(*args)

    def _get(self, url, params=None, **kw):
        class Res:
            content = json.dumps(self.tasks).encode()
        return Res()

    def _raise_for_status(self, res):
        pass

    def _post_json(self, url, data=None, params=None):
        self.updates.append(json.loads(json.dumps(data)))
        if data["Mode"]["Replicated"]["Replicas"] == 0:
            self.tasks = [{**t, "DesiredState": "shutdown", "Status": {"State": "shutdown"}} for t in self.tasks]
        return None

    def _result(self, res, json=False):
        return None

    def nodes(self):
        return []


@pytest.mark.parametrize("odd", ["1", 1.0, True, None])
async def test_a_stop_scales_a_service_with_an_odd_replica_count_to_zero(odd):
    s = service()
    s["Spec"]["Mode"] = {"Replicated": {"Replicas": odd}}
    api = FakeApi(s, [dict(GOOD_TASK)])
    b = SwarmBackend(instance="i", network="n")
    b._docker = lambda: type("Client", (), {"api": api})()
    await asyncio.wait_for(b.stop("s1", 0.1), 10)
    assert [u["Mode"] for u in api.updates] == [{"Replicated": {"Replicas": 0}}]


@pytest.mark.parametrize("over", [
    {"Spec": ["x"]}, {"Spec": {"Name": 5, "Labels": {LABEL_GAME_ID: "g1"}}}, {"Spec": {"Labels": None}},
    {"Spec": {"TaskTemplate": ["x"]}}, {"Spec": {"TaskTemplate": {"ContainerSpec": ["x"]}}},
    {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": 5, "Env": "x", "Mounts": ["a"]}}}},
    {"Spec": {"TaskTemplate": {"Placement": ["x"]}}}, {"CreatedAt": [1]}, {"PreviousSpec": 1},
], ids=repr)
def test_a_service_with_an_odd_field_is_still_seen(over):
    b = SwarmBackend(instance="i", network="n")
    seen = b._observe(service(**over), [dict(GOOD_TASK)])
    assert seen.id == "s1" and isinstance(seen.name, str) and isinstance(seen.image, str)
    assert seen.state == "running" and seen.labels.get(LABEL_GAME_ID) in ("g1", None)


def test_a_task_list_element_that_is_no_object_is_dropped():
    class Api:
        def _url(self, path):
            return path

        def _get(self, url, params):
            class Res:
                content = json.dumps([None, "x", GOOD_TASK, 5]).encode()
            return Res()

        def _raise_for_status(self, res):
            pass

    assert _tasks(Api(), {"label": ["a=b"]}) == [GOOD_TASK]
