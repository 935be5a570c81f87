"""observed.model: parsing Docker API answers, and the spec hash / labels of a container."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from observed.model import (
    LABEL_DATABASE,
    LABEL_EPOCH,
    LABEL_GAME_ID,
    LABEL_GENERATION,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_SPEC_HASH,
    MANAGED_BY,
    ContainerSpec,
    ObservedContainer,
    from_inspect,
    from_list_entry,
)

CID = "8dfafdbc3a40e1f5b5b6c2b3a1d7e9f0c4a2b1d3e5f7a9c0b2d4e6f8a0c2e4f6"
LABELS = {
    LABEL_MANAGED_BY: MANAGED_BY,
    LABEL_INSTANCE: "default",
    LABEL_GAME_ID: "g1",
    LABEL_SPEC_HASH: "0123456789abcdef",
    LABEL_GENERATION: "3",
    "org.opencontainers.image.version": "1.2",
}


@pytest.fixture
def list_entry_exited() -> dict:
    """One entry of GET /containers/json?all=1 for an exited engine."""
    return {
        "Id": CID,
        "Names": ["/galaxy-game-g1"],
        "Image": "galaxy/engine:1.2",
        "ImageID": "sha256:" + "1" * 64,
        "Command": "/engine",
        "Created": 1704164645,
        "Ports": [],
        "Labels": dict(LABELS),
        "State": "exited",
        "Status": "Exited (3) 2 seconds ago",
        "HostConfig": {"NetworkMode": "galaxy-games"},
        "NetworkSettings": {"Networks": {"galaxy-games": {
            "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": "n" * 64,
            "EndpointID": "", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0, "MacAddress": "",
        }}},
        "Mounts": [{"Type": "bind", "Source": "/var/lib/rtmanager/games/g1",
                    "Destination": "/var/lib/galaxy-engine", "Mode": "", "RW": True, "Propagation": "rprivate"}],
    }


@pytest.fixture
def list_entry_running() -> dict:
    return {
        "Id": CID,
        "Names": ["/galaxy-game-g1"],
        "Image": "galaxy/engine:1.2",
        "Created": 1704164645,
        "Labels": dict(LABELS),
        "State": "running",
        "Status": "Up 5 minutes",
        "NetworkSettings": {"Networks": {
            "bridge": {"IPAddress": "172.17.0.3"},
            "galaxy-games": {"IPAddress": "172.18.0.5", "Gateway": "172.18.0.1"},
        }},
    }


@pytest.fixture
def inspect_running() -> dict:
    """GET /containers/{id}/json of a running engine."""
    return {
        "Id": CID,
        "Created": "2024-01-02T03:04:05.123456789Z",
        "Path": "/engine",
        "Args": [],
        "State": {
            "Status": "running", "Running": True, "Paused": False, "Restarting": False,
            "OOMKilled": False, "Dead": False, "Pid": 4242, "ExitCode": 0, "Error": "",
            "StartedAt": "2024-01-02T03:04:05.523456789Z", "FinishedAt": "0001-01-01T00:00:00Z",
        },
        "Image": "sha256:" + "1" * 64,
        "Name": "/galaxy-game-g1",
        "RestartCount": 0,
        "HostConfig": {"RestartPolicy": {"Name": "no", "MaximumRetryCount": 0}},
        "Config": {"Hostname": "galaxy-game-g1", "Image": "galaxy/engine:1.2", "Labels": dict(LABELS),
                   "Env": ["PATH=/usr/bin"]},
        "NetworkSettings": {"Networks": {"galaxy-games": {
            "IPAddress": "172.18.0.5", "Gateway": "172.18.0.1", "Aliases": ["galaxy-game-g1"]}}},
    }


@pytest.fixture
def inspect_oom(inspect_running) -> dict:
    d = copy.deepcopy(inspect_running)
    d["State"].update(Status="exited", Running=False, OOMKilled=True, Pid=0, ExitCode=137,
                      FinishedAt="2024-01-02T04:00:00.98765432Z")
    d["NetworkSettings"]["Networks"]["galaxy-games"]["IPAddress"] = ""
    return d


def test_from_list_entry_exited(list_entry_exited) -> None:
    c = from_list_entry(list_entry_exited, network="galaxy-games")
    assert c.id == CID
    assert c.name == "galaxy-game-g1"
    assert c.image == "galaxy/engine:1.2"
    assert c.state == "exited"
    assert not c.running
    assert c.exit_code == 3
    assert c.labels == LABELS
    assert c.created_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)  # 1704164645
    assert c.ip_address is None  # an exited container has an empty IPAddress
    assert c.game_id == "g1"
    assert c.spec_hash == "0123456789abcdef"
    assert c.managed_by("default")
    assert not c.managed_by("other")


def test_from_list_entry_labels_are_a_copy(list_entry_exited) -> None:
    c = from_list_entry(list_entry_exited)
    list_entry_exited["Labels"]["x"] = "y"
    assert "x" not in c.labels


@pytest.mark.parametrize("labels", ["x", 5, True, ["ab", "c"]])
def test_labels_that_are_no_object_fail_the_entry(list_entry_exited, labels) -> None:
    """Not a unit without labels (a game whose unit the resync would then not see): the list fails."""
    list_entry_exited["Labels"] = labels
    with pytest.raises((TypeError, ValueError)):
        from_list_entry(list_entry_exited)


def test_shared_strings_are_bounded(monkeypatch) -> None:
    """Label names are one string for all units, up to a bound: a daemon sending ever new names grows
    the table no further, and its units keep their labels all the same. Ours are in it from the start."""
    from observed import model
    monkeypatch.setattr(model, "_SHARED", dict(model._SHARED))  # the process's own table stays as it was
    for i in range(model._SHARED_MAX + 100):
        c = from_list_entry({"Id": "x", "Labels": {f"junk.{i}": "v"}})
        assert c.labels == {f"junk.{i}": "v"}
    assert len(model._SHARED) <= model._SHARED_MAX
    a = from_list_entry({"Id": "a", "Labels": {"com.galaxy." + "game-id": "g1"}})
    b = from_list_entry({"Id": "b", "Labels": {"com.galaxy." + "game-id": "g2"}})
    assert next(iter(a.labels)) is next(iter(b.labels)) is LABEL_GAME_ID


@pytest.mark.parametrize(("status", "code"), [
    ("Exited (0) 5 minutes ago", 0),
    ("Exited (137) About an hour ago", 137),
    ("Exited (-1) 1 second ago", -1),
    ("Up 5 minutes", None),
    ("Created", None),
    ("", None),
])
def test_list_entry_exit_code(list_entry_exited, status: str, code: int | None) -> None:
    list_entry_exited["Status"] = status
    assert from_list_entry(list_entry_exited).exit_code == code


def test_from_list_entry_running_prefers_the_network(list_entry_running) -> None:
    c = from_list_entry(list_entry_running, network="galaxy-games")
    assert c.running and c.state == "running"
    assert c.exit_code is None
    assert c.ip_address == "172.18.0.5"
    # without a preference: the first network that has an address
    assert from_list_entry(list_entry_running).ip_address == "172.17.0.3"
    # a preferred network the container is not on: fall back
    assert from_list_entry(list_entry_running, network="elsewhere").ip_address == "172.17.0.3"


def test_from_list_entry_nested_state_and_missing_parts() -> None:
    c = from_list_entry({"Id": "x", "State": {"Status": "running"}, "Names": None, "Labels": None})
    assert c.state == "running"
    assert c.name == ""
    assert c.labels == {}
    assert c.created_at is None and c.ip_address is None and c.exit_code is None
    assert not c.managed_by("default")


def test_from_inspect_running(inspect_running) -> None:
    c = from_inspect(inspect_running, network="galaxy-games")
    assert c.id == CID
    assert c.name == "galaxy-game-g1"
    assert c.image == "galaxy/engine:1.2"  # the configured reference, not the image id
    assert c.state == "running" and c.running
    assert c.labels == LABELS
    assert c.created_at == datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert c.exit_code is None
    assert c.oom_killed is False
    assert c.ip_address == "172.18.0.5"
    assert c.finished_at is None  # 0001-01-01T00:00:00Z means never
    assert c.managed_by("default")


def test_from_inspect_oom_killed(inspect_oom) -> None:
    c = from_inspect(inspect_oom, network="galaxy-games")
    assert c.state == "exited" and not c.running
    assert c.exit_code == 137
    assert c.oom_killed is True
    assert c.ip_address is None
    assert c.finished_at == datetime(2024, 1, 2, 4, 0, 0, 987654, tzinfo=UTC)


@pytest.mark.parametrize(("created", "expected"), [
    ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2024-01-02T03:04:05.5Z", datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
    ("2024-01-02T03:04:05.123456789+00:00", datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
    ("0001-01-01T00:00:00Z", None),
    ("", None),
    ("not a time", None),
])
def test_inspect_timestamps(inspect_running, created: str, expected) -> None:
    inspect_running["Created"] = created
    assert from_inspect(inspect_running).created_at == expected


def test_observed_running_states() -> None:
    def c(state: str) -> ObservedContainer:
        return ObservedContainer(id="x", name="n", image="i", state=state, labels={})
    assert c("running").running and c("restarting").running
    assert c("paused").running  # a live process: it must be stopped, not started
    for state in ("created", "removing", "exited", "dead"):
        assert not c(state).running, state


def test_managed_by_needs_both_labels() -> None:
    def c(labels: dict) -> ObservedContainer:
        return ObservedContainer(id="x", name="n", image="i", state="running", labels=labels)
    assert c({LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: "a"}).managed_by("a")
    assert not c({LABEL_MANAGED_BY: MANAGED_BY}).managed_by("a")
    assert not c({LABEL_INSTANCE: "a"}).managed_by("a")
    assert not c({LABEL_MANAGED_BY: "someone-else", LABEL_INSTANCE: "a"}).managed_by("a")


# ------------------------------------------------------------------ ContainerSpec

def spec(**changes) -> ContainerSpec:
    base = dict(
        name="galaxy-game-g1", image="galaxy/engine:1.2", game_id="g1", instance="default",
        network="galaxy-games", state_path="/var/lib/rtmanager/games/g1", state_target="/var/lib/galaxy-engine",
        env={"GAME_ID": "g1", "PORT": "8080"}, memory_bytes=512 * 1024 ** 2, nano_cpus=10 ** 9,
        pids_limit=256, generation=1, spec_revision=0,
    )
    base.update(changes)
    return ContainerSpec(**base)


def test_spec_hash_is_stable_and_short() -> None:
    h = spec().spec_hash
    assert h == spec().spec_hash
    assert len(h) == 16 and all(ch in "0123456789abcdef" for ch in h)
    # env order does not matter
    assert spec(env={"PORT": "8080", "GAME_ID": "g1"}).spec_hash == h


@pytest.mark.parametrize("changes", [
    dict(image="galaxy/engine:1.3"),
    dict(memory_bytes=256 * 1024 ** 2),
    dict(nano_cpus=2 * 10 ** 9),
    dict(pids_limit=128),
    dict(spec_revision=1),
    dict(network="other"),
    dict(state_path="/elsewhere/g1"),
    dict(state_target="/data"),
    dict(env={"GAME_ID": "g1", "PORT": "9090"}),
    dict(user="1000"),
], ids=lambda c: next(iter(c)))
def test_spec_hash_changes_with_the_container(changes: dict) -> None:
    assert spec(**changes).spec_hash != spec().spec_hash


def test_spec_hash_ignores_generation() -> None:
    assert spec(generation=7).spec_hash == spec(generation=1).spec_hash


def test_all_labels() -> None:
    s = spec(generation=4, labels={"extra": "1", LABEL_MANAGED_BY: "spoofed", LABEL_GAME_ID: "other"},
             database="db-uid", epoch=3)
    labels = s.all_labels()
    ours = {LABEL_MANAGED_BY, LABEL_INSTANCE, LABEL_GAME_ID, LABEL_SPEC_HASH, LABEL_GENERATION, LABEL_DATABASE,
            LABEL_EPOCH}
    assert ours <= set(labels)
    assert labels[LABEL_MANAGED_BY] == "rtmanager"
    assert labels[LABEL_INSTANCE] == "default"
    assert labels[LABEL_GAME_ID] == "g1"  # extra labels cannot override ours
    assert labels[LABEL_SPEC_HASH] == s.spec_hash
    assert labels[LABEL_GENERATION] == "4"
    assert labels[LABEL_DATABASE] == "db-uid" and labels[LABEL_EPOCH] == "3"
    assert spec(database="other", epoch=9).spec_hash == spec().spec_hash  # provenance is not the spec
    assert labels["extra"] == "1"
    assert set(labels) == ours | {"extra"}
    assert set(spec().all_labels()) == ours
    assert all(isinstance(v, str) for v in labels.values())


def test_labels_round_trip_through_observed() -> None:
    s = spec()
    c = ObservedContainer(id="x", name=s.name, image=s.image, state="running", labels=s.all_labels())
    assert c.managed_by("default")
    assert c.spec_hash == s.spec_hash
    assert c.game_id == "g1"



@pytest.mark.parametrize("probe", ["ip", "hostname"])
def test_the_probe_address_is_set_as_the_unit_is_read(list_entry_running, list_entry_exited, inspect_running,
                                                     inspect_oom, probe: str) -> None:
    """A list of every unit is read every resync and every health round: each entry is built once,
    with its address, not built and then copied to add it."""
    c = from_list_entry(list_entry_running, network="galaxy-games", probe_address=probe)
    assert c.address == ("172.18.0.5" if probe == "ip" else "galaxy-game-g1")
    assert from_list_entry(list_entry_exited, network="galaxy-games", probe_address=probe).address is None
    i = from_inspect(inspect_running, network="galaxy-games", probe_address=probe)
    assert i.address == (i.ip_address if probe == "ip" else i.name) and i.address
    assert from_inspect(inspect_oom, network="galaxy-games", probe_address=probe).address is None
    assert from_list_entry(list_entry_running).address is None  # no probe mode: no address, as before
