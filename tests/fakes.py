"""In-memory fakes of the adapters, for unit tests of the loop (no Postgres, Redis or Docker).

Each fake keeps the semantics the code relies on, and records its calls:

* ``FakeStreams``: Redis Streams with one consumer group (COUNT per stream, a
  pending list per consumer, delivery counts, XAUTOCLAIM, trimming);
* ``FakeBackend`` and ``FakeEngine``: a Docker host whose containers behave as
  their image says (healthy, exits at once, never answers);
* ``FakeStore``: the store, in memory, built on the same pure functions as the
  real one (``desired.jobs.decide``, ``desired.transitions``), with the same
  compare-and-swap guards.

They are fakes, not mocks: the integration tier runs the same scenarios on the
real services.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from controller.streams import Entry, GroupInfo, GroupMissing, StreamsUnavailable, entry_key
from desired import snapshots, transitions, versions
from desired.clock import ManualClock
from desired.errors import Conflict, NotFound, StoreUnavailable, UniqueViolation
from desired.jobs import Decision, DecisionAction, InvalidJob, Job, RecordDefaults, actor_of, decide, replaces
from desired.model import (
    MAX_TURN,
    DesiredStatus,
    ErrorCode,
    JobKind,
    JobResult,
    OpSource,
    OpStatus,
    Outcome,
    RuntimeRecord,
    Status,
    check_transition,
)
from desired.paging import PageRequest
from desired.policy import CrashPolicy, CrashVerdict, next_crash
from desired.ports import (
    AdmissionStore,
    HealthStore,
    IntakeStore,
    ReconcilerStore,
    RegistryStore,
    RelayStore,
    ResyncStore,
)
from desired.values import (
    KEEP,
    Claimed,
    Crash,
    Identity,
    Operation,
    PendingResult,
    Rejection,
    SubmitOutcome,
    VersionInUse,
    decided,
)
from desired.wakeup import Signal
from observed.docker import ensure_state_dir, user_ids
from observed.engine import EngineClient, EngineStatus, LastGeneration
from observed.errors import (
    BackendUnavailable,
    EngineConflict,
    EngineRefused,
    EngineUnreachable,
    EngineUnsupported,
    ImageMissing,
    NodeLost,
    Refused,
)
from observed.model import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY, ContainerSpec, ObservedContainer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------- streams
@dataclass
class _Pending:
    consumer: str
    deliveries: int
    delivered_at: float


@dataclass
class _Stream:
    entries: list[tuple[str, dict[Any, Any]]] = field(default_factory=list)
    last_delivered: str = "0-0"
    pending: dict[str, _Pending] = field(default_factory=dict)
    has_group: bool = False
    seq: int = 0
    last_id: tuple[int, int] = (0, 0)  # the newest id it gave (XSETID raises it): the next automatic one is above
    added: int = 0  # entries ever added (XINFO STREAM entries-added)


class FakeStreams:
    """One consumer group over in-memory streams. ``down`` makes every call an outage."""

    def __init__(self, group: str = "rtmanager", consumer: str = "c1", clock: ManualClock | None = None) -> None:
        self.group = group
        self.consumer = consumer
        self.streams: dict[str, _Stream] = {}
        self.clock = clock or ManualClock()
        self.down = False
        self.fail: Exception | None = None  # raised by every call: an error nobody classified
        self.calls: list[tuple[Any, ...]] = []
        self._ms = itertools.count(1000)
        self.run_id = "run-1"

    def _s(self, stream: str) -> _Stream:
        return self.streams.setdefault(stream, _Stream())

    def _check(self, op: str, *args: Any) -> None:
        self.calls.append((op, *args))
        if self.down:
            raise StreamsUnavailable(f"redis: {op}: fake outage")
        if self.fail is not None:
            raise self.fail

    def xadd(self, stream: str, fields: dict[Any, Any], entry_id: str | None = None) -> str:
        """What Lobby does (not through the adapter): append an entry."""
        s = self._s(stream)
        eid = entry_id or f"{next(self._ms)}-0"
        if entry_id is None and entry_key(eid) <= s.last_id:
            eid = f"{s.last_id[0]}-{s.last_id[1] + 1}"
        s.last_id = max(s.last_id, entry_key(eid))
        s.added += 1
        s.entries.append((eid, {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
                                for k, v in fields.items()}))
        return eid

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        self._check("ping")

    async def server_run_id(self) -> str:
        self._check("server_run_id")
        return self.run_id

    sets_ids = True  # False: the server refuses XSETID (as the adapter says once it did)

    async def last_id(self, stream: str) -> str | None:
        self._check("last_id", stream)
        s = self.streams.get(stream)
        return None if s is None else f"{s.last_id[0]}-{s.last_id[1]}"

    async def entries_added(self, stream: str) -> int | None:
        self._check("entries_added", stream)
        s = self.streams.get(stream)
        return 0 if s is None else s.added

    async def raise_last_id(self, stream: str, floor: str) -> bool:
        self._check("raise_last_id", stream, floor)
        s = self.streams.get(stream)
        if s is None or s.last_id >= entry_key(floor):
            return False
        s.last_id = entry_key(floor)
        return True

    async def ensure_group(self, stream: str, start_id: str = "0") -> bool:
        self._check("ensure_group", stream, start_id)
        s = self._s(stream)
        if s.has_group:
            return False
        s.has_group, s.last_delivered, s.pending = True, start_id if start_id != "0" else "0-0", {}
        return True

    def _need_group(self, s: _Stream, stream: str) -> None:
        if not s.has_group:
            raise GroupMissing(f"NOGROUP {stream}")

    async def read_new(self, streams: list[str], count: int, block_ms: int | None) -> list[Entry]:
        self._check("read_new", tuple(streams), count)
        out = []
        for name in streams:
            s = self._s(name)
            self._need_group(s, name)
            fresh = [(eid, f) for eid, f in s.entries if entry_key(eid) > entry_key(s.last_delivered)][:count]
            for eid, f in fresh:
                s.pending[eid] = _Pending(self.consumer, 1, self.clock.monotonic())
                s.last_delivered = eid
                out.append(Entry(stream=name, id=eid, fields=dict(f)))
        return out

    async def read_own_pending(self, stream: str, count: int) -> list[Entry]:
        self._check("read_own_pending", stream)
        s = self._s(stream)
        self._need_group(s, stream)
        by_id = dict(s.entries)
        out = []
        for eid in sorted(s.pending, key=entry_key):
            p = s.pending[eid]
            if p.consumer == self.consumer:
                p.deliveries += 1
                out.append(Entry(stream=stream, id=eid, fields=dict(by_id[eid]) if eid in by_id else None))
        return out

    async def claim_idle(self, stream: str, min_idle_ms: int, count: int) -> list[Entry]:
        self._check("claim_idle", stream, min_idle_ms)
        s = self._s(stream)
        self._need_group(s, stream)
        by_id = dict(s.entries)
        out = []
        now = self.clock.monotonic()
        for eid in sorted(s.pending, key=entry_key):
            p = s.pending[eid]
            if p.consumer != self.consumer and (now - p.delivered_at) * 1000 >= min_idle_ms:
                if eid in by_id:  # a deleted entry is handed over unclaimed, as the adapter does
                    s.pending[eid] = _Pending(self.consumer, p.deliveries + 1, now)
                out.append(Entry(stream=stream, id=eid, fields=dict(by_id[eid]) if eid in by_id else None))
        return out

    async def claim_others(self, streams: list[str], count: int) -> list[Entry]:
        self._check("claim_others", tuple(streams))
        out = []
        for name in streams:
            s = self._s(name)
            self._need_group(s, name)
            by_id = dict(s.entries)
            for eid in sorted(s.pending, key=entry_key):
                p = s.pending[eid]
                if p.consumer != self.consumer:
                    if eid in by_id:
                        s.pending[eid] = _Pending(self.consumer, p.deliveries + 1, self.clock.monotonic())
                    out.append(Entry(stream=name, id=eid, fields=dict(by_id[eid]) if eid in by_id else None))
        return out

    def deliver_to(self, consumer: str, stream: str, count: int = 100) -> list[str]:
        """Another consumer reads new entries (and, say, dies without acknowledging them)."""
        s = self._s(stream)
        fresh = [eid for eid, _ in s.entries if entry_key(eid) > entry_key(s.last_delivered)][:count]
        for eid in fresh:
            s.pending[eid] = _Pending(consumer, 1, self.clock.monotonic())
            s.last_delivered = eid
        return fresh

    async def ack(self, stream: str, *entry_ids: str) -> None:
        self._check("ack", stream, *entry_ids)
        s = self._s(stream)
        for eid in entry_ids:
            s.pending.pop(eid, None)

    async def group_info(self, stream: str) -> GroupInfo | None:
        self._check("group_info", stream)
        s = self.streams.get(stream)
        if s is None or not s.has_group:
            return None
        oldest = min(s.pending, key=entry_key) if s.pending else None
        unread = [eid for eid, _ in s.entries if entry_key(eid) > entry_key(s.last_delivered)]
        return GroupInfo(last_delivered=s.last_delivered, pending=len(s.pending), oldest_pending=oldest,
                         lag=len(unread), oldest_unread=min(unread, key=entry_key) if unread else None)

    async def trim_below(self, stream: str, min_id: str) -> int:
        self._check("trim_below", stream, min_id)
        s = self._s(stream)
        before = len(s.entries)
        s.entries = [(eid, f) for eid, f in s.entries if entry_key(eid) >= entry_key(min_id)]
        return before - len(s.entries)

    async def trim_to_length(self, stream: str, maxlen: int) -> int:
        s = self._s(stream)
        cut = max(0, len(s.entries) - maxlen)
        s.entries = s.entries[cut:]
        return cut

    async def add_many(self, items: list[tuple[str, dict[Any, Any]]], maxlen: int | None = None) -> list[str]:
        return [await self.add(stream, fields, maxlen) for stream, fields in items]

    async def add(self, stream: str, fields: dict[Any, Any], maxlen: int | None = None) -> str:
        self._check("add", stream)
        eid = self.xadd(stream, fields)
        if maxlen:
            await self.trim_to_length(stream, maxlen)
        return eid

    def fields_of(self, stream: str) -> list[dict[str, str]]:
        return [{(k.decode(errors="replace") if isinstance(k, bytes) else k):
                 (v.decode(errors="replace") if isinstance(v, bytes) else v)
                 for k, v in f.items()} for _, f in self._s(stream).entries]

    async def recent(self, stream: str, count: int) -> list[tuple[str, dict[Any, Any]]]:
        self._check("recent", stream)
        return self._pairs(stream)[::-1][:count]

    async def range(self, stream: str, start: str, end: str = "+",
                    count: int = 1000) -> list[tuple[str, dict[Any, Any]]]:
        self._check("range", stream)
        low = (0, 0) if start == "-" else entry_key(start)
        return [(eid, f) for eid, f in self._pairs(stream) if entry_key(eid) >= low][:count]

    async def recent_field(self, stream: str, count: int, name: str) -> list[tuple[str, str]]:
        return [(eid, f.get(name, "")) for eid, f in await self.recent(stream, count)]

    async def range_ids(self, stream: str, start: str, end: str = "+", count: int = 1000) -> list[str]:
        return [eid for eid, _ in await self.range(stream, start, end, count)]

    def _pairs(self, stream: str) -> list[tuple[str, dict[Any, Any]]]:
        return list(zip([eid for eid, _ in self._s(stream).entries], self.fields_of(stream), strict=True))

    async def stream_first_id(self, stream: str) -> str | None:
        entries = self._s(stream).entries
        return entries[0][0] if entries else None


# ------------------------------------------------------------------- backend
@dataclass
class FakeContainer:
    id: str
    name: str
    image: str
    labels: dict[str, str]
    state: str = "created"
    exit_code: int | None = None
    created_at: datetime = T0
    logs: str = ""
    admin_token: str = ""  # ENGINE_ADMIN_TOKEN in its environment
    node: str | None = None  # the node it runs on (a Swarm's)
    started: float = 0.0  # time.monotonic() of its last start
    ip: str | None = None  # its address on the game network when set (else one by its place)
    finished_at: datetime | None = None  # when its engine last exited, as its daemon says (inspect's FinishedAt)
    oom_killed: bool = False


class FakeBackend:
    """A Docker host. ``behaviour[image]``: ``ok`` (healthy), ``crash`` (exits at once with code 3),
    ``mute`` (runs, never healthy). Images not in ``images`` are missing (and cannot be pulled)."""

    name = "fake"

    def __init__(self, instance: str = "default", images: set[str] | None = None) -> None:
        self.instance = instance
        self.images = images if images is not None else {"galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1",
                                                         "galaxy/engine-stub:mute", "galaxy/engine-stub:crash"}
        self.behaviour = {"galaxy/engine-stub:mute": "mute", "galaxy/engine-stub:crash": "crash"}
        self.containers: dict[str, FakeContainer] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.down = False
        self.fail: Exception | None = None  # raised by every call: an error nobody classified
        self.graceful: list[str] = []  # ids stopped with SIGTERM first
        self.daemon_stopped: set[str] = set()
        self.while_stopping = None  # an async callable run while a stop is in progress (a job arriving)
        self.specs: list[ContainerSpec] = []  # every spec create was given
        self.lost: set[str] = set()  # nodes that are down (a Swarm's)
        self.drained: set[str] = set()  # of those, the ones up but drained by their operator (not lost)
        self.paused: set[str] = set()  # nodes up whose engines run, where nothing new is placed (availability pause)
        self.nodes: list[str] = []  # a Swarm's nodes, in the order new games are placed on them (none: one host)
        self._ids = itertools.count(1)

    def _check(self, op: str, *args: Any) -> None:
        self.calls.append((op, *args))
        if self.down:
            raise BackendUnavailable(f"docker {op}: fake outage")
        if self.fail is not None:
            raise self.fail

    def ops(self, *names: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if not names or c[0] in names]

    def _observe(self, c: FakeContainer) -> ObservedContainer:
        return ObservedContainer(id=c.id, name=c.name, image=c.image, state=c.state, labels=dict(c.labels),
                                 created_at=c.created_at, exit_code=c.exit_code, finished_at=c.finished_at,
                                 oom_killed=c.oom_killed,
                                 ip_address=self.ip_of(c) if c.state == "running" else None,
                                 address=self.ip_of(c) if c.state == "running" else None,
                                 admin_token=c.admin_token, node=c.node,
                                 node_lost=c.node in self.lost - self.drained and c.state != "running",
                                 node_drained=(c.node in self.drained or c.node in self.paused)
                                 and c.state != "running")

    def ip_of(self, c: FakeContainer) -> str:
        if c.ip:
            return c.ip
        n = list(self.containers).index(c.id) if c.id in self.containers else 0
        return f"10.0.{n // 250}.{n % 250 + 2}"

    def by_name(self, name: str) -> FakeContainer | None:
        return next((c for c in self.containers.values() if c.name == name), None)

    async def ping(self) -> None:
        self._check("ping")

    async def list_managed(self) -> list[ObservedContainer]:
        self._check("list")
        return [self._observe(c) for c in self.containers.values()
                if c.labels.get(LABEL_MANAGED_BY) == MANAGED_BY and c.labels.get(LABEL_INSTANCE) == self.instance]

    async def inspect(self, name_or_id: str) -> ObservedContainer | None:
        self._check("inspect", name_or_id)
        c = self.containers.get(name_or_id) or self.by_name(name_or_id)
        return self._observe(c) if c else None

    async def ensure_image(self, image: str) -> None:
        self._check("ensure_image", image)
        if image not in self.images:
            raise ImageMissing(f"image {image} is not present and could not be pulled")

    async def prepare(self) -> None:
        self._check("prepare")

    def _place(self, spec: ContainerSpec) -> str | None:
        """With ``nodes`` (a Swarm's): the pin, else the first node neither lost nor avoided."""
        if spec.node or not self.nodes:
            return spec.node
        return next((n for n in self.nodes if n not in self.lost and n not in self.paused
                     and n not in spec.avoid_nodes), None)

    async def make_state_dir(self, state_root: str, spec: ContainerSpec) -> str | None:
        self._check("make_state_dir", spec.name, spec.node)
        if spec.node in self.lost or spec.node in self.paused:
            raise NodeLost(f"the node {spec.node} of {spec.name} is down, drained or paused")
        node = self._place(spec)
        if self.nodes and node is None:  # as the Swarm backend's choice of a node (pick_node)
            raise NodeLost(f"no node is ready and active to run {spec.name}")
        ensure_state_dir(state_root, spec.state_path, *user_ids(spec.user))  # on disk, as the Docker backend
        return node

    async def lost_nodes(self) -> frozenset[str]:
        return frozenset(self.lost - self.drained)

    async def placeable(self, avoid_nodes: frozenset[str], node: str | None = None) -> bool:
        if node:
            return node not in self.lost and node not in self.paused
        return not self.nodes or any(n not in self.lost and n not in self.paused and n not in avoid_nodes
                                     for n in self.nodes)

    async def create(self, spec: ContainerSpec) -> ObservedContainer:
        self._check("create", spec.name)
        self.specs.append(spec)
        existing = self.by_name(spec.name)
        if existing is not None:
            return self._observe(existing)
        if spec.image not in self.images:  # the create pulls a missing image once, as the Docker backend's
            raise ImageMissing(f"image {spec.image} is not present and could not be pulled")
        # Distinct in their first 12 characters, as Docker's ids are (a copy of a game's state is named so).
        c = FakeContainer(id=f"c{next(self._ids):011d}" + "0" * 52, name=spec.name, image=spec.image,
                          labels=spec.all_labels(),
                          admin_token=spec.engine_env().get("ENGINE_ADMIN_TOKEN", ""), node=self._place(spec))
        self.containers[c.id] = c
        return self._observe(c)

    async def start(self, unit_id: str) -> None:
        self._check("start", unit_id)
        c = self.containers.get(unit_id)
        if c is None:
            raise Refused(f"start: container {unit_id[:12]} is gone")
        if c.node in self.paused:  # as the Swarm backend: a node that takes no new task is refused at once
            raise NodeLost(f"start: its node {c.node} is down, unreachable, drained or paused")
        if c.node in self.lost:
            # What a Swarm does with a task pinned to a dead node: it waits (START_WAIT). The backend refuses
            # such a start at once; a caller that gets here anyway hangs, which a test sees.
            await asyncio.Event().wait()
        self.daemon_stopped.discard(unit_id)  # a later exit is its own
        c.started = time.monotonic()
        if self.behaviour.get(c.image) == "crash":
            c.state, c.exit_code, c.logs = "exited", 3, "engine-stub: crashing as asked"
        else:
            c.state, c.exit_code = "running", None

    async def stop(self, unit_id: str, grace: float) -> None:
        self._check("stop", unit_id, grace)
        c = self.containers.get(unit_id)
        if c is not None and c.state == "running":
            if self.while_stopping is not None:
                hook, self.while_stopping = self.while_stopping, None
                await hook()
            self.graceful.append(unit_id)
            c.state, c.exit_code = "exited", 0

    async def remove(self, unit_id: str, grace: float) -> None:
        self._check("remove", unit_id, grace)
        await self.stop(unit_id, grace)
        self.containers.pop(unit_id, None)

    async def logs_tail(self, unit_id: str, lines: int = 20) -> str:
        c = self.containers.get(unit_id)
        return c.logs if c else ""

    async def stopped_by_daemon(self, unit: ObservedContainer) -> bool:
        return unit.id in self.daemon_stopped

    def restart_daemon(self) -> None:
        """Every running container is stopped by the daemon going away."""
        for c in self.containers.values():
            if c.state == "running":
                c.state, c.exit_code = "exited", 0
                self.daemon_stopped.add(c.id)

    def events(self, on_event: Callable[[str, str], None], on_connect: Callable[[], None]) -> _NoEvents:
        return _NoEvents()

    def close(self) -> None:
        pass

    def lose_node(self, node: str) -> None:
        """A node goes down: its engines are out of reach (their fate unknown: no exit code)."""
        self.lost.add(node)
        for c in self.containers.values():
            if c.node == node and c.state == "running":
                c.state, c.exit_code = "exited", None

    def drain_node(self, node: str) -> None:
        """Its operator drains a node (Swarm availability drain): it is up, but Swarm shuts its engines
        down (an exit without a crash) and places nothing there."""
        self.lose_node(node)
        self.drained.add(node)

    def crash(self, game_id: str, code: int = 1) -> None:
        """The engine of a game exits on its own."""
        c = self.by_name(f"galaxy-game-{game_id}")
        assert c is not None
        c.state, c.exit_code = "exited", code


class _NoEvents:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reconnect(self) -> None:
        pass


@dataclass
class FakeGame:
    """What a fake engine keeps in its state directory: the turn, its phase, the last generation."""

    turn: int = 0
    phase: str = "idle"
    last: tuple[int, bool, str] | None = None


class FakeEngine:
    """Health and the admin API as the backend's containers behave. ``admin[image]``: ``ok`` (turns
    generate at once), ``slow`` (stay generating until ``finish_generation``), ``fail`` (every
    generation fails), ``none`` (no admin API: 404)."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.probes = 0
        self.admin: dict[str, str] = {}
        self.games: dict[str, FakeGame] = {}  # by container name: the state directory survives a recreate
        self.requests: list[tuple[str, int]] = []
        self.fail: dict[str, Exception] = {}  # by container name: the admin API raises this
        self.tokens: list[str] = []  # the token each admin call carried
        # by image: seconds after its start before an engine's health path answers; the wait for it is then
        # the real client's poll (EngineClient.wait_healthy), with its schedule and its look at the unit
        self.healthy_after: dict[str, float] = {}

    def _container(self, host: str) -> FakeContainer | None:
        return next((c for c in self.backend.containers.values()
                     if c.state == "running" and self.backend.ip_of(c) == host), None)

    def _healthy(self, host: str) -> bool:
        c = self._container(host)
        return (c is not None and self.backend.behaviour.get(c.image, "ok") == "ok"
                and time.monotonic() - c.started >= self.healthy_after.get(c.image, 0.0))

    def game(self, name: str) -> FakeGame:
        return self.games.setdefault(name, FakeGame())

    def _admin(self, host: str, token: str) -> tuple[FakeContainer, FakeGame, str]:
        c = self._container(host)
        if c is None or not self._healthy(host):
            raise EngineUnreachable(f"engine at {host} does not answer")
        self.tokens.append(token)
        if c.admin_token and token != c.admin_token:
            raise EngineRefused("the engine refused rtmanager's admin call (HTTP 401)")
        if c.name in self.fail:
            raise self.fail[c.name]
        mode = self.admin.get(c.image, "ok")
        if mode == "none":
            raise EngineUnsupported("the engine has no admin API (404)")
        return c, self.game(c.name), mode

    async def status(self, host: str, *, token: str = "") -> EngineStatus:
        _, g, _ = self._admin(host, token)
        last = LastGeneration(turn=g.last[0], ok=g.last[1], error=g.last[2]) if g.last else None
        return EngineStatus(turn=g.turn, phase=g.phase, last_generation=last)

    async def request_turn(self, host: str, expected_turn: int, *, token: str = "") -> bool:
        c, g, mode = self._admin(host, token)
        self.requests.append((c.name, expected_turn))
        if g.turn > expected_turn:
            return False
        if g.turn < expected_turn or g.phase != "idle":
            raise EngineConflict("not at that turn, or busy")
        if mode == "fail":
            g.last = (g.turn + 1, False, "the galaxy collapsed")
        elif mode == "slow":
            g.phase = "generating"
        else:
            g.turn, g.last = g.turn + 1, (g.turn + 1, True, "")
        return True

    def finish_generation(self, name: str) -> None:
        g = self.game(name)
        g.turn, g.phase, g.last = g.turn + 1, "idle", (g.turn + 1, True, "")

    async def check(self, host: str) -> tuple[bool, str]:
        self.probes += 1
        ok = self._healthy(host)
        return ok, "HTTP 200" if ok else "no answer"

    async def wait_healthy(self, host: str, timeout: float,
                           still_worth_it: Callable[[], Awaitable[bool]] | None = None) -> tuple[bool, str]:
        c = self._container(host)
        if c is not None and c.image in self.healthy_after:
            return await EngineClient.wait_healthy(self, host, timeout, still_worth_it)  # type: ignore[arg-type]
        ok, detail = await self.check(host)
        if not ok and still_worth_it is not None:
            await still_worth_it()
        return ok, detail

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------- store
class FakeStore:
    """The store's ports in memory (desired/ports.py: the reconciler's, the relay's, admission's, the
    intake's, the resync's and the health round's, and the version registry), on the same pure
    functions and guards as desired/db/; tests/contract/store.py holds both to one contract."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock(T0)
        self.records: dict[str, RuntimeRecord] = {}
        self.ops: builtins.list[Operation] = []
        # {"seq", "result_id", "game_id", "fields", "operation_id", "published", "kind", "written_at"}
        self.results: builtins.list[dict[str, Any]] = []
        self.snapshot_floors: dict[str, int] = {}  # as the store's table: a lost game's floor
        self.marks: dict[str, tuple[int, int]] = {}
        self.attempts: dict[tuple[str, str], int] = {}
        self.disposed: set[str] = set()  # removed games whose state directory was disposed of
        self.down = False
        self.fail: Exception | None = None  # raised by every call: an error nobody classified
        self.fail_submit: Exception | None = None
        self.batches = 0
        self.versions: dict[str, versions.EngineVersion] = {}  # by image_ref
        self._seq = itertools.count(1)
        self._op_ids = itertools.count(1)
        self.outbox = Signal()  # as the store's: raised by every write of an outbox row
        self.schedule = Signal()  # as the store's: raised by every write that moves the turn clock

    def _check(self) -> datetime:
        if self.down:
            raise StoreUnavailable("postgres: fake outage")
        if self.fail is not None:
            raise self.fail
        return self.clock.now()

    # records
    async def ping(self) -> None:
        self._check()

    async def get(self, game_id: str) -> RuntimeRecord:
        self._check()
        if game_id not in self.records:
            raise NotFound(game_id)
        return self.records[game_id]

    async def find(self, game_id: str) -> RuntimeRecord | None:
        self._check()
        return self.records.get(game_id)

    async def list(self) -> builtins.list[RuntimeRecord]:
        self._check()
        return sorted(self.records.values(), key=lambda r: r.game_id)

    async def list_by_status(self, status: Status) -> builtins.list[RuntimeRecord]:
        return [r for r in await self.list() if r.status is status]

    async def page(self, request: PageRequest) -> tuple[builtins.list[RuntimeRecord], bool]:
        f = request.filter
        found = [r for r in await self.list() if (request.after is None or r.game_id > request.after)
                 and (f.status is None or r.status is f.status)
                 and (f.engine_version is None or r.engine_version == f.engine_version)
                 and (f.node is None or r.node_id == f.node)]
        return found[:request.limit], len(found) > request.limit

    async def list_live(self) -> builtins.list[RuntimeRecord]:
        return [r for r in await self.list() if r.status is not Status.REMOVED
                or r.desired_status is not DesiredStatus.REMOVED or not r.converged]

    async def removed_with_state(self, retention: float, limit: int = 100,
                                 after: tuple[datetime, str] | None = None) -> builtins.list[RuntimeRecord]:
        now = self._check()
        found = [r for r in self.records.values() if r.status is Status.REMOVED and r.game_id not in self.disposed
                 and r.removed_at is not None and (now - r.removed_at).total_seconds() >= retention
                 and (after is None or (r.removed_at, r.game_id) > after)]
        return sorted(found, key=lambda r: (r.removed_at or now, r.game_id))[:limit]

    async def mark_state_disposed(self, game_id: str) -> None:
        self._check()
        self.disposed.add(game_id)

    async def count_by_status(self) -> dict[str, int]:
        counts = {s.value: 0 for s in Status}
        for r in await self.list():
            counts[r.status.value] += 1
        return counts

    async def unpublished_count(self) -> int:
        return sum(1 for r in self.results if not r["published"])

    async def turn_lateness(self) -> tuple[float, int]:
        """As desired/db/transitions.py: intervals past the due time of the games that should turn."""
        now = self.clock.now()
        lates = []
        for r in self.records.values():
            if (r.turn_interval <= 0 or r.paused or r.desired_status is not DesiredStatus.RUNNING
                    or r.status not in (Status.RUNNING, Status.GENERATION_IN_PROGRESS) or r.admin_api is not True
                    or (r.turn is not None and r.turn >= MAX_TURN)):
                continue
            since = max(r.last_turn_at or r.clock_from or r.created_at, r.clock_from or r.created_at)
            lates.append(((now - since).total_seconds() - r.turn_interval) / r.turn_interval)
        return max([0.0, *lates]), sum(1 for late in lates if late >= 1)

    async def claim_identity(self, instance: str) -> Identity:
        return Identity(instance=instance, uid="fake-database", claimed_at=T0)

    # transitions
    def _swap(self, rec: RuntimeRecord, new: RuntimeRecord, reason: str | None = None) -> RuntimeRecord:
        return self._write(self.records[rec.game_id], new, self.clock.now(), reason)

    def _write(self, cur: RuntimeRecord | None, new: RuntimeRecord, now: datetime,
               forced_reason: str | None = None) -> RuntimeRecord:
        """As desired/db/base.py ``_write``: the status machine, the engine version of a new image,
        the invariants, and the snapshot Lobby is owed."""
        if cur is not None and new.status is not cur.status:
            check_transition(cur.status, new.status)
        image = new.desired_image_ref or new.current_image_ref
        if cur is None or image != (cur.desired_image_ref or cur.current_image_ref):
            version = self.versions.get(image) if image else None
            new = new.replace(engine_version=version.version if version else "")
        reason = snapshots.reason_for(cur, new, forced_reason)
        if reason is not None:
            base = cur.snapshot_revision if cur else self.snapshot_floors.get(new.game_id, 0)
            new = new.replace(snapshot_revision=base + 1)
        new.validate()
        moved = transitions.moves_the_clock(cur, new)
        self.records[new.game_id] = new
        if moved:
            self.schedule.fire()
        if reason is not None:
            snapshot_id = str(uuid.uuid4())
            self._outbox(snapshot_id, new.game_id, None, "snapshot", snapshots.fields(
                new, previous=cur.status if cur else None, reason=reason, snapshot_id=snapshot_id, now=now))
        return new

    def _guard(self, rec: RuntimeRecord, generation: bool) -> RuntimeRecord:
        cur = self.records.get(rec.game_id)
        if cur is None:
            raise NotFound(rec.game_id)
        if cur.status is not rec.status or cur.current_container_id != rec.current_container_id or (
                generation and cur.generation != rec.generation):
            raise Conflict(f"{rec.game_id}: changed")
        return cur

    async def set_admin_token(self, rec: RuntimeRecord, token: str) -> RuntimeRecord:
        self._check()
        cur = self._guard(rec, True)
        return self._swap(cur, cur.replace(admin_token=token))

    async def mark_starting(self, rec: RuntimeRecord, *, rollback_image: str | None) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, True)
        return self._swap(cur, transitions.starting(cur, now, rollback_image=rollback_image))

    async def mark_rollback_overtaken(self, rec: RuntimeRecord, *, container_id: str) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, True)
        return self._swap(cur, transitions.rollback_overtaken(cur, now, container_id=container_id))

    async def _finishing(self, rec: RuntimeRecord,
                         change: Callable[[RuntimeRecord, datetime], RuntimeRecord]) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, True)
        new = self._swap(cur, change(cur, now))
        self._finish(new, cur.generation, Outcome.SUCCESS, None, "", now)
        return new

    async def mark_running(self, rec: RuntimeRecord, *, container_id: str, image: str,
                           probe: transitions.Probe | None = None,
                           unreachable_after: int = 3, generation_timeout: float = 600,
                           node: str | None = None) -> RuntimeRecord:
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            new = transitions.running(cur, now, container_id=container_id, image=image, node=node)
            if probe is not None:
                new = transitions.observed(new, now, probe, unreachable_after=unreachable_after,
                                           generation_timeout=generation_timeout)
            return new
        now = self._check()
        cur = self._guard(rec, True)
        new = change(cur, now)
        if not transitions.turn_reached(new):
            return self._swap(cur, new.replace(observed_generation=cur.observed_generation))
        new = self._swap(cur, new)
        self._finish(new, cur.generation, Outcome.SUCCESS, None, "", now)
        return new

    async def mark_converged(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._finishing(rec, transitions.recorded)

    async def turn_requested(self, rec: RuntimeRecord) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, False)
        return self._swap(cur, transitions.turn_requested(cur, now))

    async def fail_turn(self, rec: RuntimeRecord, code: ErrorCode, message: str) -> RuntimeRecord:
        now = self._check()
        cur = self.records[rec.game_id]
        if cur.generation != rec.generation:
            raise Conflict("a newer generation took over")
        new = self._swap(cur, transitions.turn_failed(cur, now, code=code, message=message))
        self._answer_failing(new, cur.generation, code, message, now)
        return new

    async def answer_during_turn(self, rec: RuntimeRecord) -> RuntimeRecord | None:
        now = self._check()
        cur = self.records.get(rec.game_id)
        if cur is None:
            raise NotFound(rec.game_id)
        if (cur.generation != rec.generation or not cur.status.is_up
                or cur.current_container_id != rec.current_container_id):
            raise Conflict("the record moved")
        pending = [o for o in self.ops if o.game_id == cur.game_id and o.status in (OpStatus.QUEUED, OpStatus.RUNNING)
                   and o.generation <= cur.generation]
        jobs = [o for o in pending if o.op in transitions.ANSWERED_DURING_TURN]
        if not transitions.answers_during_turn(cur, [o.op for o in pending]):
            return None
        for o in jobs:
            self._end(o, Outcome.SUCCESS, None, "", cur.current_container_id or "", cur.engine_endpoint, now)
        return cur if jobs else None

    def _answer_failing(self, new: RuntimeRecord, generation: int, code: ErrorCode, message: str,
                            now: datetime, failing: frozenset[JobKind] = transitions.TURN_ASKS) -> None:
        up = new.status.is_up and new.current_container_id is not None
        for o in list(self.ops):
            if o.game_id == new.game_id and o.status in (OpStatus.QUEUED, OpStatus.RUNNING) \
                    and o.generation <= generation:
                if o.op in failing:
                    self._end(o, Outcome.FAILURE, code, message, "", "", now)
                else:
                    self._end(o, Outcome.SUCCESS, None, "", (new.current_container_id or "") if up else "",
                              new.engine_endpoint if up else "", now)

    async def mark_stopped(self, rec: RuntimeRecord, *, container_id: str | None,
                           stopped_now: bool = False) -> RuntimeRecord:
        return await self._finishing(rec, lambda cur, now: transitions.stopped(cur, now, container_id=container_id,
                                                                               stopped_now=stopped_now))

    async def note_stopped(self, game_id: str, *, container_id: str) -> RuntimeRecord | None:
        self._check()
        cur = self.records[game_id]
        if not cur.status.is_up or cur.current_container_id != container_id:
            return None
        return self._swap(cur, transitions.stopped(cur, self.clock.now(), container_id=container_id,
                                                   converged=False))

    async def mark_removed(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._finishing(rec, transitions.removed)

    async def record_observation(self, rec: RuntimeRecord, probe: transitions.Probe, *, unreachable_after: int,
                                 generation_timeout: float, disruption_waits: bool = False) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, False)
        if transitions.probe_predates(rec, cur, probe):
            raise Conflict(f"{rec.game_id}: a probe older than the recorded turn")
        new = transitions.observed(cur, now, probe, unreachable_after=unreachable_after,
                                   generation_timeout=generation_timeout)
        return self._swap(cur, transitions.disruption_waiting(new, now) if disruption_waits else new)

    async def restart_disruption_wait(self, rec: RuntimeRecord, turn: int) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, False)
        return self._swap(cur, transitions.disruption_wait_restarted(cur, now, turn=turn))

    async def clear_stopping(self, rec: RuntimeRecord, *, same_generation: bool = True) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, same_generation)
        return self._swap(cur, transitions.not_stopping(cur, now))

    async def mark_stopping(self, rec: RuntimeRecord, unit_id: str | None = None) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, True)
        return self._swap(cur, transitions.stopping(cur, now, unit_id))

    async def note_disruption_wait(self, rec: RuntimeRecord) -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, False)
        return self._swap(cur, transitions.disruption_waiting(cur, now))

    async def note_disruption_overdue(self, rec: RuntimeRecord, action: str, waited: float, note: str) -> None:
        self._check()
        params = {"disruption": action, "disruption_waited_seconds": round(waited, 1), "disruption_note": note}
        pending = [o for o in self.ops if o.game_id == rec.game_id and o.generation <= rec.generation
                   and o.status in (OpStatus.QUEUED, OpStatus.RUNNING)]
        for o in pending:
            self.ops[self.ops.index(o)] = Operation(**{**o.__dict__, "params": {**o.params, **params}})
        if not pending:
            self._op(rec.game_id, JobKind.RECONCILE, OpSource.RECONCILER, OpStatus.SUCCEEDED, rec.generation,
                     params, None)

    async def list_up(self) -> builtins.list[RuntimeRecord]:
        return [r for r in await self.list() if r.status.is_up]

    async def record_crash(self, rec: RuntimeRecord, crash: Crash,
                           policy: CrashPolicy) -> tuple[RuntimeRecord, CrashVerdict]:
        now = self._check()
        cur = self.records[rec.game_id]
        if cur.generation != rec.generation or cur.status is not rec.status:
            raise Conflict("changed")
        verdict = next_crash(cur, now, policy)
        new = self._swap(cur, transitions.crashed(cur, now, verdict=verdict, code=crash.code, detail=crash.detail,
                                                  exit_code=crash.exit_code, oom_killed=crash.oom_killed,
                                                  window=policy.window), "crash_loop" if verdict.give_up else "crashed")
        self._op(new.game_id, JobKind.RESTART, OpSource.RECONCILER,
                 OpStatus.FAILED if verdict.give_up else OpStatus.SUCCEEDED, new.generation,
                 {"event": "crash", "crash_count": verdict.count}, crash.code if verdict.give_up else None)
        if verdict.give_up:
            self._finish(new, cur.generation, Outcome.FAILURE, crash.code, new.last_error_message or "", now)
        return new, verdict

    async def record_node_loss(self, rec: RuntimeRecord, step: str, *, node: str, message: str = "") -> RuntimeRecord:
        now = self._check()
        cur = self._guard(rec, True)
        if step == "lost":
            new = transitions.node_lost(cur, now, node=node)
        elif step == "move":
            new = transitions.moved_off(cur, now, node=node)
        else:
            new = transitions.stopped_for_node_loss(cur, now, message=message)
        new = self._swap(cur, new)
        self._op(new.game_id, JobKind.RECONCILE, OpSource.RECONCILER, OpStatus.SUCCEEDED, new.generation,
                 {"event": "node_lost" if step == "lost" else f"node_lost_{step}", "node": node}, None)
        if step == "stop":
            self._finish(new, cur.generation, Outcome.FAILURE, ErrorCode.CONTAINER_START_FAILED, message, now)
        return new

    async def fail_generation(self, game_id: str, generation: int, code: ErrorCode, message: str, *,
                              answer_now: bool = False, kept_revision: int | None = None) -> RuntimeRecord | None:
        now = self._check()
        cur = self.records.get(game_id)
        if cur is None or cur.generation != generation:
            return None
        jobs = [o for o in self.ops if o.game_id == game_id and o.status in (OpStatus.QUEUED, OpStatus.RUNNING)
                and o.generation <= generation]
        asked = {o.op for o in jobs}
        new, target = transitions.failed(cur, now, code=code, message=message, asked=asked,
                                         kept_revision=kept_revision)
        self._swap(cur, new)
        if transitions.keeps_running(cur, asked):
            self._answer_failing(new, generation, code, message, now,
                                     failing=transitions.TURN_ASKS | {JobKind.RECONCILE})
            return new
        if (new.desired_status is DesiredStatus.STOPPED and cur.desired_status is DesiredStatus.RUNNING
                and not answer_now):
            for o in jobs:  # answered once stopped, like the store
                if o.generation <= generation and o.error_code is None:
                    self.ops[self.ops.index(o)] = Operation(**{**o.__dict__, "error_code": code.value,
                                                               "error_message": message})
            return new
        self._finish(new, generation, Outcome.FAILURE, code,
                     f"{message}; rolled back to {target}" if target else message, now)
        if target:
            self._op(game_id, jobs[0].op if jobs else JobKind.RECONCILE, OpSource.RECONCILER, OpStatus.SUCCEEDED,
                     new.generation, {"event": "rollback", "to": target}, None)
        return new

    async def note_state_restore(self, rec: RuntimeRecord, copy: str, why: str) -> None:
        self._check()
        self._op(rec.game_id, JobKind.RECONCILE, OpSource.RECONCILER, OpStatus.SUCCEEDED, rec.generation,
                 {"event": "state_restore", "copy": copy, "why": why}, None)

    async def answer_overdue(self, game_id: str, generation: int, code: ErrorCode, message: str) -> int:
        now = self._check()
        cur = self.records.get(game_id)
        if cur is None or cur.generation != generation:
            return 0
        new = self._swap(cur, transitions.answered_unconverged(cur, now, code=code, message=message))
        before = len(self.results)
        self._finish(new, generation, Outcome.FAILURE, code, message, now)
        return len(self.results) - before

    async def cleaned_up(self, game_id: str, generation: int) -> RuntimeRecord | None:
        now = self._check()
        cur = self.records.get(game_id)
        if cur is None or cur.generation != generation or cur.status is not Status.STOPPED:
            return None
        return self._swap(cur, transitions.cleaned_up(cur, now))

    # admission
    async def submit(self, job: Job, defaults: RecordDefaults, *, registry: bool = False) -> SubmitOutcome:
        now = self._check()
        if self.fail_submit is not None:
            raise self.fail_submit
        if job.stream:
            dup = next((o for o in self.ops if o.stream == job.stream and o.entry_id == job.entry_id), None)
            if dup is not None:
                return SubmitOutcome(operation_id=dup.id, decision=None, duplicate=True)
        current = self.records.get(job.game_id)
        decision = self._decide(current, job, now, defaults, registry)
        if decision.action is DecisionAction.SKIP:
            return SubmitOutcome(operation_id=0, decision=decision)
        if job.force and decision.waits and decision.record is not None:
            forced = decision.record.replace(force_generation=decision.record.generation)
            if decision.action is DecisionAction.JOIN and current is not None and forced != current:
                self._write(current, forced, now)
            decision = replace(decision, record=forced)
        if decision.action is DecisionAction.CHANGE:
            assert decision.record is not None
            self._write(current, decision.record, now)
            for o in list(self.ops):
                if current is not None and replaces(current, decision.record) and o.game_id == job.game_id \
                        and o.status in (OpStatus.QUEUED, OpStatus.RUNNING) \
                        and o.generation < decision.record.generation:
                    self._end(o, Outcome.FAILURE, ErrorCode.SUPERSEDED,
                              f"replaced by a newer job (generation {decision.record.generation}) before it converged",
                              "", "", now)
        status = OpStatus.QUEUED if decision.waits else (
            OpStatus.SUCCEEDED if decision.action is DecisionAction.REPLAY else OpStatus.FAILED)
        params = {k: v for k, v in (("image_ref", job.image_ref),
                                    ("reason", job.reason.value if job.reason else None), ("force", job.force)) if v}
        op = self._op(job.game_id, job.kind, job.source, status, decision.op_generation, params,
                      decision.error_code if status is OpStatus.FAILED else None, job.stream, job.entry_id,
                      decision.message or None, actor_of(job), job.requested_by)
        if decision.action in (DecisionAction.REPLAY, DecisionAction.REJECT):
            self._result(op, JobResult(result_id=str(uuid.uuid4()), game_id=job.game_id,
                                       outcome=(Outcome.SUCCESS if decision.action is DecisionAction.REPLAY
                                                else Outcome.FAILURE),
                                       job=job.kind, job_entry_id=job.entry_id, container_id=decision.container_id,
                                       engine_endpoint=decision.engine_endpoint, error_code=decision.error_code,
                                       error_message=decision.message))
        return SubmitOutcome(operation_id=op.id, decision=decision)

    async def submit_many(self, items: builtins.list[Job | Rejection], defaults: RecordDefaults, *,
                          registry: bool = False) -> builtins.list[SubmitOutcome]:
        """One transaction: all or nothing."""
        self._check()
        self.batches += 1
        saved = (dict(self.records), list(self.ops), list(self.results))
        try:
            out = []
            for item in items:
                if isinstance(item, Rejection):
                    out.append(await self.reject_entry(kind=item.kind, game_id=item.game_id, stream=item.stream,
                                                       entry_id=item.entry_id, code=item.code, message=item.message))
                else:
                    out.append(await self.submit(item, defaults, registry=registry))
            return out
        except BaseException:
            self.records, self.ops, self.results = saved
            raise

    async def reject_entry(self, *, kind: JobKind, game_id: str, stream: str, entry_id: str, code: ErrorCode,
                           message: str, source: OpSource = OpSource.LOBBY) -> SubmitOutcome:
        self._check()
        dup = next((o for o in self.ops if o.stream == stream and o.entry_id == entry_id), None)
        if dup is not None:
            return SubmitOutcome(operation_id=dup.id, decision=None, duplicate=True)
        op = self._op(game_id, kind, source, OpStatus.FAILED, 0, {}, code, stream, entry_id, message,
                      f"stream:{stream}")
        self._result(op, JobResult(result_id=str(uuid.uuid4()), game_id=game_id, outcome=Outcome.FAILURE, job=kind,
                                   job_entry_id=entry_id, error_code=code, error_message=message))
        return SubmitOutcome(operation_id=op.id, decision=None)

    # operations
    def _decide(self, current: RuntimeRecord | None, job: Job, now: datetime, defaults: RecordDefaults,
                registry: bool) -> Decision:
        """As desired/db/submissions.py ``_decide``: under the registry policy, a new image needs an
        active version."""
        decision = decide(current, job, now, defaults)
        if (registry and job.image_ref and job.kind in (JobKind.START, JobKind.PATCH)
                and decision.waits):
            refusal = versions.refuse_new(self.versions.get(job.image_ref), job.image_ref)
            if refusal is not None:
                return Decision(action=DecisionAction.REJECT, record=current, error_code=ErrorCode.IMAGE_REJECTED,
                                message=refusal)
        return decision

    async def set_schedule(self, game_id: str, turn_interval: int, source: OpSource, *,
                           actor: str | None = None) -> RuntimeRecord:
        """As desired/db/submissions.py: the turn clock's interval, desired state with no generation."""
        now = self._check()
        cur = self.records.get(game_id)
        if cur is None:
            raise NotFound(game_id)
        if cur.desired_status is DesiredStatus.REMOVED:
            raise InvalidJob(ErrorCode.INVALID_REQUEST, f"game {game_id} was removed", game_id)
        new = self._write(cur, cur.replace(turn_interval=turn_interval, last_op_at=max(now, cur.last_op_at)), now)
        self._op(game_id, JobKind.RECONCILE, source, OpStatus.SUCCEEDED, cur.generation,
                 {"turn_interval": turn_interval}, None, actor=actor)
        return new

    def _op(self, game_id: str, op: JobKind, source: OpSource, status: OpStatus, generation: int,
            params: dict[str, Any], code: ErrorCode | None, stream: str | None = None, entry_id: str | None = None,
            message: str | None = None, actor: str | None = None, requested_by: str | None = None) -> Operation:
        o = Operation(id=next(self._op_ids), game_id=game_id, op=op, source=source, status=status,
                      generation=generation, stream=stream or None, entry_id=entry_id or None, params=params,
                      error_code=code.value if code else None, error_message=message, created_at=self.clock.now(),
                      finished_at=self.clock.now() if status.is_final else None, actor=actor,
                      requested_by=requested_by or None)
        self.ops.append(o)
        return o

    def _end(self, op: Operation, outcome: Outcome, code: ErrorCode | None, message: str, container_id: str,
             endpoint: str, now: datetime) -> None:
        outcome, code, message, container_id, endpoint = decided(op, outcome, code, message, container_id, endpoint)
        i = self.ops.index(op)
        self.ops[i] = Operation(**{**op.__dict__, "status": OpStatus.SUCCEEDED if outcome is Outcome.SUCCESS
                                   else OpStatus.FAILED, "error_code": code.value if code else None,
                                   "error_message": message or None, "finished_at": now})
        self._result(self.ops[i], JobResult(result_id=str(uuid.uuid4()), game_id=op.game_id, outcome=outcome,
                                            job=op.op, job_entry_id=op.entry_id or "",
                                            container_id=container_id, engine_endpoint=endpoint, error_code=code,
                                            error_message=message))

    def _finish(self, record: RuntimeRecord, generation: int, outcome: Outcome, code: ErrorCode | None,
                message: str, now: datetime) -> None:
        for o in list(self.ops):
            if o.game_id != record.game_id or o.status not in (OpStatus.QUEUED, OpStatus.RUNNING) \
                    or o.generation > generation:
                continue
            if outcome is Outcome.SUCCESS:
                cid = record.current_container_id or ""
                self._end(o, outcome, None, "", cid, record.engine_endpoint if cid else "", now)
            else:
                self._end(o, outcome, code, message, "", "", now)

    def _result(self, op: Operation, result: JobResult) -> None:
        self._outbox(result.result_id, result.game_id, op, "result", result.fields())

    def _outbox(self, result_id: str, game_id: str, op: Operation | None, kind: str, fields: dict[str, str]) -> None:
        """As desired/db/base.py ``_insert_result`` and ``_insert_snapshot``: one outbox row."""
        self.results.append({"seq": next(self._seq), "result_id": result_id, "game_id": game_id, "fields": fields,
                             "operation_id": op.id if op else None, "published": None, "kind": kind,
                             "written_at": self.clock.now(), "accepted_at": op.created_at if op else None})
        self.outbox.fire()

    async def find_and_claim(self, game_id: str) -> tuple[RuntimeRecord | None, builtins.list[Claimed]]:
        self._check()
        record = self.records.get(game_id)
        return record, (self._claim(game_id, record.generation) if record is not None else [])

    async def games_with_queued_operations(self) -> set[str]:
        self._check()
        return {o.game_id for o in self.ops if o.status is OpStatus.QUEUED}

    async def claim(self, game_id: str, generation: int) -> builtins.list[Claimed]:
        self._check()
        return self._claim(game_id, generation)

    def _claim(self, game_id: str, generation: int) -> builtins.list[Claimed]:
        out = []
        for i, o in enumerate(self.ops):
            if o.game_id == game_id and o.generation == generation and o.status is OpStatus.QUEUED:
                self.ops[i] = Operation(**{**o.__dict__, "status": OpStatus.RUNNING})
                out.append(Claimed(o.id, o.created_at, o.op))
        return out

    async def operations(self, game_id: str, limit: int = 100) -> builtins.list[Operation]:
        return [o for o in reversed(self.ops) if o.game_id == game_id][:limit]

    async def operation_log(self, *, before: int | None = None, limit: int = 100, game_id: str | None = None,
                            actor: str | None = None, op: str | None = None) -> builtins.list[dict[str, Any]]:
        """As desired/db/records.py (registry changes are not kept by the fake)."""
        out = []
        for o in reversed(self.ops):
            entry = {**o.__dict__, "op": o.op.value, "source": o.source.value, "status": o.status.value}
            if ((before is None or o.id < before) and (game_id is None or o.game_id == game_id)
                    and (actor is None or o.actor == actor) and (op is None or entry["op"] == op)):
                out.append(entry)
        return out[:limit]

    async def pending_operations(self, game_id: str) -> builtins.list[Operation]:
        return [o for o in self.ops if o.game_id == game_id and o.status in (OpStatus.QUEUED, OpStatus.RUNNING)]

    async def oldest_pending_age(self, game_id: str) -> float | None:
        pending = await self.pending_operations(game_id)
        return (self.clock.now() - pending[0].created_at).total_seconds() if pending else None

    async def result_for(self, op_id: int) -> dict[str, str] | None:
        return (await self.results_of([op_id])).get(op_id)

    async def results_of(self, op_ids: builtins.list[int]) -> dict[int, dict[str, str]]:
        self._check()
        self.result_reads = getattr(self, "result_reads", 0) + 1
        wanted = set(op_ids)
        return {r["operation_id"]: dict(r["fields"]) for r in self.results
                if r["kind"] == "result" and r["operation_id"] in wanted}

    def results_for(self, game_id: str | None = None) -> builtins.list[dict[str, str]]:
        """The job results written (snapshots left out), oldest first."""
        return [r["fields"] for r in self.results
                if r["kind"] == "result" and (game_id is None or r["game_id"] == game_id)]

    # outbox
    async def floor_state(self, snapshot_ids: builtins.list[str]) -> tuple[set[str], bool]:
        self._check()
        held = {r["result_id"] for r in self.results}
        return {i for i in snapshot_ids if i in held}, "" in self.snapshot_floors

    async def note_floor_due(self) -> None:
        self._check()
        self.snapshot_floors.setdefault("", 0)

    async def raise_snapshot_revisions(self, floors: dict[str, int],
                                       on_stream: frozenset[str] = frozenset()) -> int:
        self._check()
        raised = 0
        for game, floor in sorted(floors.items()):
            rec = self.records.get(game)
            if rec is None:
                self.snapshot_floors[game] = max(floor, self.snapshot_floors.get(game, 0))
                continue
            pending = [r for r in self.results if r["game_id"] == game and r["kind"] == "snapshot"
                       and not r["published"] and r["result_id"] not in on_stream]
            if rec.snapshot_revision >= floor and all(int(r["fields"]["revision"]) > floor for r in pending):
                continue
            raised += 1
            for n, r in enumerate(pending, 1):
                r["fields"] = {**r["fields"], "revision": str(floor + n)}
            if pending:
                self.records[game] = rec.replace(snapshot_revision=floor + len(pending))
            else:  # Lobby's view came from what the database lost: a resync snapshot above the floor
                cur = rec.replace(snapshot_revision=floor)
                self.records[game] = cur
                self._write(cur, cur, self.clock.now(), "resync")
        self.snapshot_floors.pop("", None)
        return raised

    async def unpublished(self, limit: int = 100) -> builtins.list[PendingResult]:
        self._check()
        return [PendingResult(seq=r["seq"], result_id=r["result_id"], game_id=r["game_id"], fields=r["fields"],
                              kind=r["kind"], written_at=r["written_at"], accepted_at=r["accepted_at"])
                for r in self.results if not r["published"]][:limit]

    async def mark_published_many(self, marks: builtins.list[tuple[int, str]]) -> None:
        for seq, entry_id in marks:
            await self.mark_published(seq, entry_id)

    async def mark_and_read_unpublished(self, marks: builtins.list[tuple[int, str]],
                                        limit: int = 100) -> builtins.list[PendingResult]:
        self._check()
        for seq, entry_id in marks:
            await self.mark_published(seq, entry_id)
        return await self.unpublished(limit)

    async def mark_published(self, seq: int, stream_entry_id: str) -> None:
        self._check()
        for r in self.results:
            if r["seq"] == seq:
                r["published"] = stream_entry_id

    async def recently_published(self, kind: str, seconds: float,
                                 limit: int = 20000) -> builtins.list[tuple[int, str, str]]:
        self._check()
        return [(r["seq"], r["published"], r["result_id"]) for r in self.results
                if r["published"] and r["kind"] == kind][-limit:]

    async def mark_unpublished(self, seqs: builtins.list[int]) -> None:
        for r in self.results:
            if r["seq"] in seqs:
                r["published"] = None

    # intake bookkeeping
    async def stream_marks(self) -> dict[str, tuple[int, int]]:
        self._check()
        return dict(self.marks)

    async def highest_entries(self) -> dict[str, tuple[int, int]]:
        self._check()
        out: dict[str, tuple[int, int]] = {}
        for o in self.ops:
            if o.stream and o.entry_id and re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", o.entry_id):
                out[o.stream] = max(out.get(o.stream, (0, 0)), entry_key(o.entry_id))
        return out

    async def advance_mark(self, stream: str, mark: tuple[int, int]) -> tuple[int, int]:
        self._check()
        if mark[0] > 2**63 - 1:  # mark_ms is a bigint column, as the real store's
            raise ValueError(f"value out of int64 range: {mark}")
        self.marks[stream] = max(self.marks.get(stream, (0, 0)), mark)
        return self.marks[stream]

    async def count_attempt(self, stream: str, entry_id: str, error: str | None = None) -> int:
        self._check()
        self.attempts[(stream, entry_id)] = self.attempts.get((stream, entry_id), 0) + 1
        return self.attempts[(stream, entry_id)]

    async def uncount_attempt(self, stream: str, entry_id: str) -> None:
        self._check()
        self.attempts[(stream, entry_id)] = max(0, self.attempts.get((stream, entry_id), 0) - 1)

    async def forget_attempts(self, stream: str, entry_id: str) -> None:
        self._check()
        self.attempts.pop((stream, entry_id), None)

    async def prune(self, older_than_days: float, batch: int = 1000) -> tuple[int, int]:
        return 0, 0

    # engine versions (desired/db/registry.py)
    def _version(self, version: str) -> versions.EngineVersion:
        found = next((v for v in self.versions.values() if v.version == version), None)
        if found is None:
            raise NotFound(version)
        return found

    async def engine_version_of(self, image_ref: str) -> versions.EngineVersion | None:
        self._check()
        return self.versions.get(image_ref)

    async def list_versions(self, status: versions.VersionStatus | None = None
                            ) -> builtins.list[versions.EngineVersion]:
        self._check()
        return sorted((v for v in self.versions.values() if status is None or v.status is status),
                      key=lambda v: v.version)

    async def get_version(self, version: str) -> tuple[versions.EngineVersion, int]:
        self._check()
        entry = self._version(version)
        live = sum(1 for r in self.records.values() if r.status is not Status.REMOVED
                   and (r.desired_image_ref or r.current_image_ref) == entry.image_ref)
        return entry, live

    async def create_version(self, version: str, image_ref: str, status: versions.VersionStatus,
                             notes: str, stop_grace: int | None = None, *,
                             actor: str | None = None) -> versions.EngineVersion:
        now = self._check()
        if any(v.version == version for v in self.versions.values()):
            raise UniqueViolation(f"fake: version {version} exists", "engine_versions_version_key")
        if image_ref in self.versions:
            raise UniqueViolation(f"fake: image {image_ref} exists", "engine_versions_image_ref_key")
        entry = versions.EngineVersion(version=version, image_ref=image_ref, status=status, notes=notes,
                                       created_at=now, updated_at=now, stop_grace=stop_grace)
        self.versions[image_ref] = entry
        for r in list(self.records.values()):
            if (r.desired_image_ref or r.current_image_ref) == image_ref:
                self.records[r.game_id] = r.replace(engine_version=version)
        return entry

    async def update_version(self, version: str, *, status: versions.VersionStatus | None,
                             notes: str | None, stop_grace: Any = KEEP,
                             actor: str | None = None) -> versions.EngineVersion:
        now = self._check()
        entry = self._version(version)
        entry = replace(entry, status=status if status is not None else entry.status,
                        notes=notes if notes is not None else entry.notes, updated_at=now,
                        stop_grace=entry.stop_grace if stop_grace is KEEP else stop_grace)
        self.versions[entry.image_ref] = entry
        return entry

    async def delete_version(self, version: str, *, actor: str | None = None) -> None:
        self._check()
        entry = self._version(version)
        users = sorted(r.game_id for r in self.records.values() if r.status is not Status.REMOVED
                       and entry.image_ref in (r.desired_image_ref, r.current_image_ref))[:5]
        if users:
            raise VersionInUse(f"engine version {version} is used by games that are not removed: " + ", ".join(users))
        del self.versions[entry.image_ref]


def defaults(state_root: str = "/srv/games") -> RecordDefaults:
    return RecordDefaults(docker_network="galaxy-games", state_root=state_root, engine_port=8080)


if TYPE_CHECKING:  # mypy holds the fake to the ports it stands in for (desired/ports.py)
    def _ports(store: FakeStore) -> None:
        reconciler: ReconcilerStore = store
        relay: RelayStore = store
        admission: AdmissionStore = store
        intake: IntakeStore = store
        resync: ResyncStore = store
        health: HealthStore = store
        registry: RegistryStore = store
        del reconciler, relay, admission, intake, resync, health, registry
