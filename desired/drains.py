"""Drains, as pure values and decisions: no I/O, tested as tables.

A *drain* takes the Docker host (``node`` None) or one Swarm node out of use. It is desired state
(a row of ``drains``), converged by the leader's drain loop (controller/drains.py) from that row,
the rows of the games it took (``drain_games``) and the runtime records: never from memory, so a
kill -9 or a failover resumes it where the rows say.

* ``parse_request``: an operator's request (REST body or CLI flags), each refusal naming the field;
* ``action_of`` / ``deadline_action``: what a drain does with a game (stop it, or move it to
  another node), before and after its deadline;
* ``plan``: one look at a draining drain: which games are done, which to take next
  (``max_parallel`` at a time, games that run nothing first, idle engines before generating ones),
  which to force once the deadline has passed, and whether the drain is complete;
* ``restore_plan``: what undrain does with each game the drain stopped: start it again as it was,
  or leave it (Lobby or an operator stopped or removed it meanwhile);
* ``refusal``: the start a drain refuses (``host_drained``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from desired.model import DesiredStatus, JobKind, RuntimeRecord, Status

NODE_PATTERN = re.compile(r"^[a-z0-9]{1,64}$")  # a Swarm node id
MAX_PARALLEL = 1000
MAX_DEADLINE = 7 * 86400
DEFAULT_PARALLEL = 1
DEFAULT_DEADLINE = 3600


class DrainStatus(enum.StrEnum):
    DRAINING = "draining"      # taking games
    DRAINED = "drained"        # every game it had to take is stopped or moved; new starts still refused
    UNDRAINING = "undraining"  # undrain asked: the games it stopped are being started again
    UNDRAINED = "undrained"    # over
    FAILED = "failed"          # could not be carried out (its node is not a node of the Swarm): see its note

    @property
    def refusing(self) -> bool:
        """New games are kept off the target (and starts refused on the host)."""
        return self in (DrainStatus.DRAINING, DrainStatus.DRAINED)


class DrainAction(enum.StrEnum):
    STOP = "stop"  # stop at a turn boundary; undrain starts it again as it was
    MOVE = "move"  # recreate on another node at a turn boundary (Swarm)


class GameState(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    DONE = "done"
    RESTORED = "restored"  # undrain started it again
    SKIPPED = "skipped"    # undrain left it (somebody else stopped or removed it meanwhile)


class LocalState(enum.StrEnum):
    """What a Swarm node drain does with games whose state is on the node (RTMANAGER_STATE_SHARED=0)."""

    STOP = "stop"                              # stop them, their state stays on the node
    MOVE_WITHOUT_STATE = "move_without_state"  # start them fresh on another node


class OnDeadline(enum.StrEnum):
    MOVE = "move"  # past the deadline the rest are moved anyway (without waiting for a turn boundary)
    STOP = "stop"  # past the deadline the rest are stopped


class InvalidDrain(ValueError):
    """A drain request that cannot be carried out; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field}: {message}" if field else message)
        self.field = field
        self.message = str(self)


