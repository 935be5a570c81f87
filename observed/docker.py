"""The Docker backend (one Docker host), on the shared docker-py plumbing of ``observed.daemon``
(a bounded thread pool; connection failures, timeouts and 5xx answers -> ``BackendUnavailable``;
an image neither present nor pullable -> ``ImageMissing``). Create or start refused by the
daemon -> ``Refused``.

Every way of taking an engine down (stop, and remove of a unit that still runs)
sends SIGTERM and waits the grace period before docker kills it: engines save
their state on SIGTERM.

Create is idempotent through the deterministic name: a 409 conflict means the
container exists already (an earlier attempt whose answer was lost), and the
existing container is returned for the caller to adopt or replace.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import docker
import docker.errors
import docker.types
import requests.exceptions

from observed import restarts
from observed.daemon import DaemonClient, get_list, short_error
from observed.errors import BackendUnavailable, ImageMissing, NotSent, Refused
from observed.events import REMOVING, STARTING, STOPPING, Echoes, EventWatcher
from observed.model import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ContainerSpec,
    ObservedContainer,
    created,
    from_inspect,
    from_list_entry,
    parse_time,
)
from observed.restarts import Gap
from observed.text import safe_text

log = logging.getLogger("rtmanager.docker")

ACCEPT_TIMEOUT = 5  # seconds a new connection to the daemon may take to be answered
RUNNING_LOOKS = 3  # running engines inspected for one that outlived an exit
CLOCK_TTL = timedelta(seconds=60)  # how long a measured difference of the daemon's clock from ours is used
NAME_RACE_LOOKS = 30  # 0.1 s apart: how long a lost name race waits to see the winner


class DockerBackend(DaemonClient):
    """The runtime backend port (observed/backend.py) on one Docker host."""

    name = "docker"

    def __init__(self, *, instance: str, network: str, pool_size: int = 8, timeout: float = 30.0,
                 observer: Callable[[str, float, bool], None] | None = None,
                 guard: Callable[[], None] | None = None, probe_address: str = "ip") -> None:
        super().__init__(pool_size=pool_size, timeout=timeout, observer=observer, guard=guard)
        self.instance = instance
        self.probe_address = probe_address  # ip: the container's IP; hostname: its name on the network
        self.network = network
        self.disk_quota: bool | None = None  # whether the storage driver takes a writable-layer size limit
        self._unreachable_since: datetime | None = None
        self.daemon_gaps: collections.deque[Gap] = collections.deque(maxlen=32)
        self._stream_since: datetime | None = None  # the event stream connected without a break since
        self._accepted_at: datetime | None = None  # when a probe last found the daemon accepting connections
        self._stopping_since: datetime | None = None  # a probe found it refusing them (stopping, or away)
        self._clock: tuple[datetime, tuple[timedelta, timedelta]] | None = None  # when measured, difference
        self.echoes = Echoes()  # the events our own starts, stops and removals cause

    # ------------------------------------------------------------------ reads
    async def ping(self) -> None:
        await self._call("ping", lambda: self._docker().ping())

    async def list_managed(self) -> list[ObservedContainer]:
        """Every container of this instance, running or not, in one API call."""
        filters = {"label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_INSTANCE}={self.instance}"]}

        network, probe_address = self.network, self.probe_address

        def list_parsed() -> list[ObservedContainer]:
            # Parsed in the call's thread, not on the event loop: at 100,000 units the parse alone held
            # the loop for seconds (a lease renewal waits as long).
            return get_list(self._docker().api, "/containers/json", filters, all=1,
                            each=lambda attrs: from_list_entry(attrs, network, probe_address=probe_address))

        return await self._call("list", list_parsed)

    async def inspect(self, name_or_id: str) -> ObservedContainer | None:
        try:
            attrs = await self._call("inspect", lambda: self._docker().api.inspect_container(name_or_id))
        except docker.errors.NotFound:
            return None
        return from_inspect(attrs, self.network, probe_address=self.probe_address)

    async def logs_tail(self, name_or_id: str, lines: int = 20) -> str:
        """The engine's last lines, as safe text (engines print anything, NUL included)."""
        try:
            raw = await self._call("logs", lambda: self._docker().api.logs(
                name_or_id, stdout=True, stderr=True, tail=lines))
        except (docker.errors.NotFound, docker.errors.APIError, BackendUnavailable):
            return ""
        return safe_text(raw, 4000, keep_tail=True).strip()

    def events(self, on_event: Callable[[str, str], None], on_connect: Callable[[], None]) -> EventWatcher:
        def connected() -> None:
            self._stream_connected()
            on_connect()

        return EventWatcher(instance=self.instance, loop=asyncio.get_running_loop(), on_event=on_event,
                            on_connect=connected, on_lost=self._stream_lost, echoes=self.echoes)

    # ------------------------------------------------------- daemon restarts
    def _unreachable(self) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = datetime.now(UTC)

    def _reachable(self) -> None:
        if self._unreachable_since is not None:
            self.daemon_gaps.append(Gap(self._unreachable_since, datetime.now(UTC)))
            self._unreachable_since = None

    def _stream_connected(self) -> None:
        self._stream_since = datetime.now(UTC)
        self._stopping_since = None  # a new connection was accepted
        self._reachable()

    def _stream_lost(self, daemon: bool) -> None:
        """The event stream ended: from now on it vouches for nothing; a gap opens if the daemon
        ended it (not when this process dropped it itself)."""
        self._stream_since = None
        if daemon:
            self._unreachable()

    def _accepts_connections(self) -> bool:
        """The daemon accepts a new connection now: a daemon that is stopping closes its socket
        first, while it goes on answering on the connections it had (the pooled client's)."""
        client = None
        try:
            client = self._new_client(ACCEPT_TIMEOUT)  # asks the daemon for its API version
            return bool(client.ping())
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
            return False
        finally:
            if client is not None:
                client.close()

    async def _probe(self) -> bool:
        """Whether the daemon accepts a new connection now; a refusal opens a gap, and until a new
        connection is accepted again nothing is created or started (a stopping daemon still starts
        a container on a connection it had, and leaves it half there)."""
        probed = datetime.now(UTC)
        if await asyncio.get_running_loop().run_in_executor(self._executor, self._accepts_connections):
            self._accepted_at, self._stopping_since = probed, None
            return True
        self._stopping_since = self._stopping_since or probed
        self._unreachable()
        return False

    async def _not_while_stopping(self, op: str) -> None:
        if self._stopping_since is not None and not await self._probe():
            raise BackendUnavailable(f"docker {op}: the daemon is stopping or away (it refuses new connections)")

    async def stopped_by_daemon(self, container: ObservedContainer) -> bool:
        """The engine was stopped by a restart of the daemon (without live-restore every container
        stops with it), not by a crash: decided from the daemon's lifecycle, whatever the exit code
        (observed/restarts.py)."""
        # Without the clocks' difference nothing of ours can be put on the daemon's clock.
        clock = await self._clock_difference()
        accepting = self._accepted_after(container.finished_at, clock) or await self._probe()

        def decide(started_before: bool | None = None) -> bool | None:
            now = datetime.now(UTC)
            gaps = list(self.daemon_gaps)
            if self._unreachable_since is not None:
                gaps.append(Gap(self._unreachable_since))
            return restarts.stopped_by_daemon(
                container.finished_at, gaps=gaps, now=now, accepting=accepting, stream_since=self._stream_since,
                clock=clock[0] if clock else None, started_before=started_before,
                clock_slack=restarts.CLOCK_SLACK + (clock[1] if clock else timedelta()))

        verdict = decide()
        if verdict is None:
            try:
                verdict = decide(await self._engine_runs_since(container.finished_at))
            except BackendUnavailable:
                verdict = decide()  # the daemon went away meanwhile: the gap that opened decides
        return bool(verdict)

    def _accepted_after(self, when: datetime | None, clock: tuple[timedelta, timedelta] | None) -> bool:
        """A new connection was accepted after ``when`` (the daemon's clock): the daemon was not
        stopping then. One probe after a daemon restart serves every engine it stopped."""
        if when is None or clock is None or self._accepted_at is None:
            return False
        return when - clock[0] + clock[1] + restarts.CLOCK_SLACK < self._accepted_at

    async def _clock_difference(self) -> tuple[timedelta, timedelta] | None:
        """The daemon's clock minus ours (its SystemTime against the middle of the call), and how far
        off that may be; None when the daemon does not say. Asked again after CLOCK_TTL."""
        if self._clock is not None and datetime.now(UTC) - self._clock[0] < CLOCK_TTL:
            return self._clock[1]
        before = datetime.now(UTC)
        try:
            info = await self._call("info", lambda: self._docker().api.info())
        except (BackendUnavailable, docker.errors.APIError):
            return None
        after = datetime.now(UTC)
        theirs = parse_time(info.get("SystemTime")) if isinstance(info, dict) else None
        if theirs is None:
            return None
        clock = theirs - (before + (after - before) / 2), (after - before) / 2
        self._clock = after, clock
        return clock

    async def _engine_runs_since(self, when: datetime | None) -> bool:
        """An engine of this instance that still runs was started before ``when``."""
        if when is None:
            return False
        older = sorted((c for c in await self.list_managed() if c.running and c.created_at and c.created_at < when),
                       key=lambda c: c.created_at or when)
        for c in older[:RUNNING_LOOKS]:
            seen = await self.inspect(c.id)
            if seen is not None and seen.running and seen.started_at is not None and seen.started_at < when:
                return True
        return False

    # ---------------------------------------------------------------- actions
    async def prepare(self) -> None:
        await self.ensure_network()

    def _ensure_network_sync(self) -> None:
        api = self._docker().api
        # names= matches substrings: check the exact name.
        if any(n.get("Name") == self.network for n in api.networks(names=[self.network])):
            return
        try:
            api.create_network(self.network, driver="bridge", check_duplicate=True,
                               labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: self.instance})
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise

    async def make_state_dir(self, state_root: str, spec: ContainerSpec) -> str | None:
        """On this host, where every engine runs."""
        await asyncio.to_thread(ensure_state_dir, state_root, spec.state_path, *user_ids(spec.user))
        return None

    async def lost_nodes(self) -> frozenset[str]:
        return frozenset()  # one host, no nodes

    async def placeable(self, avoid_nodes: frozenset[str], node: str | None = None) -> bool:
        return True  # one host: every unit runs here

    async def create(self, spec: ContainerSpec) -> ObservedContainer:
        """Create the container for ``spec``; if the name is taken, return what holds it."""
        await self._not_while_stopping("create")
        host_config = dict(
            network_mode=spec.network,
            mounts=[docker.types.Mount(target=spec.state_target, source=spec.state_path, type="bind",
                                       read_only=False)],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            privileged=False,
            pids_limit=spec.pids_limit,
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=spec.nano_cpus,
            restart_policy={"Name": "no"},
            init=False,
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
            read_only=spec.read_only,
        )
        if spec.tmpfs_bytes:
            host_config["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,noexec,size={spec.tmpfs_bytes}"}

        def create_raw() -> str:
            api = self._docker().api
            nc = api.create_networking_config({spec.network: api.create_endpoint_config(aliases=[spec.name])})
            disk = {"size": str(spec.disk_bytes)} if spec.disk_bytes and self.disk_quota is not False else None
            while True:
                hc = api.create_host_config(**host_config, **({"storage_opt": disk} if disk else {}))
                try:
                    created = api.create_container(
                        image=spec.image, name=spec.name, hostname=spec.name, labels=spec.all_labels(),
                        environment=spec.engine_env(), host_config=hc, networking_config=nc, user=spec.user,
                        detach=True, stop_timeout=None if spec.stop_grace is None else math.ceil(spec.stop_grace),
                    )
                    if disk:
                        self.disk_quota = True
                    return created["Id"]
                except docker.errors.APIError as exc:
                    if not disk or "storage-opt" not in str(exc).lower():
                        raise
                    # Only some storage drivers can cap the writable layer (overlay2 on xfs with pquota).
                    log.warning("this Docker host cannot limit an engine's writable layer (%s); engines run "
                                "without that limit", short_error(exc))
                    self.disk_quota, disk = False, None

        pulled = False
        while True:
            try:
                container_id = await self._call("create", create_raw)
                break
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    existing = await self._holder_of(spec.name)
                    if existing is not None:
                        return existing
                # The daemon's own words decide (str(exc) carries the request's URL, and so the game's name).
                missing_image = isinstance(exc, docker.errors.ImageNotFound)
                if exc.status_code == 404 and not missing_image and "network" in str(exc.explanation).lower():
                    self._network_ready = False  # deleted behind our back: create it again next time
                    raise BackendUnavailable(f"create {spec.name}: {short_error(exc)}") from exc
                if missing_image and not pulled:
                    # No such image: pulled once (ImageMissing when it cannot be), then created again. As
                    # `docker run` does: a start of a present image asks nothing about it first.
                    await self.ensure_image(spec.image)
                    pulled = True
                    continue
                if exc.status_code == 404:
                    raise ImageMissing(f"image {spec.image}: {short_error(exc)}") from exc
                raise Refused(f"create {spec.name}: {short_error(exc)}") from exc
        # What the create made is what the spec says: no inspect (the start's caller inspects it then).
        return created(container_id, spec)

    async def _holder_of(self, name: str) -> ObservedContainer | None:
        """The container holding ``name`` after a create lost the name to another: Docker reserves a
        name (and answers 409) a moment before that container can be inspected by it."""
        for _ in range(NAME_RACE_LOOKS):
            existing = await self.inspect(name)
            if existing is not None:
                return existing
            await asyncio.sleep(0.1)
        return None

    async def start(self, container_id: str) -> None:
        await self._not_while_stopping("start")
        for attempt in (1, 2):
            try:
                with self.echoes.expect(container_id, STARTING):
                    await self._call("start", lambda: self._docker().api.start(container_id))
                return
            except docker.errors.NotFound as exc:
                if "network" not in str(exc.explanation).lower():
                    raise Refused(f"start: container {container_id[:12]} is gone") from exc
                # The game network was deleted behind our back (a create on it still succeeds): made again,
                # and the start tried once more (a container that never ran finds a network of its name
                # made since; one that ran before keeps the old network's id, and is refused again).
                self._network_ready = False
                if attempt == 2:
                    raise Refused(f"start {container_id[:12]}: {short_error(exc)} (its game network was made "
                                  "again since it last ran)") from exc
                log.warning("the game network %s is gone; making it again", self.network)
                await self.ensure_network()
            except docker.errors.APIError as exc:
                raise Refused(f"start {container_id[:12]}: {short_error(exc)}") from exc

    async def stop(self, container_id: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (docker's own stop)."""
        def stop_raw() -> None:
            api = self._docker().api
            try:
                api.stop(container_id, timeout=max(0, math.ceil(grace)))
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "paused" in str(exc).lower():
                    api.unpause(container_id)  # a paused process cannot take SIGTERM
                    api.stop(container_id, timeout=max(0, math.ceil(grace)))
                else:
                    raise

        try:
            with self.echoes.expect(container_id, STOPPING):
                await self._call("stop", stop_raw)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 304:  # already stopped
                return
            raise BackendUnavailable(f"stop {container_id[:12]}: {short_error(exc)}") from exc

    async def remove(self, container_id: str, grace: float) -> None:
        """Stop gracefully first (a forced remove would SIGKILL a running engine), then remove."""
        with self.echoes.expect(container_id, REMOVING):
            await self.stop(container_id, grace)
            try:
                await self._call("remove", lambda: self._docker().api.remove_container(container_id, force=True))
            except docker.errors.NotFound:
                return
            except NotSent as exc:  # the stop went out: not a call that sent nothing
                raise BackendUnavailable(exc.message) from exc
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in str(exc):
                    return
                raise BackendUnavailable(f"remove {container_id[:12]}: {short_error(exc)}") from exc


def user_ids(user: str | None) -> tuple[int | None, int | None]:
    """(uid, gid) of an engine user ``uid[:gid]`` (RTMANAGER_ENGINE_USER), None where the image decides."""
    if not user:
        return None, None
    uid, _, gid = user.partition(":")
    return int(uid), int(gid) if gid else None


def ensure_state_dir(state_root: str, path: str, uid: int | None = None, gid: int | None = None) -> None:
    """Create a game's state directory with 0700, refusing anything but a real directory.

    The controller never follows a symlink here: a container that can write into
    its state directory could plant one pointing anywhere on the host.
    """
    root = os.path.abspath(state_root)
    if os.path.dirname(os.path.abspath(path)) != root:
        raise Refused(f"state path {path} is not directly under {root}")
    os.makedirs(root, mode=0o711, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"state path {path} exists and is not a directory")
    if (uid is not None and st.st_uid != uid) or (gid is not None and st.st_gid != gid):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        except PermissionError as exc:
            raise Refused(f"cannot give the state directory {path} to the engine user {uid}:{gid} (rtmanager runs "
                          f"as uid {os.getuid()}): run rtmanager as root, or set RTMANAGER_ENGINE_USER to its "
                          "own uid") from exc
        finally:
            os.close(fd)
