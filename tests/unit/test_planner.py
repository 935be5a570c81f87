"""controller.planner.plan as a table: every branch, with small factories."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controller.planner import NOOP, Action, ActionKind, plan
from desired.model import Status
from desired.policy import NodeLoss, NodeLossPolicy
from observed.model import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ObservedContainer,
)
from tests.support.planning import (
    EPOCH,
    GRACE,
    HASH,
    INSTANCE,
    KW,
    NOW,
    OLD_HASH,
    RM,
    ST,
    TTL,
    R,
    foreign,
    ours,
    record,
)

A = ActionKind
LOST = ours("exited", node="n2", node_lost=True)


# (id, record, container, extra plan kwargs, expected kind)
TABLE = [
    # no record
    ("no-record-no-container", None, None, {}, A.NOOP),
    ("no-record-young-orphan", None, ours(age=GRACE - 5), {}, A.WAIT),
    ("no-record-old-orphan", None, ours(age=GRACE + 5), {}, A.UNOWNED),
    ("no-record-old-orphan-exited", None, ours("exited", age=3600), {}, A.UNOWNED),
    ("no-record-orphan-no-created", None, ours(age=None), {}, A.UNOWNED),
    ("no-record-foreign", None, foreign(), {}, A.NOOP),
    # never dispose of a unit without a record: created under this database (a restored backup), another
    # database, none, or a later term
    ("no-record-other-database", None, ours(database="0e9a4f3c-0000-4000-8000-000000000000"), {}, A.UNOWNED),
    ("no-record-no-database-label", None, ours(database=None), {}, A.UNOWNED),
    ("no-record-from-a-later-term", None, ours(epoch=EPOCH + 1), {}, A.UNOWNED),
    ("no-record-empty-database-uid", None, ours(), {"database": ""}, A.UNOWNED),
    ("no-record-young-unowned", None, ours(age=1, database=None), {}, A.UNOWNED),
    ("no-record-other-instance", None, ours(instance="other"), {}, A.NOOP),
    # desired running
    ("running-no-container", record(Status.STARTING, R, converged=False), None, {}, A.CREATE),
    ("running-wrong-hash", record(Status.RUNNING, R), ours(spec_hash=OLD_HASH), {}, A.RECREATE),
    ("running-wrong-hash-exited", record(Status.STOPPED, R, converged=False),
     ours("exited", spec_hash=OLD_HASH), {}, A.RECREATE),
    ("running-no-hash-label", record(Status.RUNNING, R),
     ObservedContainer(id="c1", name="galaxy-game-g1", image="x", state="running",
                       labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: INSTANCE}), {}, A.RECREATE),
    ("running-exited-right-hash", record(Status.STOPPED, R, converged=False), ours("exited"), {}, A.START),
    ("running-created-right-hash", record(Status.STARTING, R, converged=False), ours("created"), {}, A.START),
    ("running-right-hash-not-converged", record(Status.STARTING, R, converged=False), ours(), {}, A.CONFIRM),
    # a generation that changes nothing about what runs (pause, resume, reconcile) is only recorded
    ("running-right-hash-record-running-unconverged", record(Status.RUNNING, R, converged=False), ours(), {},
     A.RECORD),
    ("unreachable-engine-unconverged", record(Status.ENGINE_UNREACHABLE, R, converged=False), ours(), {},
     A.RECORD),
    ("running-right-hash-other-container-id", record(Status.RUNNING, R, cid="c0"), ours(), {}, A.CONFIRM),
    ("running-converged", record(Status.RUNNING, R), ours(), {}, A.NOOP),
    # turns: desired state asks for a turn the engine has not reached
    ("turn-wanted", record(Status.RUNNING, R, converged=False, turn=4, desired_turn=5), ours(), {}, A.TURN),
    ("turn-wanted-turn-unknown", record(Status.RUNNING, R, converged=False, desired_turn=1), ours(), {}, A.TURN),
    ("turn-reached", record(Status.RUNNING, R, converged=False, turn=5, desired_turn=5), ours(), {}, A.RECORD),
    ("turn-while-generating", record(Status.GENERATION_IN_PROGRESS, R, converged=False, turn=4, desired_turn=5),
     ours(), {}, A.TURN),
    ("turn-of-a-finished-game", record(Status.FINISHED, R, converged=False, turn=9, desired_turn=10), ours(), {},
     A.RECORD),
    ("generation-failed-converged", record(Status.GENERATION_FAILED, R, turn=4), ours(), {}, A.NOOP),
    # the container of a running game exited on its own; crash backoff
    ("running-container-exited-on-its-own", record(Status.RUNNING, R), ours("exited"), {}, A.RECOVER),
    ("running-container-dead-on-its-own", record(Status.RUNNING, R), ours("dead"), {}, A.RECOVER),
    ("running-unconverged-container-exited", record(Status.RUNNING, R, converged=False), ours("exited"), {},
     A.RECOVER),
    ("running-exited-container-not-the-recorded-one", record(Status.RUNNING, R, cid="c0"), ours("exited"), {},
     A.START),
    ("restart-backoff-pending", record(Status.STARTING, R, current_container_id="c1",
                                       restart_not_before=NOW + timedelta(seconds=5)), ours("exited"), {}, A.WAIT),
    ("restart-backoff-over", record(Status.STARTING, R, current_container_id="c1",
                                    restart_not_before=NOW - timedelta(seconds=1)), ours("exited"), {}, A.START),
    ("restart-backoff-ends-exactly-now", record(Status.STARTING, R, current_container_id="c1",
                                                restart_not_before=NOW), ours("exited"), {}, A.START),
    ("restart-backoff-does-not-hold-a-new-spec", record(Status.STARTING, R, current_container_id="c1",
                                                        restart_not_before=NOW + timedelta(seconds=5)),
     ours("exited", spec_hash=OLD_HASH), {}, A.RECREATE),
    ("running-converged-restarting", record(Status.RUNNING, R), ours("restarting"), {}, A.NOOP),
    ("running-foreign-holds-name", record(Status.STARTING, R, converged=False), foreign(), {}, A.BLOCKED),
    ("running-foreign-exited-holds-name", record(Status.RUNNING, R), foreign("exited"), {}, A.BLOCKED),
    ("running-other-instance-holds-name", record(Status.STARTING, R, converged=False),
     ours(instance="other"), {}, A.BLOCKED),
    # foreign container while desired stopped / removed: as if none
    ("stopped-foreign-record-running", record(Status.RUNNING, ST, converged=False), foreign(), {}, A.MARK_STOPPED),
    ("stopped-foreign-converged", record(Status.STOPPED, ST, cid=None), foreign(), {}, A.NOOP),
    ("removed-foreign-record-stopped", record(Status.STOPPED, RM, converged=False), foreign(), {}, A.MARK_REMOVED),
    # desired stopped
    ("stopped-running-container", record(Status.RUNNING, ST, converged=False), ours(), {}, A.STOP),
    ("stopped-restarting-container", record(Status.RUNNING, ST, converged=False), ours("restarting"), {}, A.STOP),
    ("stopped-running-container-wrong-hash", record(Status.RUNNING, ST, converged=False),
     ours(spec_hash=OLD_HASH), {}, A.STOP),
    ("stopped-exited-record-running", record(Status.RUNNING, ST, converged=False), ours("exited"), {},
     A.MARK_STOPPED),
    ("stopped-exited-record-stopped-unconverged", record(Status.STOPPED, ST, converged=False), ours("exited"), {},
     A.MARK_STOPPED),
    ("stopped-exited-other-container-id", record(Status.STOPPED, ST, cid="c0"), ours("exited"), {},
     A.MARK_STOPPED),
    ("stopped-no-container-record-starting", record(Status.STARTING, ST, converged=False), None, {},
     A.MARK_STOPPED),
    ("stopped-no-container-record-keeps-id", record(Status.STOPPED, ST, cid="c1"), None, {}, A.MARK_STOPPED),
    ("stopped-no-container-converged", record(Status.STOPPED, ST, cid=None), None, {}, A.NOOP),
    ("stopped-converged", record(Status.STOPPED, ST), ours("exited"), {}, A.NOOP),
    ("stopped-ttl-expired", record(Status.STOPPED, ST, stopped_ago=TTL + 1), ours("exited"),
     {"cleanup_ttl": TTL}, A.CLEANUP),
    ("stopped-ttl-exactly", record(Status.STOPPED, ST, stopped_ago=TTL), ours("exited"),
     {"cleanup_ttl": TTL}, A.CLEANUP),
    ("stopped-ttl-not-expired", record(Status.STOPPED, ST, stopped_ago=TTL - 1), ours("exited"),
     {"cleanup_ttl": TTL}, A.NOOP),
    ("stopped-ttl-disabled", record(Status.STOPPED, ST, stopped_ago=10 * TTL), ours("exited"),
     {"cleanup_ttl": 0.0}, A.NOOP),
    ("stopped-ttl-expired-no-container", record(Status.STOPPED, ST, cid=None, stopped_ago=TTL + 1), None,
     {"cleanup_ttl": TTL}, A.NOOP),
    ("stopped-ttl-expired-unconverged", record(Status.STOPPED, ST, converged=False, stopped_ago=TTL + 1),
     ours("exited"), {"cleanup_ttl": TTL}, A.MARK_STOPPED),
    # desired removed
    ("removed-exited-container", record(Status.STOPPED, RM, converged=False), ours("exited"), {}, A.REMOVE),
    ("removed-running-container", record(Status.RUNNING, RM, converged=False), ours(), {}, A.REMOVE),
    ("removed-no-container-record-stopped", record(Status.STOPPED, RM, converged=False, cid=None), None, {},
     A.MARK_REMOVED),
    ("removed-no-container-record-removed-unconverged", record(Status.REMOVED, RM, converged=False), None, {},
     A.MARK_REMOVED),
    ("removed-converged", record(Status.REMOVED, RM), None, {}, A.NOOP),
    ("removed-converged-foreign", record(Status.REMOVED, RM), foreign(), {}, A.NOOP),
    ("removed-converged-leftover-ours", record(Status.REMOVED, RM), ours("exited"), {}, A.REMOVE),
    # containers in transition
    ("removing-desired-running", record(Status.RUNNING, R), ours("removing"), {}, A.WAIT),
    ("removing-desired-stopped", record(Status.STOPPED, ST), ours("removing"), {}, A.WAIT),
    ("removing-desired-removed", record(Status.STOPPED, RM, converged=False), ours("removing"), {}, A.WAIT),
    ("paused-desired-running", record(Status.RUNNING, R), ours("paused"), {}, A.RECREATE),
    ("paused-desired-stopped", record(Status.RUNNING, ST), ours("paused"), {}, A.STOP),
    # a unit out of sight on a lost node (Swarm): never a crash, never a start there; the policy after the grace
    ("node-lost-running-game", record(Status.RUNNING, R), LOST, {}, A.NODE_LOST),
    ("node-lost-restarting-game", record(Status.STARTING, R, current_container_id="c1"), LOST, {}, A.NODE_LOST),
    ("node-lost-unreachable-game", record(Status.ENGINE_UNREACHABLE, R), LOST, {}, A.NODE_LOST),
    ("node-lost-within-grace", record(Status.NODE_LOST, R), LOST,
     {"node_loss": NodeLossPolicy(mode=NodeLoss.RESCHEDULE, grace=60, state_shared=True)}, A.WAIT),
    ("node-lost-reschedule-shared", record(Status.NODE_LOST, R), LOST,
     {"node_loss": NodeLossPolicy(mode=NodeLoss.RESCHEDULE, grace=20, state_shared=True)}, A.MOVE),
    ("node-lost-reschedule-node-local-state-waits", record(Status.NODE_LOST, R), LOST,
     {"node_loss": NodeLossPolicy(mode=NodeLoss.RESCHEDULE, grace=20, state_shared=False)}, A.WAIT),
    ("node-lost-reschedule-without-state", record(Status.NODE_LOST, R), LOST,
     {"node_loss": NodeLossPolicy(mode=NodeLoss.RESCHEDULE_WITHOUT_STATE, grace=20)}, A.MOVE),
    ("node-lost-stop", record(Status.NODE_LOST, R), LOST, {"node_loss": NodeLossPolicy(mode=NodeLoss.STOP, grace=20)},
     A.LOST_STOP),
    ("node-lost-wait", record(Status.NODE_LOST, R), LOST, {"node_loss": NodeLossPolicy(mode=NodeLoss.WAIT, grace=0)},
     A.WAIT),
    ("node-lost-moved-is-recreated", record(Status.NODE_LOST, R, node_id=None, avoid_nodes=("n2",), spec_revision=1),
     ours("exited", spec_hash=OLD_HASH, node="n2", node_lost=True),
     {"node_loss": NodeLossPolicy(mode=NodeLoss.RESCHEDULE, grace=20, state_shared=True)}, A.RECREATE),
    ("node-back-engine-exited", record(Status.NODE_LOST, R), ours("exited", node="n2"), {}, A.START),
    ("node-back-engine-still-runs", record(Status.NODE_LOST, R), ours(node="n2"), {}, A.CONFIRM),
    ("node-lost-desired-stopped", record(Status.NODE_LOST, ST, converged=False), LOST, {}, A.MARK_STOPPED),
    ("node-lost-stopped-game-asked-to-run", record(Status.STOPPED, R, converged=False), LOST, {}, A.START),
    ("node-lost-desired-removed", record(Status.NODE_LOST, RM, converged=False), LOST, {}, A.REMOVE),
]


@pytest.mark.parametrize(("rec", "container", "kwargs", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_plan(rec, container, kwargs, expected: ActionKind) -> None:
    kw = dict(KW)
    kw.update(kwargs)
    action = plan(rec, container, **kw)
    assert isinstance(action, Action)
    assert action.kind is expected, action.reason
    assert action.is_noop == (expected is A.NOOP)
    if expected is not A.NOOP:
        assert action.reason  # every action says why, for logs


def test_a_name_held_by_another_instance_says_whose_unit_it_is() -> None:
    """Lobby gives a game id to one instance: a start of an id another instance runs is refused
    naming that instance (its labels), and an unlabelled container is said to be nobody's."""
    starting = record(Status.STARTING, R, converged=False)
    other = plan(starting, ours(instance="blue"), **KW)
    assert other.kind is A.BLOCKED
    assert "galaxy-game-g1 is held by the unit of rtmanager instance blue" in other.reason
    nobody = plan(starting, foreign(), **KW)
    assert nobody.kind is A.BLOCKED and "rtmanager does not manage" in nobody.reason