class DrainExists(Exception):
    """The target has an active drain already."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target} has an active drain already")


@dataclass(frozen=True, kw_only=True)
class DrainRequest:
    node: str | None            # None: the host (Docker backend)
    max_parallel: int = DEFAULT_PARALLEL
    deadline: int = DEFAULT_DEADLINE  # seconds from now
    on_deadline: OnDeadline = OnDeadline.MOVE
    local_state: LocalState | None = None
    state_shared: bool = False


@dataclass(frozen=True, kw_only=True)
class Drain:
    id: int
    node: str | None
    max_parallel: int
    deadline_at: datetime
    on_deadline: OnDeadline
    local_state: LocalState | None
    state_shared: bool
    status: DrainStatus
    source: str
    created_at: datetime
    drained_at: datetime | None = None
    undrain_at: datetime | None = None
    undrained_at: datetime | None = None
    note: str | None = None  # why it failed

    @property
    def target(self) -> str:
        return "the host" if self.node is None else f"node {self.node}"


@dataclass(frozen=True, kw_only=True)
class DrainGame:
    drain_id: int
    game_id: str
    action: DrainAction
    state: GameState
    generation: int               # the record's generation once the drain had changed it
    taken_at: datetime
    forced: bool = False
    image_ref: str | None = None  # whose state its stop left (RuntimeRecord.stop_image): undrain starts it
    paused: bool = False
    turn_interval: int = 0
    from_node: str | None = None
    to_node: str | None = None
    # The operation that took the game (the drain's stop that changed desired state, or the move's record
    # change); never raised. Any stop or cleanup of the game after it that is not the drain's own
    # (tagged with its id) is somebody else's.
    op_id: int | None = None
    note: str | None = None
    done_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Targets:
    """What the refusing drains (draining or drained) keep out of use. ``shared``: the drained nodes
    whose drain has a shared state root (a game pinned there can run elsewhere)."""

    host: bool = False
    nodes: frozenset[str] = field(default_factory=frozenset)
    shared: frozenset[str] = field(default_factory=frozenset)


class StepKind(enum.StrEnum):
    TAKE = "take"        # the drain takes a game with this stop (its row is written in the job's transaction)
    AGAIN = "again"      # the drain asks its stop again (forced at the deadline, or wanted running again)
    RESTORE = "restore"  # undrain starts the game again (its row settles in the job's transaction)


@dataclass(frozen=True, kw_only=True)
class DrainStep:
    """What a drain's own job carries: its drain (the operation is tagged with it, so that the drain's
    stops are told from anybody else's), and what the job's transaction checks and records on the
    game's row (desired/db/drains.py ``record_drain_step``)."""

    drain_id: int
    kind: StepKind
    generation: int | None = None      # take: the record's generation the plan saw (a compare-and-swap)
    wait_until: datetime | None = None  # the disruption waits for a turn boundary until then (the deadline)
    pin: str | None = None             # restore of a failed move: back on its original node
    forced: bool = False


def with_step(record: RuntimeRecord, step: DrainStep) -> RuntimeRecord:
    """A drain's job's desired record (a changed one): its own turn-boundary deadline; a restore of a
    failed move pinned back to its node (a new spec revision, so its unit is made there again)."""
    if step.wait_until is not None and not step.forced:
        record = record.replace(disruption_until=step.wait_until, disruption_generation=record.generation)
    if step.pin is not None and record.node_id != step.pin:
        record = record.replace(node_id=step.pin, spec_revision=record.spec_revision + 1)
    return record


