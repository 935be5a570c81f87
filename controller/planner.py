"""``plan(record, container) -> Action``: the whole decision of the controller, with no I/O.

The worker re-reads the record (Postgres) and the container (Docker) every
time it looks at a game, calls ``plan`` and carries out the one action it
returns; after the action it looks again, until ``plan`` says NOOP. Because the
decision is made from what *is*, never from what happened before, any action can
be repeated after a crash.

``container`` is the container named ``galaxy-game-{game_id}``, or one carrying
our labels, or None. Never destroy what cannot be proved ours to dispose of: a
container with our instance label but no record is ``UNOWNED``, left running and
reported, whatever its provenance labels say. Records are never deleted, so such
a unit exists only after data loss (a database restored from an older backup of
itself, whose identity and terms the unit carries): it is a game, and only an
operator may adopt or dispose of it.

``want_hash`` is the spec hash the container should carry (``None`` when the
record does not ask for a running container).

A *planned* disruption of a running engine (STOP, REMOVE, CLEANUP, a RECREATE of the running
engine: restart, patch, drift, another image) never cuts a turn in half: while the engine is known
to be generating (its last observed status), the plan is a WAIT that looks at the engine again
(``check_engine``), for at most ``disruption_wait`` seconds from ``disruption_wait_since``; after
that the action goes ahead with ``overdue`` set, and says so. When the record does not know the
engine to be generating, the action carries ``check_engine``: the reconciler asks the engine right
before disrupting it (a generation may have started since the last probe). No wait for an engine
without the admin API, for a forced generation (``force_generation``), for crashes (RECOVER) or when
``disruption_wait`` is 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from desired.model import DesiredStatus, RuntimeRecord, Status, container_name
from desired.policy import NODE_LOSS_POLL, NodeLossPolicy, node_loss_step
from observed.model import ObservedContainer


class ActionKind(str, enum.Enum):
    NOOP = "noop"
    CREATE = "create"              # no container: create, start, wait healthy
    START = "start"                # our container with the right spec exists but does not run
    RECOVER = "recover"            # the running game's container exited on its own: record it, restart later
    RECREATE = "recreate"          # our container runs an old spec: remove, then create
    CONFIRM = "confirm"            # the right container runs: wait healthy, then record it
    RECORD = "record"              # the running engine already is what the generation asks for: record it
    TURN = "turn"                  # desired state asks for a turn the engine has not reached: ask the engine
    STOP = "stop"                  # stop the running container
    MARK_STOPPED = "mark_stopped"  # nothing runs: record the game as stopped
    REMOVE = "remove"              # remove the container
    MARK_REMOVED = "mark_removed"  # nothing left: record the game as removed
    CLEANUP = "cleanup"            # stopped for longer than the cleanup TTL: remove it
    UNOWNED = "unowned"            # our labels, no record: left running for an operator (adopt / dispose)
    WAIT = "wait"                  # come back after ``delay`` (grace period, restart backoff, transition)
    BLOCKED = "blocked"            # the name is held by a container that is not ours
    NODE_LOST = "node_lost"        # the unit's node is lost: record it (not a crash)
    MOVE = "move"                  # lost for longer than the grace: unpin the game, avoid the node (recreated)
    LOST_STOP = "lost_stop"        # lost for longer than the grace under RTMANAGER_NODE_LOSS=stop: desired stopped


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str = ""
    delay: float = 0.0  # for WAIT: seconds until it is worth looking again
    # A planned disruption of a running engine: ask the engine whether it generates a turn first
    # (for a WAIT: look again, the wait may be over).
    check_engine: bool = False
    overdue: float | None = None  # the disruption waited this long for a generation and goes ahead anyway
    then: ActionKind | None = None  # for a WAIT with check_engine: the disruption it holds back
    node: str = ""  # for NODE_LOST, MOVE and LOST_STOP: the lost node

    @property
    def is_noop(self) -> bool:
        return self.kind is ActionKind.NOOP


NOOP = Action(ActionKind.NOOP)
_TRANSIENT_STATES = ("removing",)
DISRUPTION_POLL = 1.0  # seconds between looks at an engine a disruption waits for
DISRUPTIONS = (ActionKind.STOP, ActionKind.REMOVE, ActionKind.CLEANUP, ActionKind.RECREATE)


def own_deadline_left(record: RuntimeRecord, now: datetime) -> float:
    """Seconds left until the generation's own turn-boundary deadline (a drain's); 0 without one."""
    until = disruption_deadline(record)
    return (until - now).total_seconds() if until is not None else 0.0


def disruption_wait_left(record: RuntimeRecord, now: datetime, *, disruption_wait: float, waited: float) -> float:
    """Seconds a disruption that has waited ``waited`` may still wait for a turn boundary: what is left of
    RTMANAGER_DISRUPTION_WAIT, or of the generation's own deadline (a drain's), whichever is later."""
    return max(disruption_wait - waited, own_deadline_left(record, now))


def disruption_deadline(record: RuntimeRecord) -> datetime | None:
    """The turn-boundary deadline of the record's generation's own (a drain's: its deadline), or None."""
    if record.disruption_until is not None and record.disruption_generation == record.generation:
        return record.disruption_until
    return None


def planned_disruption(action: Action, record: RuntimeRecord, container: ObservedContainer | None, *,
                       now: datetime, disruption_wait: float) -> Action:
    """``action`` as it may be carried out now, or a WAIT while the engine generates a turn."""
    if action.kind not in DISRUPTIONS or container is None or not container.running:
        return action  # nothing runs that a disruption could cut
    own = own_deadline_left(record, now)
    if (disruption_wait <= 0 and own <= 0) or record.force_generation == record.generation:
        return action
    if action.kind is ActionKind.RECREATE and record.current_container_id != container.id:
        # A unit under the game's name that the record does not name (a record restored from an older
        # backup, the engine of a rollback a job overtook): the game's engine all the same. It is asked
        # whether it generates a turn, its answer not written on the record (controller/reconciler.py).
        return Action(action.kind, action.reason, check_engine=True)
    if record.admin_api is False:
        return action
    if record.status is Status.GENERATION_IN_PROGRESS:
        since = record.disruption_wait_since or now
        waited = max(0.0, (now - since).total_seconds())
        left = disruption_wait - waited
        if left > 0 or own > 0:
            nxt = f"turn {record.turn + 1}" if record.turn is not None else "a turn"
            why = (f"{own:.0f}s left until this generation's own deadline" if own > left
                   else f"{left:.0f}s of RTMANAGER_DISRUPTION_WAIT left")
            return Action(ActionKind.WAIT, f"{action.kind.value} waits: the engine is generating {nxt} ({why})",
                          delay=min(DISRUPTION_POLL, max(left, own)), check_engine=True, then=action.kind)
        # Asked once more: a generation begun since the wait began (a record restored from an older backup,
        # a turn that ended unseen) has a wait of its own (desired/transitions.py ``observed``).
        return Action(action.kind, f"{action.reason}; the engine still generates a turn after {waited:.0f}s "
                                   f"(RTMANAGER_DISRUPTION_WAIT {disruption_wait:g}s): going ahead anyway",
                      overdue=waited, check_engine=True)
    return Action(action.kind, action.reason, check_engine=True)


def _node_lost(record: RuntimeRecord, container: ObservedContainer | None, node: str, now: datetime,
               policy: NodeLossPolicy, *, lost: bool = True) -> Action:
    """A unit out of sight on a lost node (or no unit, and the node the game is pinned to is lost): never a
    crash, never a start there (it would wait for the node, holding a worker); after the grace period, what
    RTMANAGER_NODE_LOSS says. ``lost`` False: the node is up but drained by its operator (Swarm shut the
    engine down): the state there is intact, so the game waits for it, or moves only with shared state."""
    if record.status is Status.STOPPED:
        # Asked to run again while its node is lost: the start records it as starting, finds the node lost
        # (refused at once, tried again later) and the next look records it node_lost.
        kind = ActionKind.START if container is not None else ActionKind.CREATE
        state = container.state if container is not None else "gone"
        return Action(kind, f"container is {state}; its node {node[:12]} is lost")
    if record.status is not Status.NODE_LOST:
        return Action(ActionKind.NODE_LOST, f"the engine's node {node[:12]} is lost (not a crash)", node=node)
    step = node_loss_step(record, now, policy, drained=not lost)
    if step.kind == "move":
        return Action(ActionKind.MOVE, step.why, node=node)
    if step.kind == "stop":
        return Action(ActionKind.LOST_STOP, step.why, node=node)
    return Action(ActionKind.WAIT, step.why, delay=step.delay)


def plan(
    record: RuntimeRecord | None,
    container: ObservedContainer | None,
    *,
    want_hash: str | None,
    instance: str,
    now: datetime,
    orphan_grace: float = 10.0,
    cleanup_ttl: float = 0.0,
    database: str = "",
    epoch: int = 0,
    unreachable_restart_after: float = 0.0,
    disruption_wait: float = 0.0,
    node_loss: NodeLossPolicy = NodeLossPolicy(),
    lost_nodes: frozenset[str] = frozenset(),
) -> Action:
    """``database`` and ``epoch``: the identity uid of this database and the current leadership
    term; they only say how an unowned unit is reported (it is never disposed of here).
    ``lost_nodes``: the backend's nodes that are down or unreachable now (a Swarm's; empty on one host)."""
    action = _plan(record, container, want_hash=want_hash, instance=instance, now=now, orphan_grace=orphan_grace,
                   cleanup_ttl=cleanup_ttl, database=database, epoch=epoch,
                   unreachable_restart_after=unreachable_restart_after, node_loss=node_loss,
                   lost_nodes=lost_nodes)
    if record is None or action.kind not in DISRUPTIONS:
        return action
    ours = container if container is not None and container.unit_of(instance, record.game_id) else None
    return planned_disruption(action, record, ours, now=now, disruption_wait=disruption_wait)


def held(container: ObservedContainer) -> str:
    """Why a game cannot have its unit's name: whose unit holds it. The name is the contract's
    (``galaxy-game-{game_id}``, no instance in it) and Lobby gives each game id to one instance, so
    another instance's unit there is a game of that instance, never this one's to take over."""
    owner = container.owner
    if owner is None:
        return f"the name {container.name} is held by a container rtmanager does not manage"
    if container.game_id and container.name != container_name(container.game_id):
        return (f"the name {container.name} is held by a unit of game {container.game_id} (renamed from outside?); "
                "it is left as it is: rename it back")
    return (f"the name {container.name} is held by the unit of rtmanager instance {owner}: game "
            f"{container.game_id or container.name} runs under that instance (a game id belongs to one instance)")


def _plan(
    record: RuntimeRecord | None,
    container: ObservedContainer | None,
    *,
    want_hash: str | None,
    instance: str,
    now: datetime,
    orphan_grace: float,
    cleanup_ttl: float,
    database: str,
    epoch: int,
    unreachable_restart_after: float,
    node_loss: NodeLossPolicy,
    lost_nodes: frozenset[str] = frozenset(),
) -> Action:
    # A unit of this instance under the game's name is the game's only if its labels name the game: one of
    # another game there (renamed from outside) holds the name like a stranger's, never to be stopped.
    ours = container is not None and (container.unit_of(instance, record.game_id) if record is not None
                                      else container.managed_by(instance))

    if record is None or (record.status is Status.REMOVED and record.desired_status is DesiredStatus.REMOVED
                          and record.converged and not ours):
        if not ours:
            return NOOP
        assert container is not None
        if record is None:
            if not container.created_under(database, epoch):
                return Action(ActionKind.UNOWNED, f"{container.name} was not created under this database; "
                                                  "left running for an operator (rtmanager adopt / dispose)")
            age = (now - container.created_at).total_seconds() if container.created_at else orphan_grace
            if age < orphan_grace:
                return Action(ActionKind.WAIT, f"orphan {container.name} younger than the grace period",
                              delay=max(0.1, orphan_grace - age))
            return Action(ActionKind.UNOWNED, f"{container.name} was created under this database but has no "
                                              "runtime record (was the database restored from an older backup?); "
                                              "left running for an operator (rtmanager adopt / dispose)")

    if container is not None and not ours:
        if record.desired_status is DesiredStatus.RUNNING:
            return Action(ActionKind.BLOCKED, held(container))
        container = None  # somebody else's; for stop and remove it is as if there were none

    if container is not None and container.state in _TRANSIENT_STATES:
        return Action(ActionKind.WAIT, f"container is {container.state}", delay=1.0)

    desired = record.desired_status
    if desired is DesiredStatus.RUNNING:
        backoff = (record.restart_not_before - now).total_seconds() if record.restart_not_before else 0.0
        if container is None:
            if backoff > 0:  # the crashed container vanished: the backoff still holds
                return Action(ActionKind.WAIT, "restart backoff after a crash", delay=backoff)
            if record.node_id and record.node_id in lost_nodes:
                # No unit (a start or a move removed it, a kill came between): the game is still pinned to
                # its lost node, where its state is: node loss, its grace and its policy, not a start there.
                return _node_lost(record, None, record.node_id, now, node_loss)
            return Action(ActionKind.CREATE, "no container")
        if not container.running:
            # Node loss is decided before any replacement: a job or a drift that wants a new unit must not
            # remove the only unit of a game whose node is lost (and start nowhere): only the policy's
            # move, which unpins the game, lets the unit be recreated elsewhere.
            node = container.node or record.node_id or ""
            lost = container.node_lost or (bool(node) and node in lost_nodes)
            moved_off = bool(node) and node in record.avoid_nodes and record.node_id != node
            if (lost or container.node_drained) and not moved_off:
                return _node_lost(record, container, node, now, node_loss, lost=lost)
        if container.spec_hash != want_hash:
            return Action(ActionKind.RECREATE, f"spec hash {container.spec_hash} != {want_hash}")
        if container.state == "paused":
            return Action(ActionKind.RECREATE, "container was paused from outside")
        if not container.running:
            if record.status.is_up and record.current_container_id == container.id:
                return Action(ActionKind.RECOVER, f"container exited on its own (exit code {container.exit_code})")
            if backoff > 0:
                return Action(ActionKind.WAIT, "restart backoff after a crash", delay=backoff)
            return Action(ActionKind.START, f"container is {container.state}")
        if (record.status is Status.ENGINE_UNREACHABLE and unreachable_restart_after > 0
                and record.unreachable_since is not None and record.current_container_id == container.id):
            left = unreachable_restart_after - (now - record.unreachable_since).total_seconds()
            if left <= 0:
                if container.node and container.node in lost_nodes:
                    # Swarm still calls its task running, but the node is out of reach: a restart could only
                    # wait for the node; it is looked at again as a game that waits for its node.
                    return Action(ActionKind.WAIT, f"engine unreachable on its lost node {container.node[:12]}; "
                                                   "not restarted there", delay=NODE_LOSS_POLL)
                return Action(ActionKind.RECOVER, f"engine unreachable for more than {unreachable_restart_after:g}s")
        if (record.status.is_up and record.current_container_id == container.id and record.desired_turn is not None
                and (record.turn is None or record.turn < record.desired_turn)
                and record.status is not Status.FINISHED):
            return Action(ActionKind.TURN, f"turn {record.desired_turn} wanted, the engine is at {record.turn}")
        if record.status.is_up and record.current_container_id == container.id:
            # The generation changes nothing about what runs (pause, resume, reconcile, the turn
            # clock): converging it is recording it. Never a health wait that could fail it, so
            # an engine that does not answer is not taken down by a control job.
            return NOOP if record.converged else Action(ActionKind.RECORD, "the running engine is already right")
        return Action(ActionKind.CONFIRM, "container runs; record not yet converged")

    if desired is DesiredStatus.STOPPED:
        if container is not None and container.running:
            return Action(ActionKind.STOP, "desired stopped")
        current_id = container.id if container is not None else None
        if (container is None and record.status is Status.STOPPED and record.converged and record.current_container_id
                and cleanup_ttl > 0 and record.stopped_at is not None
                and now - record.stopped_at >= timedelta(seconds=cleanup_ttl)):
            # The cleanup's removal was done and its record was not (a kill between the two, or a database
            # restored to before it): recorded now. Before the TTL, a container gone is only "nothing runs".
            return Action(ActionKind.CLEANUP, f"stopped for more than {cleanup_ttl:g}s; its container is gone")
        if record.status is Status.STOPPED and record.converged and record.current_container_id == current_id:
            if (container is not None and cleanup_ttl > 0 and record.stopped_at is not None
                    and now - record.stopped_at >= timedelta(seconds=cleanup_ttl)):
                return Action(ActionKind.CLEANUP, f"stopped for more than {cleanup_ttl:g}s")
            return NOOP
        return Action(ActionKind.MARK_STOPPED, "nothing runs")

    # desired removed
    if container is not None:
        return Action(ActionKind.REMOVE, "desired removed")
    if record.status is Status.REMOVED and record.converged:
        return NOOP
    return Action(ActionKind.MARK_REMOVED, "container gone")