def test_table_covers_every_action_kind() -> None:
    assert {row[-1] for row in TABLE} == set(ActionKind)


@pytest.mark.parametrize(("rec", "container", "delay"), [
    (None, ours(age=GRACE - 4), 4.0),
    (None, ours(age=GRACE - 0.001), 0.1),  # never busy-loops on an almost expired grace
    (record(Status.RUNNING, R), ours("removing"), 1.0),
    (record(Status.STARTING, R, restart_not_before=NOW + timedelta(seconds=3)), None, 3.0),
    (record(Status.STARTING, R, current_container_id="c1", restart_not_before=NOW + timedelta(seconds=2.5)),
     ours("exited"), 2.5),
], ids=["orphan-grace", "orphan-grace-floor", "removing", "backoff-container-vanished", "restart-backoff"])
def test_wait_says_when_to_look_again(rec, container, delay: float) -> None:
    action = plan(rec, container, **KW)
    assert action.kind is A.WAIT
    assert action.delay == pytest.approx(delay)


@pytest.mark.parametrize("row", [row for row in TABLE if row[-1] is not A.WAIT], ids=lambda row: row[0])
def test_only_wait_carries_a_delay(row) -> None:
    _, rec, container, kwargs, _ = row
    assert plan(rec, container, **{**KW, **kwargs}).delay == 0.0


def test_orphan_grace_boundary() -> None:
    kw = {**KW, "want_hash": None}
    assert plan(None, ours(age=GRACE - 0.001), **kw).kind is A.WAIT
    assert plan(None, ours(age=GRACE), **kw).kind is A.UNOWNED


def test_plan_does_not_mutate_inputs() -> None:
    rec = record(Status.STOPPED, ST, stopped_ago=TTL + 1)
    c = ours("exited")
    rec_before, c_before = rec.replace(), ObservedContainer(**{f: getattr(c, f) for f in c.__dataclass_fields__})
    plan(rec, c, want_hash=HASH, instance=INSTANCE, now=NOW, cleanup_ttl=TTL)
    assert rec == rec_before and c == c_before


def test_noop_constant() -> None:
    assert NOOP.kind is A.NOOP and NOOP.is_noop
    assert not Action(A.CREATE).is_noop