# ------------------------------------------------------------------------------ requests
def parse_request(body: Mapping[str, Any], *, backend: str, state_shared: bool) -> DrainRequest:
    """A drain request: ``{"host": true}`` (Docker backend) or ``{"node": ID}`` (Swarm), with
    ``max_parallel``, ``deadline`` (seconds), ``on_deadline`` and ``local_state``."""
    known = {"host", "node", "max_parallel", "deadline", "on_deadline", "local_state"}
    for name in body:
        if name not in known:
            raise InvalidDrain(str(name)[:64], "is not a field of a drain request")
    host, node = body.get("host", False), body.get("node")
    if not isinstance(host, bool):
        raise InvalidDrain("host", "must be a boolean")
    if node is not None and (not isinstance(node, str) or not NODE_PATTERN.fullmatch(node)):
        raise InvalidDrain("node", "must be a Swarm node id (1-64 characters of a-z 0-9)")
    if host == (node is not None):
        raise InvalidDrain("node", "give exactly one of node (a Swarm node) and host: true (the Docker host)")
    if backend == "swarm" and host:
        raise InvalidDrain("host", "the Swarm backend drains one node at a time: give node")
    if backend != "swarm" and node is not None:
        raise InvalidDrain("node", "the Docker backend has one host: give host: true")
    max_parallel = _int(body, "max_parallel", DEFAULT_PARALLEL, 1, MAX_PARALLEL)
    deadline = _int(body, "deadline", DEFAULT_DEADLINE, 0, MAX_DEADLINE)
    on_deadline = _choice(body, "on_deadline", OnDeadline) or OnDeadline.MOVE
    local_state = _choice(body, "local_state", LocalState)
    if node is None:
        if "on_deadline" in body or local_state is not None:
            raise InvalidDrain("on_deadline" if "on_deadline" in body else "local_state",
                               "applies to a Swarm node drain; a host drain stops its games")
        return DrainRequest(node=None, max_parallel=max_parallel, deadline=deadline, on_deadline=OnDeadline.STOP,
                            state_shared=state_shared)
    if not state_shared and local_state is None:
        raise InvalidDrain("local_state", "the state root is node-local (RTMANAGER_STATE_SHARED=0), so a game's "
                                          "state cannot follow it: say stop (keep it on the node) or "
                                          "move_without_state (start fresh elsewhere)")
    return DrainRequest(node=node, max_parallel=max_parallel, deadline=deadline, on_deadline=on_deadline,
                        local_state=local_state, state_shared=state_shared)


