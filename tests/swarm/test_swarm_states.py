"""The Swarm backend's reading of services and tasks, on recorded answers (no daemon): which task tells
the state, which state, exit code, address, lost tasks, and the task poller's events."""

from __future__ import annotations

import asyncio
import json
import types

from observed.swarm import SwarmBackend, TaskPoller, _latest, _state

NODE = "node1node1node1node1node1"


def service(replicas: int, previous: bool = False, **extra) -> dict:
    s = {"ID": "svc1", "CreatedAt": "2026-11-25T10:00:00.123456789Z",
         "Spec": {"Name": "galaxy-game-g1", "Labels": {"com.galaxy.game-id": "g1"}, "Mode": {"Replicated": {
             "Replicas": replicas}}, "TaskTemplate": {"ContainerSpec": {
                 "Image": "galaxy/engine-stub:1.0@sha256:abc", "Hostname": "galaxy-game-g1", "Mounts": [
                     {"Type": "bind", "Source": "/s/g1", "Target": "/var/lib/galaxy-engine"}]}}}, **extra}
    if previous:
        s["PreviousSpec"] = dict(s["Spec"])
    return s


def task(tid: str, state: str, desired: str = "running", created: str = "2026-11-25T10:00:01Z", exit_code=None,
         node: str = NODE, err: str | None = None, published: int | None = None) -> dict:
    status = {"State": state, "Timestamp": "2026-11-25T10:00:05.5Z",
              "ContainerStatus": {"ContainerID": f"c-{tid}", "ExitCode": 0 if exit_code is None else exit_code}}
    if err:
        status["Err"] = err
    if published:
        status["PortStatus"] = {"Ports": [{"TargetPort": 8080, "PublishedPort": published, "PublishMode": "host"}]}
    return {"ID": tid, "ServiceID": "svc1", "NodeID": node, "CreatedAt": created, "DesiredState": desired,
            "Status": status, "Version": {"Index": 1},
            "Spec": {"ContainerSpec": {"Labels": {"com.galaxy.game-id": "g1"}}},
            "NetworksAttachments": [{"Network": {"Spec": {"Name": "games"}}, "Addresses": ["10.1.2.3/24"]}]}


def test_states():
    assert _state(service(0), [])[0] == "created"
    assert _state(service(0, previous=True), [])[0] == "exited"   # stopped, its tasks forgotten
    assert _state(service(1), [])[0] == "restarting"               # scaled up, no task yet
    assert _state(service(1), [task("a", "pending")])[0] == "restarting"
    assert _state(service(1), [task("a", "running")])[0] == "running"
    assert _state(service(0), [task("a", "running", desired="remove")])[0] == "running"  # being stopped
    assert _state(service(1), [task("a", "failed", desired="shutdown", exit_code=3)])[0] == "exited"
    assert _state(service(0), [task("a", "pending", desired="remove")])[0] == "exited"    # called off


def test_the_newest_task_meant_to_run_tells():
    old = task("a", "failed", desired="shutdown", created="2026-11-25T10:00:01Z", exit_code=3)
    new = task("b", "ready", desired="ready", created="2026-11-25T10:00:02Z")
    assert _latest([old, new])["ID"] == "b"
    assert _latest([new, old])["ID"] == "b"
    # Times with and without fractions compare as times, not as text.
    a = task("a", "failed", desired="shutdown", created="2026-11-25T10:00:01Z")
    b = task("b", "failed", desired="shutdown", created="2026-11-25T10:00:01.5Z")
    assert _latest([b, a])["ID"] == "b"


async def test_observed_fields():
    b = SwarmBackend(instance="i", network="games", probe_address="published")
    b._nodes = {NODE: {"addr": "192.168.64.2", "state": "ready", "availability": "active"}}
    try:
        running = b._observe(service(1), [task("a", "running", published=30001)])
        assert (running.state, running.address, running.node, running.ip_address) == (
            "running", "192.168.64.2:30001", NODE, "10.1.2.3")
        assert running.image == "galaxy/engine-stub:1.0" and running.name == "galaxy-game-g1"
        assert running.mounts == (("/s/g1", "/var/lib/galaxy-engine"),) and running.exit_code is None
        crashed = b._observe(service(1), [task("a", "failed", desired="shutdown", exit_code=3)])
        assert crashed.state == "exited" and crashed.exit_code == 3 and crashed.finished_at is not None
        assert crashed.address is None
        rejected = b._observe(service(1), [{**task("a", "rejected", desired="shutdown", err="no such image"),
                                           "Status": {"State": "rejected", "Err": "No such image"}}])
        assert rejected.state == "exited" and rejected.exit_code is None
        b.probe_address = "hostname"
        assert b._observe(service(1), [task("a", "running")]).address == "galaxy-game-g1"
        b.probe_address = "ip"
        assert b._observe(service(1), [task("a", "running")]).address == "10.1.2.3"
        # A task on a node that is down is lost: ended, without an exit code.
        b._nodes[NODE]["state"] = "down"
        lost = b._observe(service(1), b._settle([task("a", "running", desired="shutdown")]))
        assert lost.state == "exited" and lost.exit_code is None and not lost.running
    finally:
        b.close()


async def test_poller_reports_changes_and_connects():
    answers = [[task("a", "running")], [task("a", "running")], [task("a", "failed", desired="shutdown")],
               RuntimeError("daemon away"), [task("a", "failed", desired="shutdown")]]

    class Api:
        """docker-py's low-level client as the poller uses it (observed/daemon.get_list): the GET of
        /tasks, answered with the JSON bytes dockerd would send."""

        def _url(self, path):
            return path

        def _get(self, url, params=None):
            assert url == "/tasks"
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if isinstance(answer, Exception):
                raise answer
            return types.SimpleNamespace(content=json.dumps(answer).encode())

        def _raise_for_status(self, res):
            pass

    class Client:
        api = Api()

        def close(self):
            pass

    events, connects = [], []
    loop = asyncio.get_running_loop()
    poller = TaskPoller(client_factory=Client, filters={}, loop=loop, interval=0.01,
                        on_event=lambda g, s: events.append((g, s)), on_connect=lambda: connects.append(1))
    poller.start()
    try:
        for _ in range(300):
            if events and len(connects) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        poller.stop()
    assert events[0] == ("g1", "failed")
    assert len(connects) >= 2  # the first answer, and the first after the failure
