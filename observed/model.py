"""What Docker really runs, as plain values parsed at the adapter boundary.

A managed container is recognised by its labels, never by its name alone: a
container called ``galaxy-game-x`` without our labels belongs to somebody else
and is left alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

LABEL_MANAGED_BY = "com.galaxy.managed-by"
LABEL_INSTANCE = "com.galaxy.instance"
LABEL_GAME_ID = "com.galaxy.game-id"
LABEL_SPEC_HASH = "com.galaxy.spec-hash"
LABEL_GENERATION = "com.galaxy.generation"
# Which database (its identity uid) and which leadership term created the unit: only a unit
# provably created under this database may be disposed of as an orphan.
LABEL_DATABASE = "com.galaxy.database"
LABEL_EPOCH = "com.galaxy.epoch"
MANAGED_BY = "rtmanager"
# The unit's admin secret travels only in its environment: never in a label, never in the spec hash.
ADMIN_TOKEN_ENV = "ENGINE_ADMIN_TOKEN"

_EXITED_STATUS = re.compile(r"Exited \((-?\d+)\)")
_RUNNING_STATES = ("running", "restarting", "paused")  # a live process (a paused one too)


@dataclass(frozen=True, kw_only=True)
class ContainerSpec:
    """Everything rtmanager decides about a container; hashed into a label to detect drift."""

    name: str
    image: str
    game_id: str
    instance: str
    network: str
    state_path: str
    state_target: str
    env: Mapping[str, str]
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    generation: int
    spec_revision: int
    user: str | None = None
    # Pinned to this node (a Swarm backend keeps a game where its state is). Not part of the hash:
    # the pin is learnt after the first start and applies to the units created after it.
    node: str | None = None
    # Nodes the unit must not be placed on (a Swarm backend makes each a ``node.id!=`` constraint; the
    # Docker backend has one host and ignores it): drained nodes, and the node a game is moved off.
    # Not part of the hash, like ``node``: it applies to the units created after it changed (a move
    # changes the spec revision, which is).
    avoid_nodes: tuple[str, ...] = ()
    read_only: bool = False
    tmpfs_bytes: int = 0
    disk_bytes: int = 0
    database: str = ""
    epoch: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    # Seconds between SIGTERM and SIGKILL for this engine (its version's, else RTMANAGER_STOP_GRACE;
    # None: the backend's own). Not part of the hash: a new grace must not replace a running engine;
    # a Swarm service keeps the one it was created with.
    stop_grace: float | None = None
    # New with each unit (recorded before the create); not part of the hash, or every restart of
    # rtmanager would recreate every engine.
    admin_token: str = field(default="", repr=False)

    def engine_env(self) -> dict[str, str]:
        """The unit's environment: ``env`` and, when there is one, the admin token."""
        env = {k: v for k, v in self.env.items() if k != ADMIN_TOKEN_ENV}
        if self.admin_token:
            env[ADMIN_TOKEN_ENV] = self.admin_token
        return env

    @property
    def spec_hash(self) -> str:
        # The generation is not part of the hash: a new generation that asks for
        # the same container (a stop then a start) reuses it.
        body = json.dumps({
            "image": self.image, "network": self.network, "state_path": self.state_path,
            "state_target": self.state_target, "env": dict(sorted(self.env.items())),
            "memory": self.memory_bytes, "cpus": self.nano_cpus, "pids": self.pids_limit,
            "rev": self.spec_revision, "user": self.user,
            **({"isolation": [self.read_only, self.tmpfs_bytes, self.disk_bytes]}
               if (self.read_only or self.tmpfs_bytes or self.disk_bytes) else {}),
        }, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def all_labels(self) -> dict[str, str]:
        return {
            **self.labels,
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_INSTANCE: self.instance,
            LABEL_GAME_ID: self.game_id,
            LABEL_SPEC_HASH: self.spec_hash,
            LABEL_GENERATION: str(self.generation),
            LABEL_DATABASE: self.database,
            LABEL_EPOCH: str(self.epoch),
        }


@dataclass(frozen=True, kw_only=True, slots=True)  # slots: a resync holds one per unit (100,000 and more)
class ObservedContainer:
    id: str
    name: str
    image: str
    state: str  # created | running | paused | restarting | removing | exited | dead
    labels: Mapping[str, str]
    created_at: datetime | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    ip_address: str | None = None
    finished_at: datetime | None = None
    started_at: datetime | None = None  # from inspect only
    # How the controller reaches the engine ("host" or "host:port"), as the backend's probe mode
    # says: the container's IP, its hostname on the game network, or a published port on its node.
    address: str | None = None
    node: str | None = None  # the node it runs on (a Swarm backend)
    # Its node is down or unreachable to the manager (a Swarm backend): the unit does not run as far as
    # can be seen, and its engine's fate is unknown -- not a crash.
    node_lost: bool = False
    # Its node is up but drained by its operator (Swarm availability drain), which shut the unit down: not
    # a crash, and not a lost node either (the state there is intact).
    node_drained: bool = False
    mounts: tuple[tuple[str, str], ...] = ()  # (source, destination); from inspect only
    # The admin token in the unit's environment ("" none); from inspect only (None: not read).
    admin_token: str | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        """Holds a live process (a paused one too: it has to be stopped or removed)."""
        return self.state in _RUNNING_STATES

    @property
    def game_id(self) -> str | None:
        return self.labels.get(LABEL_GAME_ID)

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(LABEL_SPEC_HASH)

    @property
    def database(self) -> str:
        return self.labels.get(LABEL_DATABASE, "")

    @property
    def epoch(self) -> int:
        raw = self.labels.get(LABEL_EPOCH, "")
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else 0

    def created_under(self, database: str, epoch: int) -> bool:
        """Provably created by a controller of this database, in this term or an earlier one.

        A unit from another database (a lost volume, a new database) or from a later term
        than the database knows (a database restored from an older backup) is not."""
        return bool(self.database) and self.database == database and 0 < self.epoch <= epoch

    def unit_of(self, instance: str, game_id: str) -> bool:
        """This instance's unit of that game (a unit with no game label is taken by its name): whatever its
        name, a unit labelled with another game (one renamed from outside to this game's name, say) is never
        this game's to stop or replace."""
        return self.managed_by(instance) and self.game_id in (None, game_id)

    def managed_by(self, instance: str) -> bool:
        return (self.labels.get(LABEL_MANAGED_BY) == MANAGED_BY
                and self.labels.get(LABEL_INSTANCE) == instance)

    @property
    def owner(self) -> str | None:
        """The rtmanager instance whose unit this is (its labels), or None: not rtmanager's."""
        if self.labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
            return None
        return self.labels.get(LABEL_INSTANCE) or None


# Times the daemon may give that are believed: an odd one (far future, no zone, garbage) is unknown.
_TIME_MIN, _TIME_MAX = datetime(1970, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    if value is None or value == "" or isinstance(value, bool) or str(value).startswith("0001-01-01"):
        return None
    try:
        if isinstance(value, (int, float)):
            when = datetime.fromtimestamp(value, tz=UTC)
        else:
            text = str(value).replace("Z", "+00:00")
            # Docker prints nanoseconds; Python takes at most microseconds.
            text = re.sub(r"(\.\d{6})\d+", r"\1", text)
            when = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        return None
    if when.tzinfo is None or not _TIME_MIN <= when <= _TIME_MAX:
        return None
    return when


def exit_code_of(value: Any) -> int | None:
    """An exit code, when the daemon gave one a process can have (32 bits); else unknown."""
    if isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value <= 2**31 - 1:
        return value
    return None


def _first_ip(networks: Any, prefer: str | None) -> str | None:
    if not isinstance(networks, Mapping):
        return None
    nets = {k: v for k, v in networks.items() if isinstance(v, Mapping)}
    if prefer and prefer in nets and nets[prefer].get("IPAddress"):
        return str(nets[prefer]["IPAddress"])
    for net in nets.values():
        if net.get("IPAddress"):
            return str(net["IPAddress"])
    return None


def admin_token_of(env: Any) -> str:
    """The admin token in a unit's environment (``["K=V", ...]``), "" when it has none."""
    prefix = ADMIN_TOKEN_ENV + "="
    for item in env or ():
        if isinstance(item, str) and item.startswith(prefix):
            return item[len(prefix):]
    return ""


def _probe_address(state: str, ip: str | None, name: str, probe_address: str | None) -> str | None:
    """How a running unit's engine is reached: its IP (``ip``) or its name on the network (any other
    mode); None for a unit that does not run, or when no probe mode is given."""
    if probe_address is None or state not in _RUNNING_STATES:
        return None
    return ip if probe_address == "ip" else name


# Labels whose values many units have in common; a game's own (its id) stays the unit's.
_COMMON_VALUES = frozenset({LABEL_MANAGED_BY, LABEL_INSTANCE, LABEL_SPEC_HASH, LABEL_GENERATION, LABEL_DATABASE,
                            LABEL_EPOCH})
_SHARED_MAX = 4096  # a daemon that sends ever new label names fills it once, and no further
_SHARED: dict[str, str] = {s: s for s in (LABEL_MANAGED_BY, LABEL_INSTANCE, LABEL_GAME_ID, LABEL_SPEC_HASH,
                                          LABEL_GENERATION, LABEL_DATABASE, LABEL_EPOCH, MANAGED_BY)}


def _shared(text: Any) -> Any:
    """One string for all the units that carry it: a list answer decodes every entry's strings anew,
    and a resync at 100,000 units would keep as many copies of the same image name and label names.
    A table of our own rather than ``sys.intern``, so that it stays bounded whatever names the daemon
    sends."""
    if type(text) is not str:
        return text
    found = _SHARED.get(text)
    if found is not None:
        return found
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[text] = text
    return text


def _shared_labels(labels: Any) -> dict[str, str]:
    # dict() as ever: an answer whose labels are no object fails the list, it does not strip the unit
    return {_shared(k): _shared(v) if k in _COMMON_VALUES else v for k, v in dict(labels or {}).items()}


def from_list_entry(attrs: Mapping[str, Any], network: str | None = None, *,
                    probe_address: str | None = None) -> ObservedContainer:
    """One entry of ``GET /containers/json`` (docker-py ``list(sparse=True)``). Built once, its probe
    address included: every resync and health round reads one such entry per unit."""
    names = attrs.get("Names") or []
    state = attrs.get("State") or ""
    if isinstance(state, dict):  # some API versions nest it
        state = state.get("Status", "")
    state = state if isinstance(state, str) else ""
    status = attrs.get("Status")
    m = _EXITED_STATUS.search(status) if isinstance(status, str) else None
    exit_code = exit_code_of(int(m.group(1))) if m else None
    name = names[0].lstrip("/") if isinstance(names, list) and names and isinstance(names[0], str) else ""
    settings = attrs.get("NetworkSettings")
    ip = _first_ip(settings.get("Networks") if isinstance(settings, Mapping) else None, network)
    return ObservedContainer(
        id=attrs["Id"],
        name=name,
        image=_shared(attrs.get("Image", "")),
        state=_shared(state),
        labels=_shared_labels(attrs.get("Labels")),
        created_at=parse_time(attrs.get("Created")),
        exit_code=exit_code,
        ip_address=ip,
        address=_probe_address(state, ip, name, probe_address),
    )


def created(container_id: str, spec: ContainerSpec) -> ObservedContainer:
    """The container a create of ``spec`` just made, as an inspect of it would show it before its start
    (its address and times come with the inspect after the start; its labels are the spec's, to which an
    inspect adds the image's own)."""
    return ObservedContainer(id=container_id, name=spec.name, image=spec.image, state="created",
                             labels=spec.all_labels(), mounts=((spec.state_path, spec.state_target),),
                             admin_token=spec.admin_token)


def from_inspect(attrs: Mapping[str, Any], network: str | None = None, *,
                 probe_address: str | None = None) -> ObservedContainer:
    """The answer of ``GET /containers/{id}/json``."""
    st = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    exit_code = exit_code_of(st.get("ExitCode")) if st.get("Status") in ("exited", "dead") else None
    name = (attrs.get("Name") or "").lstrip("/")
    state = st.get("Status", "")
    settings = attrs.get("NetworkSettings")
    ip = _first_ip(settings.get("Networks") if isinstance(settings, Mapping) else None, network)
    return ObservedContainer(
        id=attrs["Id"],
        name=name,
        image=config.get("Image", ""),
        state=state,
        labels=dict(config.get("Labels") or {}),
        created_at=parse_time(attrs.get("Created")),
        exit_code=exit_code,
        oom_killed=bool(st.get("OOMKilled")),
        ip_address=ip,
        address=_probe_address(state, ip, name, probe_address),
        finished_at=parse_time(st.get("FinishedAt")),
        started_at=parse_time(st.get("StartedAt")),
        mounts=tuple((m.get("Source", ""), m.get("Destination", "")) for m in attrs.get("Mounts") or []),
        admin_token=admin_token_of(config.get("Env")),
    )
