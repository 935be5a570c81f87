"""The runtime backend port (observed/backend.py), one set of scenarios against both implementations.

* ``docker``: DockerBackend on the machine's dockerd, isolated by a unique instance label and
  network (as tests/integration does); engines are probed at their container IP on that network.
* ``swarm``: SwarmBackend on the session's private one-node swarm (tests/swarm/nodes.py), probe
  mode ``published``: a host-mode port on the node's address, in the node's own namespace.

The scenarios: create (and adopt on a name conflict), start, inspect by id and name, list,
the hardening of the running engine, stop with SIGTERM first, start again, a crashed unit's exit
code and log tail, restart of a crashed unit, remove (and create again under the same name and
state directory), events, images. Nothing is sent anywhere but to the engines these tests start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import stat
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from observed.docker import DockerBackend, ensure_state_dir
from observed.errors import BackendUnavailable, ImageMissing, Refused
from observed.model import ContainerSpec, ObservedContainer
from observed.swarm import SwarmBackend
from tests.support import eventually
from tests.support.local import cleanup_docker

STATE_TARGET = "/var/lib/galaxy-engine"
ENGINE_USER = (10000, 10000)
GRACE = 5.0


@dataclass
class Port:
    """One backend under test, with what a test needs to look behind it."""

    kind: str
    backend: DockerBackend | SwarmBackend
    instance: str
    network: str
    state_root: Path
    node_client: docker.DockerClient   # the daemon that runs the engines' containers
    allowed: list = field(default_factory=list)  # networks the tests may send requests to

    def spec(self, game: str, image: str = "galaxy/engine-stub:1.0", **kw) -> ContainerSpec:
        path = self.state_root / game
        ensure_state_dir(str(self.state_root), str(path), *ENGINE_USER)
        return ContainerSpec(
            name=f"galaxy-game-{game}", image=image, game_id=game, instance=self.instance, network=self.network,
            state_path=str(path), state_target=STATE_TARGET,
            env={"GAME_ID": game, "ENGINE_PORT": "8080", "ENGINE_STATE_DIR": STATE_TARGET},
            memory_bytes=64 * 1024**2, nano_cpus=500_000_000, pids_limit=128, generation=1, spec_revision=1,
            user=f"{ENGINE_USER[0]}:{ENGINE_USER[1]}", read_only=True, tmpfs_bytes=16 * 1024**2,
            database="port-test-db", epoch=1, **kw)

    def container_of(self, unit: ObservedContainer) -> dict:
        """The engine's container as its daemon sees it (for a service: its running task's)."""
        if self.kind == "docker":
            return self.node_client.api.inspect_container(unit.id)
        tasks = [t for t in self.node_client.api.tasks(filters={"service": unit.id})
                 if t["Status"]["State"] == "running"]
        assert len(tasks) == 1, tasks
        return self.node_client.api.inspect_container(tasks[0]["Status"]["ContainerStatus"]["ContainerID"])

    def events(self, game: str) -> list[str]:
        try:
            return [line.split()[0] for line in (self.state_root / game / "events").read_text().splitlines()]
        except FileNotFoundError:
            return []

    def healthz(self, unit: ObservedContainer) -> bytes:
        assert unit.address, unit
        host, _, port = unit.address.partition(":")
        addr = ipaddress.ip_address(host)
        assert any(addr in net for net in self.allowed), f"{addr} is not an address of this test ({self.allowed})"
        with urllib.request.urlopen(f"http://{host}:{port or 8080}/healthz", timeout=5) as resp:
            return resp.read()


@pytest.fixture(params=["docker", "swarm"])
async def port(request, tmp_path, docker_client, stub_images):
    unique = uuid.uuid4().hex[:8]
    instance, network = f"port-{unique}", f"rtm-port-{unique}"
    state_root = tmp_path / "games"
    if request.param == "docker":
        backend = DockerBackend(instance=instance, network=network, probe_address="ip")
        p = Port("docker", backend, instance, network, state_root, docker_client)
        try:
            await backend.prepare()
            net = docker_client.api.inspect_network(network)
            p.allowed = [ipaddress.ip_network(c["Subnet"]) for c in net["IPAM"]["Config"]]
            yield p
        finally:
            backend.close()
            cleanup_docker(docker_client, instance, network)
        return
    cluster = request.getfixturevalue("swarm1")
    client = cluster.manager_client()
    backend = SwarmBackend(instance=instance, network=network, probe_address="published", stop_grace=GRACE,
                           base_url=cluster.manager.host)
    p = Port("swarm", backend, instance, network, state_root, client,
             allowed=[ipaddress.ip_network(f"{a}/32") for a in cluster.addresses])
    try:
        await backend.prepare()
        yield p
    finally:
        try:
            for unit in await backend.list_managed():
                await backend.remove(unit.id, 0)
            left = client.api.tasks(filters={"label": f"com.galaxy.instance={instance}"})
            assert not left, f"tasks left behind: {left}"
            for n in client.networks.list(names=[network]):
                n.remove()
        finally:
            backend.close()
            client.close()


async def test_create_start_inspect_list_and_hardening(port: Port):
    b = port.backend
    spec = port.spec("one")
    created = await b.create(spec)
    assert created.state == "created" and not created.running
    assert created.name == "galaxy-game-one" and created.game_id == "one"
    assert spec.all_labels().items() <= dict(created.labels).items()  # (a container also shows its image's)
    assert created.managed_by(port.instance) and created.created_under("port-test-db", 1)
    # A second create of the same name is a conflict: the existing unit comes back, to be adopted.
    again = await b.create(spec)
    assert again.id == created.id

    await b.start(created.id)
    by_id = await b.inspect(created.id)
    by_name = await b.inspect("galaxy-game-one")
    assert by_id is not None and by_name is not None and by_id.id == by_name.id == created.id
    assert by_id.state == "running" and by_id.running and by_id.exit_code is None
    assert ("", "") not in by_id.mounts and (str(port.state_root / "one"), STATE_TARGET) in by_id.mounts
    assert await eventually(lambda: _ok(port, by_id), what="engine answers /healthz at the unit's address")
    if port.kind == "swarm":
        assert by_id.node == port.node_client.info()["Swarm"]["NodeID"]

    listed = await b.list_managed()
    assert [(u.id, u.state, u.address) for u in listed] == [(created.id, "running", by_id.address)]
    assert await b.inspect("galaxy-game-nothing") is None

    # The hardening, as the engine's daemon applied it.
    c = port.container_of(by_id)
    hc = c["HostConfig"]
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"] and hc["Privileged"] is False
    assert hc["ReadonlyRootfs"] is True
    assert hc["PidsLimit"] == 128 and hc["Memory"] == 64 * 1024**2 and hc["NanoCpus"] == 500_000_000
    assert c["Config"]["User"] == "10000:10000" and c["Config"]["Hostname"] == "galaxy-game-one"
    assert any(m["Type"] == "bind" and m["Source"] == str(port.state_root / "one") and m["Destination"] == STATE_TARGET
               for m in c["Mounts"])
    mounts = port.node_client.api.exec_start(port.node_client.api.exec_create(c["Id"], ["cat", "/proc/mounts"]))
    mounts = mounts.decode()
    tmp = [line for line in mounts.splitlines() if line.split()[1] == "/tmp"]
    assert tmp and tmp[0].split()[2] == "tmpfs" and {"nosuid", "nodev", "noexec"} <= set(tmp[0].split()[3].split(","))
    status = port.node_client.api.exec_start(port.node_client.api.exec_create(c["Id"], ["cat", "/proc/1/status"]))
    caps = {line.split(":")[0]: line.split(":")[1].strip() for line in status.decode().splitlines() if ":" in line}
    assert caps["CapEff"] == "0000000000000000" and caps["CapBnd"] == "0000000000000000"
    if port.kind == "docker":
        assert "no-new-privileges:true" in hc["SecurityOpt"] and caps["NoNewPrivs"] == "1"
        assert hc["RestartPolicy"]["Name"] == "no"
    else:
        svc = port.node_client.api.inspect_service(created.id)["Spec"]
        assert svc["Mode"] == {"Replicated": {"Replicas": 1}}
        assert svc["EndpointSpec"]["Mode"] == "dnsrr"
        assert svc["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
        assert svc["TaskTemplate"]["ContainerSpec"]["Hostname"] == "galaxy-game-one"
        assert svc["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == int(GRACE * 1e9)
        assert svc["Labels"] == svc["TaskTemplate"]["ContainerSpec"]["Labels"] == spec.all_labels()
        net = port.node_client.api.inspect_network(port.network)
        assert net["Driver"] == "overlay" and net["Attachable"] is True
        assert [n["Target"] for n in svc["TaskTemplate"]["Networks"]] == [net["Id"]]
        assert svc["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id=={by_id.node}"]  # pinned
        # Services cannot ask for no-new-privileges (Docker 20.10): this daemon sets it for every container.
        assert caps["NoNewPrivs"] == "1" and not hc["SecurityOpt"]


def _ok(port: Port, unit: ObservedContainer) -> bool:
    try:
        return port.healthz(unit).strip() == b"ok"
    except OSError:
        return False


async def test_the_state_directory_is_made_through_the_port_and_never_through_a_symlink(port: Port):
    game = f"dir-{uuid.uuid4().hex[:6]}"
    spec = dataclasses.replace(port.spec(game), state_path=str(port.state_root / f"{game}-new"))
    await port.backend.make_state_dir(str(port.state_root), spec)
    await port.backend.make_state_dir(str(port.state_root), spec)  # idempotent
    st = os.lstat(spec.state_path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == ENGINE_USER
    planted = port.state_root / f"{game}-link"
    planted.symlink_to("/etc")
    etc = os.stat("/etc")
    with pytest.raises(Refused, match="symbolic link|not a directory"):
        await port.backend.make_state_dir(str(port.state_root), dataclasses.replace(spec, state_path=str(planted)))
    assert os.stat("/etc") == etc
    with pytest.raises(Refused, match="not directly under"):
        await port.backend.make_state_dir(str(port.state_root), dataclasses.replace(spec, state_path="/tmp/elsewhere"))
    if port.kind == "swarm":  # made by a one-shot helper service on the node, removed once it ended
        assert not [s for s in port.node_client.api.services() if s["Spec"]["Name"].startswith("galaxy-statedir-")]


async def test_stop_sends_sigterm_first_and_start_runs_the_same_unit_again(port: Port):
    b = port.backend
    unit = await b.create(port.spec("stop"))
    await b.start(unit.id)
    await eventually(lambda: port.events("stop") == ["boot"], what="first boot")
    started = time.monotonic()
    await b.stop(unit.id, GRACE)
    took = time.monotonic() - started
    seen = await b.inspect(unit.id)
    assert seen is not None and seen.id == unit.id and not seen.running and seen.state == "exited"
    assert port.events("stop") == ["boot", "sigterm"]  # SIGTERM, and the engine exited on it
    assert took < GRACE + 5, took  # it exited on SIGTERM: no SIGKILL after the grace period
    assert not [u for u in await b.list_managed() if u.running]
    await b.stop(unit.id, GRACE)  # stopping a stopped unit is a no-op

    await b.start(unit.id)
    again = await b.inspect(unit.id)
    assert again is not None and again.id == unit.id and again.running
    await eventually(lambda: port.events("stop") == ["boot", "sigterm", "boot"], what="second boot")
    assert await eventually(lambda: _ok(port, again), what="the restarted engine answers")
    await b.stop(unit.id, GRACE)
    assert port.events("stop") == ["boot", "sigterm", "boot", "sigterm"]


async def test_a_crashed_unit_reports_its_exit_code_and_log_tail_and_starts_again(port: Port):
    b = port.backend
    unit = await b.create(port.spec("crash", "galaxy/engine-stub:crash"))
    await b.start(unit.id)
    seen = await eventually(lambda: _exited(b, unit.id), what="the crash")
    assert seen.exit_code == 3 and seen.finished_at is not None and not seen.running
    tail = await b.logs_tail(unit.id, 5)
    assert "crashing as asked" in tail, tail
    listed = {u.id: u for u in await b.list_managed()}
    assert listed[unit.id].state == "exited" and listed[unit.id].exit_code == 3

    await b.start(unit.id)  # Swarm: a forced update, a new task
    await eventually(lambda: len((port.state_root / "crash" / "boots").read_text().splitlines()) == 2,
                     what="a second boot")
    seen = await eventually(lambda: _exited(b, unit.id), what="the second crash")
    assert seen.exit_code == 3 and seen.id == unit.id
    if port.kind == "swarm":
        tasks = port.node_client.api.tasks(filters={"service": unit.id})
        assert len(tasks) == 2 and all(t["Status"]["State"] == "failed" for t in tasks)
        assert all(t["Status"]["ContainerStatus"]["ExitCode"] == 3 for t in tasks)


async def _exited(b, unit_id: str) -> ObservedContainer | None:
    seen = await b.inspect(unit_id)
    return seen if seen is not None and seen.state == "exited" else None


async def test_remove_stops_gracefully_and_frees_the_name_and_state_directory(port: Port):
    b = port.backend
    spec = port.spec("rm")
    unit = await b.create(spec)
    await b.start(unit.id)
    await eventually(lambda: port.events("rm") == ["boot"], what="boot")
    await b.remove(unit.id, GRACE)
    assert port.events("rm") == ["boot", "sigterm"]
    assert await b.inspect(unit.id) is None and await b.inspect(spec.name) is None
    assert await b.list_managed() == []
    if port.kind == "swarm":  # nothing of it left: no task, no container on the node
        assert port.node_client.api.tasks(filters={"label": f"com.galaxy.game-id={spec.game_id}"}) == []
    assert port.node_client.api.containers(all=True, filters={"label": f"com.galaxy.instance={port.instance}"}) == []
    await b.remove(unit.id, GRACE)  # removing what is gone is a no-op

    # The same name and state directory at once: a new unit, and only one engine ever wrote there.
    new = await b.create(spec)
    assert new.id != unit.id
    await b.start(new.id)
    await eventually(lambda: port.events("rm") == ["boot", "sigterm", "boot"], what="the new unit's boot")
    await b.remove(new.id, GRACE)


async def test_events_report_changes_and_connects(port: Port):
    b = port.backend
    seen: list[tuple[str, str]] = []
    connects: list[int] = []
    source = b.events(lambda game, what: seen.append((game, what)), lambda: connects.append(1))
    source.start()
    try:
        await eventually(lambda: connects, what="on_connect")
        unit = await b.create(port.spec("ev"))
        await b.start(unit.id)
        if port.kind == "docker":
            # The events of the backend's own start and stop are echoes it drops (observed/events.py): what
            # somebody else does to the unit is reported. A signal the engine's init ignores: a `kill`.
            await asyncio.to_thread(port.node_client.api.kill, unit.id, "SIGWINCH")
        await eventually(lambda: any(game == "ev" for game, _ in seen), what="an event for the started unit")
        seen.clear()
        await b.stop(unit.id, GRACE)
        if port.kind == "docker":
            await asyncio.to_thread(port.node_client.api.start, unit.id)  # somebody starts it again: a `start`
        await eventually(lambda: any(game == "ev" for game, _ in seen), what="an event for the stop")
        before = len(connects)
        source.reconnect()
        await eventually(lambda: len(connects) > before, what="on_connect after reconnect")
    finally:
        source.stop()


async def test_images(port: Port):
    b = port.backend
    assert await b.image_present("galaxy/engine-stub:1.0")
    assert not await b.image_present("galaxy/engine-stub:no-such-tag")
    if port.kind == "swarm":  # the private daemon's pulls go to a proxy that refuses at once
        with pytest.raises(ImageMissing):
            await b.ensure_image("galaxy/engine-stub:no-such-tag")


@pytest.fixture
async def swarm_port(swarm1, tmp_path):
    """A Swarm backend with the hostname probe mode (nothing is probed) and a short start wait."""
    unique = uuid.uuid4().hex[:8]
    b = SwarmBackend(instance=f"refuse-{unique}", network=f"rtm-refuse-{unique}", probe_address="hostname",
                     base_url=swarm1.manager.host, start_wait=3)
    p = Port("swarm", b, b.instance, b.network, tmp_path / "games", swarm1.manager_client())
    try:
        await b.prepare()
        yield p
    finally:
        try:
            for u in await b.list_managed():
                await b.remove(u.id, 0)
            for n in p.node_client.networks.list(names=[b.network]):
                n.remove()
        finally:
            b.close()
            p.node_client.close()


async def test_swarm_refuses_what_no_node_can_run(swarm_port: Port):
    """A task Swarm cannot run ends a start with an error, not a wait: a missing bind source, a
    missing image, and (after the start wait) a node constraint no node meets."""
    b = swarm_port.backend
    spec = swarm_port.spec("nobind")
    Path(spec.state_path).rmdir()
    unit = await b.create(spec)
    with pytest.raises(Refused, match="bind source path does not exist"):
        await b.start(unit.id)
    unit = await b.create(swarm_port.spec("noimage", "galaxy/engine-stub:no-such-tag"))
    with pytest.raises(ImageMissing, match="No such image"):
        await b.start(unit.id)
    assert "No such image" in await b.logs_tail(unit.id)
    unit = await b.create(swarm_port.spec("nonode", node="n0such0node0000000000000000"))
    with pytest.raises(Refused, match="no suitable node"):
        await b.start(unit.id)


async def test_swarm_concurrent_creates_of_one_name_give_one_service(swarm_port: Port):
    """However Swarm answers the loser of two creates of one name, it gets the winner's service."""
    b = swarm_port.backend
    spec = swarm_port.spec("twice")
    units = await asyncio.gather(*(b.create(spec) for _ in range(4)))
    assert len({u.id for u in units}) == 1
    assert [u.id for u in await b.list_managed()] == [units[0].id]


async def test_swarm_network_deleted_behind_its_back_is_made_again(swarm_port: Port):
    b = swarm_port.backend
    swarm_port.node_client.networks.get(b.network).remove()
    with pytest.raises(BackendUnavailable, match="not found"):
        await b.create(swarm_port.spec("nonet"))
    await b.prepare()
    unit = await b.create(swarm_port.spec("nonet"))
    assert unit.state == "created"
