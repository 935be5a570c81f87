"""Pure policies of the controller, next to the planner: no I/O, tested as tables.

* ``next_crash``: one more crash of a running game; how many in the window, how
  long to wait before the restart, and whether this one gives the game up.
* ``rollback_target``: when a job's new engine fails, the image the game ran
  before (to start again on the same state directory), or None.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from desired.model import RuntimeRecord, Status

CRASH_BACKOFF_BASE = 0.1  # seconds, doubled per crash like Docker's restart delay


@dataclass(frozen=True, kw_only=True)
class CrashPolicy:
    limit: int          # the limit-th crash within the window is terminal
    window: float       # seconds: a crash counts with the previous ones if it came within this
    backoff_max: float  # seconds: the restart delay doubles from 0.1 s up to this


@dataclass(frozen=True, kw_only=True)
class CrashVerdict:
    count: int
    give_up: bool
    delay: float  # seconds before the restart (0 when giving up)


def next_crash(record: RuntimeRecord, now: datetime, policy: CrashPolicy) -> CrashVerdict:
    recent = (record.last_crash_at is not None
              and (now - record.last_crash_at).total_seconds() < policy.window)
    count = record.crash_count + 1 if recent else 1
    if count >= policy.limit:
        return CrashVerdict(count=count, give_up=True, delay=0.0)
    return CrashVerdict(count=count, give_up=False,
                        delay=min(CRASH_BACKOFF_BASE * 2 ** (count - 1), policy.backoff_max))


def rollback_target(record: RuntimeRecord) -> str | None:
    """The image to start again when the engine a job asked for failed, or None (stop instead).

    Only a game that was running when the job came in is rolled back, and only once:
    the rollback generation's own failure stops the game. Never to the image the failed
    generation itself asked for: that would only wait for the same engine once more."""
    if record.rolling_back:
        return None
    target = None
    if record.status.is_up and record.current_container_id:
        target = record.current_image_ref  # failed before the running engine was touched
    elif record.status is Status.STARTING:
        target = record.rollback_image_ref
    return target if target != record.desired_image_ref else None


class NodeLoss(enum.StrEnum):
    """RTMANAGER_NODE_LOSS: what becomes of a game whose node is lost, once the grace period has passed."""

    WAIT = "wait"                # for the node to come back (its state is there)
    RESCHEDULE = "reschedule"    # elsewhere, when the state root is shared storage; otherwise wait
    RESCHEDULE_WITHOUT_STATE = "reschedule_without_state"  # elsewhere, on the state found there (or a new one)
    STOP = "stop"                # desired stopped (a new generation); a later start waits for the node


@dataclass(frozen=True, kw_only=True)
class NodeLossPolicy:
    mode: NodeLoss = NodeLoss.WAIT
    grace: float = 120.0        # seconds from when the node was seen lost
    state_shared: bool = False  # RTMANAGER_STATE_SHARED: every node sees the state root's contents


NODE_LOSS_POLL = 10.0  # seconds between looks at a game that waits for its node


@dataclass(frozen=True, kw_only=True)
class NodeLossStep:
    """``wait`` (look again after ``delay``), ``move`` (off the lost node) or ``stop``; ``why`` says it."""

    kind: str
    delay: float = 0.0
    why: str = ""


def node_loss_step(record: RuntimeRecord, now: datetime, policy: NodeLossPolicy, *,
                   drained: bool = False) -> NodeLossStep:
    """What a game in ``node_lost`` does now: wait out the grace period, then what the policy says. A game
    is moved without its state only when the policy says so explicitly (``reschedule_without_state``).

    ``drained``: the node is up, drained by its operator (maintenance): the game's state there is intact,
    so it is neither stopped nor moved without its state; it waits for the node, or (RTMANAGER_NODE_LOSS
    reschedule or reschedule_without_state, the state root shared) moves with its state."""
    since = record.node_lost_since or now
    left = policy.grace - max(0.0, (now - since).total_seconds())
    node = (record.node_id or "?")[:12]
    if left > 0:
        return NodeLossStep(kind="wait", delay=min(left, NODE_LOSS_POLL),
                            why=f"node {node} lost; {left:.0f}s of RTMANAGER_NODE_LOSS_GRACE left")
    if drained:
        if policy.mode in (NodeLoss.RESCHEDULE, NodeLoss.RESCHEDULE_WITHOUT_STATE) and policy.state_shared:
            return NodeLossStep(kind="move", why=f"node {node} drained for more than {policy.grace:g}s: moving "
                                                 "the game elsewhere with its state (shared storage)")
        return NodeLossStep(kind="wait", delay=NODE_LOSS_POLL,
                            why=f"node {node} drained by its operator; waiting for it (its state is there)")
    if policy.mode is NodeLoss.STOP:
        return NodeLossStep(kind="stop", why=f"node {node} lost for more than {policy.grace:g}s "
                                             "(RTMANAGER_NODE_LOSS=stop)")
    if policy.mode is NodeLoss.RESCHEDULE_WITHOUT_STATE or (policy.mode is NodeLoss.RESCHEDULE and policy.state_shared):
        with_state = "with its state (shared storage)" if policy.state_shared else "without its state"
        return NodeLossStep(kind="move", why=f"node {node} lost for more than {policy.grace:g}s: moving the game "
                                             f"elsewhere {with_state} (RTMANAGER_NODE_LOSS={policy.mode.value})")
    why = (f"node {node} lost; waiting for it (RTMANAGER_NODE_LOSS=reschedule, but the state root is not shared: "
           "RTMANAGER_STATE_SHARED=0)" if policy.mode is NodeLoss.RESCHEDULE
           else f"node {node} lost; waiting for it (RTMANAGER_NODE_LOSS=wait)")
    return NodeLossStep(kind="wait", delay=NODE_LOSS_POLL, why=why)
