"""The Swarm backend: one Docker Swarm service per game, behind the same port as the Docker backend.

A *unit* here is a service, and its id is the service id. Each game's service is
replicated with one replica at most, restart condition ``none`` (rtmanager, not
Swarm, decides about restarts), endpoint mode ``dnsrr`` (no virtual IP: the
routing mesh needs IPVS), on an attachable overlay network, with the hostname
``galaxy-game-{game_id}`` and rtmanager's labels on the service and on its
containers. It is created with 0 replicas (``created``); ``start`` scales it to
1, or, when the one task has died, forces a new task (``force_update``);
``stop`` scales it to 0; ``remove`` stops it, then removes the service.

Swarm says less than dockerd, and later:

* there are no task events: the state of a service is read from its tasks,
  polled while an action converges, and once per resync for all services (one
  service-list call and one task-list call, filtered by our labels);
* a create returns before any task exists, and a stop or a removal before the
  task's container has stopped: every action here returns only once the tasks
  say it is done, so no name or state directory is reused while an earlier
  engine may still run in it;
* a name conflict is not always answered with 409: any failed create is
  followed by a look-up of the name, and an existing service is adopted;
* the stop grace period of a task is the one its service had when the task was
  made (Swarm reads it from the task): it is set at create from
  RTMANAGER_STOP_GRACE, and a running task cannot be given another one.

The state of a service, as ``ObservedContainer.state``:

* ``created``: never started (0 replicas since the create);
* ``restarting``: scaled up, and its task not made yet or on its way (pending,
  preparing, starting): Swarm runs it by itself once a node can take it, so it
  counts as running (a stop scales it away); ``start`` waits for it;
* ``running``: a task's container runs (also while it is being stopped);
* ``exited``: scaled to 0 after it ran, or its last task ended (complete,
  failed, rejected, shut down, or *lost*: on a node that is down);
  ``exit_code`` and ``finished_at`` are the last task's, ``node`` the node it
  ran on.

``node_lost``: the unit does not run as far as the manager can tell, and the node of its last task
(or, with no task, the node it is pinned to: ``node`` is then that one) is down, unknown or
disconnected (observed/swarm_statedir.py ``node_lost``): the engine's fate is unknown, which is not a
crash. ``node_drained`` instead when that node is up but its operator drained it (Swarm shut the
task down): not a crash, not lost either; nothing is started there until it is active again.

Errors are translated as for the Docker backend (observed/daemon.py): no answer, timeouts and 5xx ->
``BackendUnavailable``; a refused create or a task the nodes reject ->
``Refused``; an image no node has -> ``ImageMissing``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import docker
import docker.errors

from observed.daemon import DaemonClient, get_list, short_error
from observed.errors import BackendUnavailable, ImageMissing, NodeLost, NotSent, Refused
from observed.model import (
    LABEL_GAME_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ContainerSpec,
    ObservedContainer,
    admin_token_of,
    exit_code_of,
    parse_time,
)
from observed.swarm_statedir import (
    DEFAULT_HELPER_IMAGE,
    ENGINE_AS_HELPER,
    make_on_node,
    node_drained,
    node_lost,
    node_usable,
    pick_node,
)
from observed.text import safe_text

log = logging.getLogger("rtmanager.swarm")


# Task states (swarmkit's api.TaskState, lower-cased by the API).
_ON_ITS_WAY = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"})
# "lost" is ours: a task on a node that is down (Swarm goes on calling it running).
_ENDED = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove", "lost"})
_WANTED = frozenset({"running", "ready"})  # desired states of a task that should run
_NODE_GONE = frozenset({"down", "disconnected"})  # node states whose tasks are lost (not "unknown": a new manager)
_GENERIC_EXIT = re.compile(r"^task: non-zero exit \(-?\d+\)$")

POLL = 0.2          # seconds between looks at the tasks while an action converges
START_WAIT = 60.0   # a task still not running after this: refused (no node can take it)
STOP_MARGIN = 30.0  # waited beyond the grace period for a task to stop
KICK_AFTER = 3.0    # seconds after a scale-up without a task before an update is forced
GONE_WAIT = 60.0    # waited for a removed service's tasks and containers to disappear
NODE_REFRESH = 10.0  # seconds node states and addresses are trusted
NODE_REREAD = 2.0    # at least this between reads of the node list when a task names an unknown node


class SwarmBackend(DaemonClient):
    """The runtime backend port (observed/backend.py) on a Docker Swarm, through one manager."""

    name = "swarm"

    def __init__(self, *, instance: str, network: str, port: int = 8080, pool_size: int = 8,
                 timeout: float = 30.0, observer: Callable[[str, float, bool], None] | None = None,
                 guard: Callable[[], None] | None = None, probe_address: str = "hostname",
                 stop_grace: float = 10.0, start_wait: float = START_WAIT, base_url: str | None = None,
                 state_helper_image: str = "") -> None:
        if probe_address not in ("ip", "hostname", "published"):
            raise ValueError(f"probe_address must be ip, hostname or published, not {probe_address!r}")
        super().__init__(pool_size=pool_size, timeout=timeout, observer=observer, guard=guard, base_url=base_url)
        self.instance = instance
        self.network = network
        self.port = port
        self.probe_address = probe_address
        self.stop_grace = stop_grace
        self.start_wait = start_wait
        # The helper image of the state directories (observed/swarm_statedir.py): "" the default one,
        # "engine" the game's own engine image (the operator's explicit choice).
        self.state_helper_image = state_helper_image or DEFAULT_HELPER_IMAGE
        self._dirs_made: set[tuple[str, str]] = set()  # (state path, node) made by this process
        self._nodes: dict[str, dict[str, str]] = {}  # node id -> {"addr", "state", "availability"}
        self._nodes_read_at = 0.0
        self._down_check = 0.0
        self._warned_disk = False

    def _labels_filter(self, *extra: str) -> dict[str, list[str]]:
        return {"label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_INSTANCE}={self.instance}", *extra]}

    # ------------------------------------------------------------------ reads
    async def ping(self) -> None:
        """The daemon answers and is a manager of an active swarm (a plain dockerd answers 503 here)."""
        await self._call("ping", lambda: self._docker().api.inspect_swarm())

    async def list_managed(self) -> list[ObservedContainer]:
        """Every service of this instance, from one service-list and one task-list call."""
        filters = self._labels_filter()
        services = await self._call("list", lambda: get_list(self._docker().api, "/services", filters))
        tasks = await self._call("tasks", lambda: _tasks(self._docker().api, filters)) if services else []
        await self._know_nodes(tasks)
        by_service: dict[str, list[dict[str, Any]]] = {}
        for t in self._settle(tasks):
            by_service.setdefault(_str(t.get("ServiceID")), []).append(t)
        return [self._observe(s, by_service.get(s["ID"], [])) for s in services]

    async def inspect(self, name_or_id: str) -> ObservedContainer | None:
        found = await self._read(name_or_id)
        if found is None:
            return None
        service, tasks = found
        return self._observe(service, tasks)

    async def _read(self, name_or_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The service (by id or exact name) and all its tasks; None when there is no such service."""
        try:
            service = await self._call("inspect", lambda: self._docker().api.inspect_service(name_or_id))
        except docker.errors.NotFound:
            return None
        # The daemon also matches a prefix of an id: only an exact id or name is this unit.
        if name_or_id not in (service.get("ID"), (service.get("Spec") or {}).get("Name")):
            return None
        try:
            tasks = await self._service_tasks(service["ID"])
        except docker.errors.NotFound:
            return None  # removed in between
        return service, tasks

    async def _service_tasks(self, service_id: str) -> list[dict[str, Any]]:
        """The service's tasks, those on a node that is down marked lost."""
        tasks = await self._call("tasks", lambda: _tasks(self._docker().api, {"service": [service_id]}))
        await self._know_nodes(tasks)
        return self._settle(tasks)

    def _settle(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Swarm goes on calling a task on a node that is down running (with desired state shutdown): it
        is ``lost`` here, an end without an exit code. Its node's dockerd stops it if it comes back."""
        out = []
        for t in tasks:
            node = self._nodes.get(_str(t.get("NodeID")))
            if node is not None and node["state"] in _NODE_GONE and _task_state(t) not in _ENDED:
                status = dict(_obj(t.get("Status")))
                status.update(State="lost", Err=f"node {t['NodeID'][:12]} is {node['state']}", Timestamp=None,
                              ContainerStatus={k: v for k, v in _obj(status.get("ContainerStatus")).items()
                                               if k != "ExitCode"})
                t = {**t, "Status": status, "Lost": True}
            out.append(t)
        return out

    async def _know_nodes(self, tasks: Iterable[Mapping[str, Any]], force: bool = False) -> None:
        """Node states (a task on a node that is down is lost) and addresses (the published probe mode):
        one node-list call, again after NODE_REFRESH seconds, or sooner (but not more often than every
        NODE_REREAD seconds) when a task names a node not seen yet or is still running though no longer
        wanted (what Swarm shows of a task on a node that went down)."""
        age = time.monotonic() - self._nodes_read_at
        if not force and self._nodes_read_at and age < NODE_REFRESH:
            tasks = list(tasks)
            unknown = any(_str(t.get("NodeID")) and t["NodeID"] not in self._nodes for t in tasks)
            # A task Swarm no longer wants yet still calls running: its node may have gone down.
            hint = any(_task_state(t) == "running" and _desired(t) not in _WANTED for t in tasks)
            if not (unknown or hint) or age < NODE_REREAD:
                return
        nodes = await self._call("nodes", lambda: self._docker().api.nodes())
        self._nodes = {n["ID"]: _node_info(n) for n in nodes}
        self._nodes_read_at = time.monotonic()

    def _observe(self, service: Mapping[str, Any], tasks: list[dict[str, Any]]) -> ObservedContainer:
        spec = _obj(service.get("Spec"))
        template = _obj(spec.get("TaskTemplate"))
        cspec = _obj(template.get("ContainerSpec"))
        state, task = _state(service, tasks)
        # The node of the unit's last task, or (no task, or a task never placed) the node it is pinned to.
        unit_node = _str(_obj(task).get("NodeID")) or _pinned(template)
        status = _obj(_obj(task).get("Status"))
        cstatus = _obj(status.get("ContainerStatus"))
        exit_code = None
        finished_at = None
        if state == "exited" and task is not None and status.get("State") in _ENDED:
            if cstatus.get("ContainerID") and not task.get("Lost"):
                exit_code = exit_code_of(cstatus.get("ExitCode"))
            finished_at = _when(status.get("Timestamp"))
        elif state == "exited" and task is None:
            # Stopped (scaled to 0) and its tasks forgotten: the scale's time, never earlier than the engine's
            # stop, stands in for its exit (the cleanup TTL counts from the later of it and the record's stop).
            finished_at = _when(service.get("UpdatedAt"))
        ip = _task_ip(task, self.network) if task is not None else None
        address = None
        if state == "running" and task is not None:
            if self.probe_address == "hostname":
                address = _str(cspec.get("Hostname")) or _str(spec.get("Name"))
            elif self.probe_address == "ip":
                address = ip
            else:
                address = self._published(task)
        return ObservedContainer(
            id=service["ID"],
            name=_str(spec.get("Name")),
            image=_str(cspec.get("Image")).split("@", 1)[0],
            state=state,
            labels=dict(spec.get("Labels") or {}),
            created_at=_when(service.get("CreatedAt")),
            exit_code=exit_code,
            ip_address=ip,
            admin_token=admin_token_of(cspec.get("Env")),
            finished_at=finished_at,
            address=address,
            node=unit_node or None,
            node_lost=state not in ("running", "restarting") and node_lost(self._nodes.get(unit_node)),
            node_drained=state not in ("running", "restarting") and node_drained(self._nodes.get(unit_node)),
            mounts=tuple((_str(m.get("Source")), _str(m.get("Target"))) for m in map(_obj, _seq(cspec.get("Mounts")))),
        )

    async def lost_nodes(self) -> frozenset[str]:
        """The nodes that are down or unreachable (the node list, read again when older than NODE_REREAD
        seconds). Not the drained ones (``unavailable_nodes``)."""
        if time.monotonic() - self._nodes_read_at > NODE_REREAD:
            await self._know_nodes((), force=True)
        lost = frozenset(n for n, info in self._nodes.items() if node_lost(info))
        for n in lost:
            self._forget_dirs(n)  # it may come back with another disk: its directories are made again
        return lost

    def _forget_dirs(self, node: str) -> None:
        """The directories made on ``node`` by this process are no longer known to be there (the node was
        lost, or a task there was rejected: a directory deleted behind our back); the next start makes them."""
        if any(n == node for _, n in self._dirs_made):
            self._dirs_made = {(p, n) for p, n in self._dirs_made if n != node}

    async def unavailable_nodes(self) -> frozenset[str]:
        """The nodes nothing can be started on now: lost, or not ready and active (drained or paused by their
        operator: a paused node keeps its tasks, but Swarm places no new one there). A node never seen is
        not in it (the next read of the list tells)."""
        lost = await self.lost_nodes()
        return lost | frozenset(n for n, info in self._nodes.items() if not node_usable(info))

    async def placeable(self, avoid_nodes: frozenset[str], node: str | None = None) -> bool:
        """Pinned to ``node``: that node is ready and active. Else some node is, and not avoided (the node list,
        read again when older than NODE_REREAD seconds)."""
        if node:
            return node not in await self.unavailable_nodes()
        await self.lost_nodes()
        return any(node_usable(info) and n not in avoid_nodes for n, info in self._nodes.items())

    async def node_names(self) -> dict[str, str]:
        """The nodes of the Swarm, id -> hostname, read now (a drain names one)."""
        await self._know_nodes((), force=True)
        return {n: info.get("hostname", "") for n, info in self._nodes.items()}

    def _published(self, task: Mapping[str, Any]) -> str | None:
        node = self._nodes.get(_str(task.get("NodeID")))
        if node is None or not node.get("addr"):
            return None
        for p in map(_obj, _seq(_obj(_obj(task.get("Status")).get("PortStatus")).get("Ports"))):
            if p.get("TargetPort") == self.port and p.get("PublishedPort") and p.get("PublishMode") == "host":
                return f"{node['addr']}:{p['PublishedPort']}"
        return None

    async def logs_tail(self, unit_id: str, lines: int = 20) -> str:
        """The last task's last lines, and its error when Swarm says more than its exit code."""
        try:
            tasks = await self._service_tasks(unit_id)
        except (docker.errors.NotFound, docker.errors.APIError, BackendUnavailable):
            return ""
        task = _latest(tasks)
        if task is None:
            return ""
        err = str((task.get("Status") or {}).get("Err") or "")
        text = ""
        if _container_of(task) and not task.get("Lost"):  # a node that is down has no logs to give
            def logs_raw() -> bytes:
                api = self._docker().api
                res = api._get(api._url("/tasks/{0}/logs", task["ID"]),
                               params={"stdout": 1, "stderr": 1, "tail": lines}, stream=False)
                return api._get_result_tty(False, res, False)

            try:
                text = safe_text(await self._call("logs", logs_raw), 4000, keep_tail=True).strip()
            except (docker.errors.NotFound, docker.errors.APIError, BackendUnavailable):
                text = ""
        if err and not _GENERIC_EXIT.match(err):
            text = (text + "\n" if text else "") + f"swarm: {safe_text(err, 500)}"
        return text

    async def stopped_by_daemon(self, unit: ObservedContainer) -> bool:
        """Not known on Swarm: a task that ended because its node's dockerd restarted looks like a crash
        (README, Swarm backend)."""
        return False

    def events(self, on_event: Callable[[str, str], None], on_connect: Callable[[], None]) -> TaskPoller:
        return TaskPoller(client_factory=lambda: self._new_client(30), filters=self._labels_filter(),
                          loop=asyncio.get_running_loop(), on_event=on_event, on_connect=on_connect)

    # --------------------------------------------------------------- network
    async def prepare(self) -> None:
        await self.ensure_network()

    def _ensure_network_sync(self) -> None:
        api = self._docker().api
        for n in api.networks(names=[self.network]):
            if n.get("Name") != self.network:
                continue
            if n.get("Driver") != "overlay" or n.get("Scope") != "swarm":
                raise Refused(f"network {self.network} exists as a {n.get('Scope')} {n.get('Driver')} network; "
                              "the Swarm backend needs an overlay network (RTMANAGER_DOCKER_NETWORK)")
            return
        try:
            api.create_network(self.network, driver="overlay", attachable=True, check_duplicate=True,
                               labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: self.instance})
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise

    # ---------------------------------------------------------------- create
    def _service_spec(self, spec: ContainerSpec) -> dict[str, Any]:
        labels = spec.all_labels()
        mounts: list[dict[str, Any]] = [
            {"Type": "bind", "Source": spec.state_path, "Target": spec.state_target, "ReadOnly": False}]
        if spec.tmpfs_bytes:
            # Swarm mounts a tmpfs with nosuid, nodev and noexec, as the Docker backend asks explicitly.
            mounts.append({"Type": "tmpfs", "Target": "/tmp",
                           "TmpfsOptions": {"SizeBytes": spec.tmpfs_bytes, "Mode": 0o1777}})
        if spec.disk_bytes and not self._warned_disk:
            self._warned_disk = True
            log.warning("Swarm services cannot limit an engine's writable layer; engines run without that limit")
        container: dict[str, Any] = {
            "Image": spec.image,
            "Hostname": spec.name,
            "Env": [f"{k}={v}" for k, v in spec.engine_env().items()],
            "Labels": labels,
            "Mounts": mounts,
            "ReadOnly": spec.read_only,
            "StopSignal": "SIGTERM",
            "StopGracePeriod": int(max(0.0, self.stop_grace if spec.stop_grace is None else spec.stop_grace) * 1e9),
            "CapabilityDrop": ["ALL"],
            "Init": False,
        }
        if spec.user:
            container["User"] = spec.user
        template: dict[str, Any] = {
            "ContainerSpec": container,
            "Resources": {"Limits": {"NanoCPUs": spec.nano_cpus, "MemoryBytes": spec.memory_bytes,
                                     "Pids": spec.pids_limit}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "10m", "max-file": "3"}},
            "Networks": [{"Target": spec.network}],
            "ForceUpdate": 0,
        }
        # Pinned where its state is; kept off drained nodes (a pin wins over an avoidance: the state is there).
        constraints = [f"node.id=={spec.node}"] if spec.node else []
        constraints += [f"node.id!={n}" for n in sorted(set(spec.avoid_nodes)) if n and n != spec.node]
        if constraints:
            template["Placement"] = {"Constraints": constraints}
        endpoint: dict[str, Any] = {"Mode": "dnsrr"}
        if self.probe_address == "published":
            endpoint["Ports"] = [{"Protocol": "tcp", "TargetPort": self.port, "PublishMode": "host"}]
        return {
            "Name": spec.name,
            "Labels": labels,
            "TaskTemplate": template,
            "Mode": {"Replicated": {"Replicas": 0}},
            # Never two tasks of a game at once (they would share its state directory).
            "UpdateConfig": {"Parallelism": 1, "Order": "stop-first", "FailureAction": "continue"},
            "EndpointSpec": endpoint,
        }

    async def make_state_dir(self, state_root: str, spec: ContainerSpec) -> str | None:
        """Made on the node that will run the game (observed/swarm_statedir.py): its pin, or for a new game
        the node chosen for it here (returned: the caller pins the unit there). Once per directory and node
        in this process; a lost pinned node is refused at once (no helper waits for it)."""
        if spec.node and spec.node in await self.unavailable_nodes():
            raise NodeLost(f"the node {spec.node[:12]} of {spec.name} is down, unreachable, drained or "
                           "paused; its state is there")
        node = spec.node or await pick_node(self, spec)
        if (spec.state_path, node) in self._dirs_made:
            return node
        helper = spec.image if self.state_helper_image == ENGINE_AS_HELPER else self.state_helper_image
        await make_on_node(self, state_root, spec, node, helper)
        self._dirs_made.add((spec.state_path, node))
        return node

    async def create(self, spec: ContainerSpec) -> ObservedContainer:
        """Create the service with 0 replicas; if the name is taken (however Swarm says it), return what holds it.
        No pull here: the node that runs the task pulls the image itself, and a task that cannot get it
        ends the start with ImageMissing (``start``); the manager's own images say nothing of a node's."""
        body = self._service_spec(spec)

        def create_raw() -> str:
            api = self._docker().api
            res = api._post_json(api._url("/services/create"), data=body)
            return api._result(res, json=True)["ID"]

        try:
            service_id = await self._call("create", create_raw)
        except (docker.errors.APIError, BackendUnavailable) as exc:
            existing = await self.inspect(spec.name)
            if existing is not None:
                return existing
            text = exc.message if isinstance(exc, BackendUnavailable) else short_error(exc)
            if "network" in text.lower() and "not found" in text.lower():
                self._network_ready = False  # deleted behind our back: create it again next time
                raise BackendUnavailable(f"create {spec.name}: {text}") from exc
            if isinstance(exc, BackendUnavailable):
                raise
            raise Refused(f"create {spec.name}: {text}") from exc
        found = await self.inspect(service_id)
        if found is None:
            raise Refused(f"service {spec.name} vanished right after create")
        return found

    # --------------------------------------------------------------- actions
    async def _update(self, service_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Read the spec, change it, write it back at that version (again when another writer came first)."""
        for attempt in range(5):
            try:
                service = await self._call("inspect", lambda: self._docker().api.inspect_service(service_id))
            except docker.errors.NotFound as exc:
                raise Refused(f"service {service_id[:12]} is gone") from exc
            spec = service["Spec"]
            change(spec)
            version = service["Version"]["Index"]

            def update_raw(spec: dict[str, Any] = spec, version: int = version) -> None:
                api = self._docker().api
                res = api._post_json(api._url("/services/{0}/update", service_id), data=spec,
                                     params={"version": version})
                api._result(res, json=True)

            try:
                await self._call("update", update_raw)
                return
            except (docker.errors.APIError, BackendUnavailable) as exc:
                if "out of sequence" in str(exc).lower() and attempt < 4:
                    continue
                if isinstance(exc, docker.errors.NotFound):
                    raise Refused(f"service {service_id[:12]} is gone") from exc
                if isinstance(exc, docker.errors.APIError):
                    raise Refused(f"update {service_id[:12]}: {short_error(exc)}") from exc
                raise

    async def start(self, unit_id: str) -> None:
        """Scale to 1, or force a new task when the one task has ended; return once a task runs or ended."""
        found = await self._read(unit_id)
        if found is None:
            raise Refused(f"start: service {unit_id[:12]} is gone")
        service, tasks = found
        pinned = _pinned(service["Spec"].get("TaskTemplate") or {})
        if pinned and pinned in await self.unavailable_nodes():
            # Its task could only wait for the node (START_WAIT, holding a reconcile worker): refused now.
            raise NodeLost(f"start {_name(service)}: its node {pinned[:12]} is down, unreachable, drained or "
                           "paused")
        if any(_leaving(t) for t in tasks):
            # A task still being stopped or removed: a new one must not run next to it (they share the state
            # directory), and Swarm makes no new task for a slot whose old task it has not forgotten yet.
            await self._until_stopped(service, self.start_wait, _leaving)
            tasks = await self._service_tasks(unit_id)
        before = {t["ID"] for t in tasks if _task_state(t) in _ENDED}
        latest = _latest(tasks)
        if _replicas(service) in (0, None):  # None: no count; it is made one
            await self._update(unit_id, lambda s: _set_replicas(s, 1))
        elif latest is not None and _task_state(latest) in _ENDED:
            await self._update(unit_id, _force_update)
        loop = asyncio.get_running_loop()
        started = loop.time()
        kicked = False
        last: dict[str, Any] | None = None
        while True:
            try:
                tasks = await self._service_tasks(unit_id)
            except docker.errors.NotFound as exc:
                raise Refused(f"start: service {unit_id[:12]} was removed") from exc
            task = _latest([t for t in tasks if t["ID"] not in before])
            if task is not None:
                last = task
                st = _task_state(task)
                if st == "running" or (st in _ENDED and _container_of(task)):
                    # It runs, or it ran and ended (inspect tells which, with the exit code). Either way its
                    # state directory is on that node now: keep the game there.
                    await self._pin(service, str(task.get("NodeID") or ""))
                    return
                if st in _ENDED:
                    # Rejected (a bind source gone from the node, say): the game's directory is made again
                    # by the next start, not taken for granted.
                    self._forget_dirs(str(task.get("NodeID") or ""))
                    raise _refusal(task, service)
            elif not kicked and loop.time() - started > KICK_AFTER:
                # Scaled up, and still no task: Swarm sometimes misses a scale-up; a forced update makes the task.
                kicked = True
                log.info("service %s: no task %gs after the scale-up; forcing an update", _name(service), KICK_AFTER)
                await self._update(unit_id, _force_update)
            if loop.time() - started > self.start_wait:
                what = (f"{_task_state(last)}: {_task_message(last)}" if last is not None else "no task was made")
                raise Refused(f"start {_name(service)}: no task running after {self.start_wait:g}s ({what})")
            await asyncio.sleep(POLL)

    async def _pin(self, service: Mapping[str, Any], node: str) -> None:
        """Constrain the service to ``node`` unless it is constrained to a node already. Swarm does not
        restart a task that still fits its new constraints."""
        placement = (service["Spec"].get("TaskTemplate") or {}).get("Placement") or {}
        if not node or any(c.replace(" ", "").startswith("node.id==") for c in placement.get("Constraints") or []):
            return

        def add(spec: dict[str, Any]) -> None:
            place = spec.setdefault("TaskTemplate", {}).setdefault("Placement", {})
            constraints = [c for c in place.get("Constraints") or [] if not c.replace(" ", "").startswith("node.id==")]
            place["Constraints"] = [*constraints, f"node.id=={node}"]

        await self._update(service["ID"], add)
        log.info("service %s pinned to node %s", _name(service), node)

    async def stop(self, unit_id: str, grace: float) -> None:
        """Scale to 0 (SIGTERM, then SIGKILL after the task's grace period); return once no task runs and
        Swarm has forgotten the tasks it scaled away (their containers are removed with them)."""
        found = await self._read(unit_id)
        if found is None:
            return
        service, tasks = found
        if _replicas(service) != 0:
            await self._update(unit_id, lambda s: _set_replicas(s, 0))
        own_grace = int(((service["Spec"].get("TaskTemplate") or {}).get("ContainerSpec") or {})
                        .get("StopGracePeriod") or 0) / 1e9
        try:
            await self._until_stopped(service, max(grace, own_grace) + STOP_MARGIN, _not_done)
        except NotSent as exc:  # the scale-down went out (now or before): not a stop that sent nothing
            raise BackendUnavailable(exc.message) from exc

    async def _until_stopped(self, service: Mapping[str, Any], timeout: float,
                             blocking: Callable[[Mapping[str, Any]], bool]) -> None:
        """Until no task of the service is ``blocking``. A task on a node that is down (lost) cannot be
        stopped from here: it is not waited for, with a warning; the node list is read again when a wait
        lasts, in case a node went down meanwhile."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        warned = False
        while True:
            try:
                tasks = await self._service_tasks(service["ID"])
            except docker.errors.NotFound:
                return
            if not warned and any(t.get("Lost") for t in tasks):
                warned = True
                log.warning("service %s: a task of it is on a node that is down; not waiting for it", _name(service))
            left = [t for t in tasks if blocking(t) and not t.get("Lost")]
            if not left:
                return
            waited = loop.time() - started
            if waited > min(timeout, 10.0) and loop.time() - self._down_check > 5.0:
                self._down_check = loop.time()
                await self._know_nodes(left, force=True)  # a node that went down meanwhile
            if waited > timeout:
                raise BackendUnavailable(f"stop {_name(service)}: task still {_task_state(left[0])} after "
                                         f"{timeout:g}s")
            await asyncio.sleep(POLL)

    async def remove(self, unit_id: str, grace: float) -> None:
        """Stop gracefully, remove the service, and return once no task or container of it is left."""
        found = await self._read(unit_id)
        if found is None:
            return
        service, _ = found
        await self.stop(service["ID"], grace)
        try:
            try:
                await self._call("remove", lambda: self._docker().api.remove_service(service["ID"]))
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                raise BackendUnavailable(f"remove {_name(service)}: {short_error(exc)}") from exc
            await self._until_gone(service)
        except NotSent as exc:  # the stop went out: not a removal that sent nothing
            raise BackendUnavailable(exc.message) from exc

    async def _until_gone(self, service: Mapping[str, Any]) -> None:
        """Swarm forgets a removed service's tasks before their containers are removed: wait for both (the
        containers as far as the daemon we talk to can see: its own node's)."""
        game = (service["Spec"].get("Labels") or {}).get(LABEL_GAME_ID, "")
        filters = self._labels_filter(f"{LABEL_GAME_ID}={game}")
        by_service = {"label": [f"com.docker.swarm.service.id={service['ID']}"]}
        deadline = asyncio.get_running_loop().time() + GONE_WAIT
        while True:
            tasks = await self._call("tasks", lambda: _tasks(self._docker().api, filters))
            await self._know_nodes(tasks)
            left = [t for t in self._settle(tasks) if t.get("ServiceID") == service["ID"] and not t.get("Lost")]
            if not left:
                containers = await self._call("list", lambda: self._docker().api.containers(
                    all=True, filters=by_service))
                if not containers:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise BackendUnavailable(f"remove {_name(service)}: its tasks or containers are still there "
                                         f"after {GONE_WAIT:g}s")
            await asyncio.sleep(POLL)


# ------------------------------------------------------------------------- tasks -> state
# A manager's answers are read as the Docker backend reads dockerd's (observed/model.py): a field of another
# type than the API's is unknown, so one odd task or service fails neither the list nor any other game's
# round. Only a service's labels are taken as they are (``dict``): labels that are no object fail the call,
# rather than strip a unit of the labels that say whose it is.
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else _EMPTY


def _seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0  # not a bool, a float or a string


def _tasks(api: docker.APIClient, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The tasks the filters select, without the elements that are no object (nothing of them can be read)."""
    return [t for t in get_list(api, "/tasks", filters) if isinstance(t, dict)]


def _task_state(task: Mapping[str, Any]) -> str:
    return _str(_obj(task.get("Status")).get("State"))


def _desired(task: Mapping[str, Any]) -> str:
    return _str(task.get("DesiredState"))


def _not_done(task: Mapping[str, Any]) -> bool:
    """May still run, or is still to be removed (by a scale-down): not yet gone."""
    return _task_state(task) not in _ENDED or _desired(task) == "remove"


def _leaving(task: Mapping[str, Any]) -> bool:
    """Being stopped or removed, and not gone yet."""
    return _not_done(task) and _desired(task) not in _WANTED


def _container_of(task: Mapping[str, Any]) -> str:
    return _str(_obj(_obj(task.get("Status")).get("ContainerStatus")).get("ContainerID"))


def _task_message(task: Mapping[str, Any]) -> str:
    status = _obj(task.get("Status"))
    return safe_text(str(status.get("Err") or status.get("Message") or ""), 300)


def _refusal(task: Mapping[str, Any], service: Mapping[str, Any]) -> Exception:
    message = _task_message(task)
    if "no such image" in message.lower() or "pull access denied" in message.lower():
        image = ((service["Spec"].get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image", "")
        return ImageMissing(f"image {image} is missing on node {str(task.get('NodeID', ''))[:12]}: {message}")
    return Refused(f"start {_name(service)}: task {_task_state(task)}: {message}")


def _pinned(template: Mapping[str, Any]) -> str:
    """The node a task template is pinned to (``node.id==``), or ""."""
    for c in _seq(_obj(template.get("Placement")).get("Constraints")):
        c = _str(c).replace(" ", "")
        if c.startswith("node.id=="):
            return c[len("node.id=="):]
    return ""


def _name(service: Mapping[str, Any]) -> str:
    return _str(_obj(service.get("Spec")).get("Name")) or _str(service.get("ID"))[:12]


def _replicas(service: Mapping[str, Any]) -> int | None:
    """The replicas the service asks for; None when that is no count: it may run (a stop scales it to 0,
    a start to 1)."""
    value = _obj(_obj(_obj(service.get("Spec")).get("Mode")).get("Replicated")).get("Replicas")
    return value if type(value) is int and value >= 0 else None


def _set_replicas(spec: dict[str, Any], n: int) -> None:
    spec["Mode"] = {"Replicated": {"Replicas": n}}


def _force_update(spec: dict[str, Any]) -> None:
    template = spec.setdefault("TaskTemplate", {})
    template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1


def _latest(tasks: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The task that tells the state: the newest of those meant to run, else the newest."""
    every = list(tasks)
    wanted = [t for t in every if _desired(t) in _WANTED]
    pool = wanted or every
    if not pool:
        return None
    newest = max(pool, key=lambda t: (_when(t.get("CreatedAt")) or datetime.min.replace(tzinfo=UTC),
                                      _count(_obj(t.get("Version")).get("Index"))))
    return dict(newest)


def _state(service: Mapping[str, Any], tasks: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    running = [t for t in tasks if _task_state(t) == "running"]
    if running:
        return "running", _latest(running)
    latest = _latest(tasks)
    if latest is None:
        if _replicas(service) != 0:
            return "restarting", None  # scaled up, its task not made yet: Swarm makes and runs it by itself
        # Never ran (0 replicas since the create), or stopped and its tasks already forgotten: an update
        # (the scale to 0) leaves a previous spec.
        return ("exited" if service.get("PreviousSpec") else "created"), None
    st = _task_state(latest)
    if st in _ON_ITS_WAY and _desired(latest) in _WANTED:
        # Swarm will run it by itself as soon as a node can take it: it has to be stopped like a running one.
        return "restarting", latest
    return "exited", latest


def _task_ip(task: Mapping[str, Any], network: str) -> str | None:
    for att in map(_obj, _seq(task.get("NetworksAttachments"))):
        if _obj(_obj(att.get("Network")).get("Spec")).get("Name") == network:
            for addr in _seq(att.get("Addresses")):
                return _str(addr).split("/", 1)[0] or None
    return None


def _node_info(node: Mapping[str, Any]) -> dict[str, str]:
    status = node.get("Status") or {}
    addr = str(status.get("Addr") or "")
    if addr in ("", "0.0.0.0"):  # a manager may report 0.0.0.0 here; its manager address is right
        addr = str((node.get("ManagerStatus") or {}).get("Addr") or "").rsplit(":", 1)[0]
    return {"addr": addr, "state": str(status.get("State") or ""),
            "availability": str((node.get("Spec") or {}).get("Availability") or ""),
            "hostname": str((node.get("Description") or {}).get("Hostname") or "")}


def _when(value: Any) -> datetime | None:
    """A time of Swarm's: an odd one (no zone, far away, garbage) is unknown (observed/model.py)."""
    return parse_time(value)


# ------------------------------------------------------------------------- events
class TaskPoller:
    """What stands in for an event stream on Swarm (it has no task events): the tasks of this instance,
    listed every ``interval`` seconds in one call. A game whose newest task changed (a new task, another
    state, gone) is reported with ``on_event(game_id, state)``. ``on_connect`` runs after every
    (re)start of polling (the first answer, an answer after failures, ``reconnect``): relist then."""

    def __init__(self, *, client_factory: Callable[[], docker.DockerClient], filters: dict[str, list[str]],
                 loop: asyncio.AbstractEventLoop, on_event: Callable[[str, str], None],
                 on_connect: Callable[[], None], interval: float = 1.0) -> None:
        self._factory = client_factory
        self._filters = filters
        self._loop = loop
        self._on_event = on_event
        self._on_connect = on_connect
        self.interval = interval
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._fresh = True  # the next answer starts a new "connection"
        self._thread = threading.Thread(target=self._run, name="swarm-tasks", daemon=True)
        self.connected = False
        self.connects = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def reconnect(self) -> None:
        self._fresh = True
        self._wake.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _snapshot(self, tasks: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
        per_service: dict[str, list[dict[str, Any]]] = {}
        for t in tasks:
            if isinstance(t, dict):
                per_service.setdefault(_str(t.get("ServiceID")), []).append(t)
        out: dict[str, tuple[str, str, str]] = {}
        for ts in per_service.values():
            latest = _latest(ts)
            if latest is None:
                continue
            game = _str(_obj(_obj(_obj(latest.get("Spec")).get("ContainerSpec")).get("Labels")).get(LABEL_GAME_ID))
            if game:
                out[game] = (_str(latest.get("ID")), _task_state(latest), _desired(latest))
        return out

    def _run(self) -> None:
        client = None
        last: dict[str, tuple[str, str, str]] = {}
        delay = self.interval
        while not self._stopping.is_set():
            try:
                if client is None:
                    client = self._factory()
                snapshot = self._snapshot(get_list(client.api, "/tasks", self._filters))
                if self._fresh or not self.connected:
                    self._fresh = False
                    self.connected = True
                    self.connects += 1
                    self._loop.call_soon_threadsafe(self._on_connect)
                else:
                    for game in set(last) | set(snapshot):
                        if last.get(game) != snapshot.get(game):
                            state = snapshot[game][1] if game in snapshot else "gone"
                            self._loop.call_soon_threadsafe(self._on_event, game, state)
                last = snapshot
                delay = self.interval
            except Exception as exc:  # noqa: BLE001 - any failure: poll again, then relist
                if self._stopping.is_set():
                    break
                if self.connected:
                    log.warning("swarm task poll failed, trying again in %.1fs: %s", delay, exc)
                self.connected = False
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001
                        pass
                    client = None
                delay = min(max(delay * 2, 0.5), 10.0)
            self._wake.wait(delay)
            self._wake.clear()
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