def _int(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    raw = body.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise InvalidDrain(name, f"must be a whole number from {low} to {high}")
    return raw


def _choice(body: Mapping[str, Any], name: str, kind: type[enum.StrEnum]) -> Any:
    raw = body.get(name)
    if raw is None:
        return None
    allowed = [k.value for k in kind]
    if raw not in allowed:
        raise InvalidDrain(name, "must be one of " + ", ".join(allowed))
    return kind(raw)


# ------------------------------------------------------------------------------ decisions
def action_of(drain: Drain) -> DrainAction:
    """Before the deadline: a host drain stops; a node drain moves, unless the state is node-local and
    the operator said to stop."""
    if drain.node is None:
        return DrainAction.STOP
    if not drain.state_shared and drain.local_state is LocalState.STOP:
        return DrainAction.STOP
    return DrainAction.MOVE


def deadline_action(drain: Drain) -> DrainAction:
    """Past the deadline: what ``on_deadline`` says (a host drain can only stop)."""
    if drain.node is None or drain.on_deadline is OnDeadline.STOP:
        return DrainAction.STOP
    return action_of(drain)


def in_scope(drain: Drain, record: RuntimeRecord) -> bool:
    """A game the drain has to take: wanted running, on the drained host or pinned to the drained node."""
    if record.desired_status is not DesiredStatus.RUNNING or record.status is Status.REMOVED:
        return False
    return drain.node is None or record.node_id == drain.node


def finished(drain: Drain, game: DrainGame, record: RuntimeRecord | None) -> bool:
    """The game no longer needs the drain: stopped (or removed, or given up), or running elsewhere."""
    if record is None or record.desired_status is DesiredStatus.REMOVED:
        return True
    if record.desired_status is DesiredStatus.STOPPED:
        return record.converged  # stopped by the drain, by Lobby, or a failed move gave up
    if game.action is DrainAction.STOP:
        # Still wanted running: the drain's stop is to come (again) -- unless it is off the drained node
        # now (a start or restart admitted as a move with shared state): not the drain's any more.
        return drain.node is not None and not in_scope(drain, record)
    return (record.converged and record.status.is_up and record.node_id is not None
            and record.node_id != drain.node)


def _order(record: RuntimeRecord) -> tuple[int, int, str]:
    """Games that run nothing first (nothing to cut), idle engines before generating ones, converged
    games before games with a job in flight."""
    busy = 2 if record.status is Status.GENERATION_IN_PROGRESS else (0 if not record.status.is_up else 1)
    return (busy, 0 if record.converged else 1, record.game_id)


@dataclass(frozen=True, kw_only=True)
class Take:
    record: RuntimeRecord
    action: DrainAction
    forced: bool


@dataclass(frozen=True, kw_only=True)
class DrainPlan:
    finish: list[DrainGame]     # done: mark them so
    take: list[Take]            # to take now
    resubmit: list[DrainGame]   # a stop taken but not (or no longer) asked for: ask again
    force: list[DrainGame]      # past the deadline: in flight, not forced yet
    waiting: int                # games in scope not taken yet (after this plan)
    complete: bool              # nothing left: the drain is drained


def unforced(drain: Drain, record: RuntimeRecord | None) -> bool:
    """Whether the game's generation still waits on this drain's deadline without being forced."""
    return (record is not None and not record.converged and record.disruption_until == drain.deadline_at
            and record.disruption_generation == record.generation and record.force_generation != record.generation)


def plan(drain: Drain, records: Mapping[str, RuntimeRecord], games: Mapping[str, DrainGame],
         now: datetime) -> DrainPlan:
    """One look at a draining drain."""
    finish: list[DrainGame] = []
    in_flight: list[DrainGame] = []
    for g in games.values():
        if g.state is not GameState.IN_PROGRESS:
            continue
        (finish if finished(drain, g, records.get(g.game_id)) else in_flight).append(g)
    resubmit = [g for g in in_flight if g.action is DrainAction.STOP
                and records[g.game_id].desired_status is DesiredStatus.RUNNING]
    past = now >= drain.deadline_at
    # Forced once; again while a job admitted since made a new generation that carries the drain's
    # deadline but not its force (desired/jobs.py ``keeps_deadline``): a pause must not make it wait anew.
    force = [g for g in in_flight if past and (not g.forced or unforced(drain, records.get(g.game_id)))]
    candidates = sorted((r for r in records.values() if in_scope(drain, r) and r.game_id not in games), key=_order)
    take: list[Take] = []
    if past:
        take = [Take(record=r, action=deadline_action(drain), forced=True) for r in candidates]
    else:
        action = action_of(drain)
        slots = max(0, drain.max_parallel - len(in_flight))
        # A move changes desired state like a restart: a game with a job in flight waits for it (until
        # the deadline), so that the job is not answered superseded by a drain.
        # An engine that is not up (crashed mid-turn: its restart is held on the drained node) has no turn
        # to cut and its job cannot converge there: it is moved at once.
        eligible = [r for r in candidates if action is DrainAction.STOP or r.converged or not r.status.is_up]
        take = [Take(record=r, action=action, forced=False) for r in eligible[:slots]]
    waiting = len(candidates) - len(take)
    return DrainPlan(finish=finish, take=take, resubmit=resubmit, force=force, waiting=waiting,
                     complete=not in_flight and not candidates)


class Restore(enum.StrEnum):
    START = "start"      # start it again, as it was
    RESTORED = "restored"  # already wanted running again (an earlier undrain pass started it)
    SKIP = "skip"        # leave it stopped


@dataclass(frozen=True, kw_only=True)
class RestoreStep:
    game: DrainGame
    verdict: Restore
    note: str = ""


def restore_plan(games: Mapping[str, DrainGame], records: Mapping[str, RuntimeRecord],
                 stopped_since: set[str]) -> list[RestoreStep]:
    """Undrain: for each game the drain stopped (or was stopping), whether to start it again.
    ``stopped_since``: games with a stop or cleanup after the drain's own (Lobby's, an operator's)."""
    steps = []
    for g in sorted(games.values(), key=lambda g: g.game_id):
        if g.state not in (GameState.IN_PROGRESS, GameState.DONE):
            continue
        rec = records.get(g.game_id)
        if g.action is DrainAction.MOVE:
            # A move that failed stopped the game (no other node could run it, say): undrain brings it
            # back on its node, unless somebody else stopped or removed it since. A move under way, or one
            # that succeeded (done with the node it went to: the game stopped later, a crash loop given up
            # or a lost node's policy, is not the drain's doing), is not the drain's to undo.
            if (g.state is not GameState.DONE or g.to_node is not None or rec is None
                    or rec.desired_status is not DesiredStatus.STOPPED or g.game_id in stopped_since
                    or not (g.image_ref or rec.ran_image)):
                continue
            steps.append(RestoreStep(game=g, verdict=Restore.START, note="its move failed: back on its node"))
            continue
        if rec is None or rec.desired_status is DesiredStatus.REMOVED or rec.status is Status.REMOVED:
            steps.append(RestoreStep(game=g, verdict=Restore.SKIP, note="removed meanwhile: not brought back"))
        elif g.game_id in stopped_since:
            steps.append(RestoreStep(game=g, verdict=Restore.SKIP,
                                     note="stopped by another job after the drain's: not brought back"))
        elif rec.desired_status is DesiredStatus.RUNNING:
            steps.append(RestoreStep(game=g, verdict=Restore.RESTORED, note="wanted running again"))
        elif not (g.image_ref or rec.desired_image_ref or rec.current_image_ref):
            steps.append(RestoreStep(game=g, verdict=Restore.SKIP, note="no image recorded"))
        else:
            steps.append(RestoreStep(game=g, verdict=Restore.START))
    return steps


def restore_image(game: DrainGame, record: RuntimeRecord) -> str:
    image = game.image_ref or record.ran_image
    assert image
    return image


def refusal(record: RuntimeRecord | None, kind: JobKind, targets: Targets) -> str | None:
    """Why a start (or restart) that would change desired state is refused under a drain, or None: any on a
    drained host; on Swarm, one of a game pinned to a drained node whose state is node-local (its state
    is there). With a shared state root such a game is admitted as a move instead (``unpinned``)."""
    if kind not in (JobKind.START, JobKind.RESTART):
        return None
    if targets.host:
        return "the host is drained (rtmanager undrain to use it again); no game starts on it"
    if (record is not None and record.node_id is not None and record.node_id in targets.nodes
            and record.node_id not in targets.shared):
        return (f"the game's node {record.node_id} is drained and its state is there "
                "(rtmanager undrain to use the node again)")
    return None


def unpinned(current: RuntimeRecord | None, new: RuntimeRecord, kind: JobKind, targets: Targets) -> RuntimeRecord:
    """A start, restart or patch admitted for a game pinned to a drained node with a shared state root: a
    move, as the drain's own (its pin cleared, a new spec revision), so that its unit is made elsewhere
    instead of on the drained node."""
    if (kind in (JobKind.START, JobKind.RESTART, JobKind.PATCH) and new.node_id is not None
            and new.node_id in targets.shared and new.desired_status is DesiredStatus.RUNNING):
        # The node avoided too, as by the drain's own move: a unit there that is out of reach (the node
        # lost meanwhile) is the move's to replace, not a node loss to wait for.
        return new.replace(node_id=None, avoid_nodes=tuple(sorted(set(new.avoid_nodes) | {new.node_id})),
                           spec_revision=max(new.spec_revision, (current.spec_revision if current else 0) + 1))
    return new


def resolve_node(node: str, known: Mapping[str, str]) -> str | None:
    """The id of the Swarm node an operator named by its id or its hostname (``known``: id -> hostname),
    or None when the Swarm has no such node (or two of that hostname)."""
    if node in known:
        return node
    ids = [i for i, host in known.items() if host == node]
    return ids[0] if len(ids) == 1 else None


def unknown_node(node: str, known: Mapping[str, str]) -> str:
    named = sorted(f"{i} ({h})" if h else i for i, h in known.items())[:10]
    return f"no Swarm node {node}; the nodes are: " + (", ".join(named) or "none")


def deadline_of(request: DrainRequest, now: datetime) -> datetime:
    return now + timedelta(seconds=request.deadline)
