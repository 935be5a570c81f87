"""desired.model: the status machine, the record invariants, the wire form of results."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from desired.model import (
    DesiredStatus,
    ErrorCode,
    InvalidRecord,
    InvalidTransition,
    JobKind,
    JobResult,
    Outcome,
    RuntimeRecord,
    Status,
    check_transition,
    container_name,
    engine_endpoint,
)

S = Status
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)

# Written out by hand (not derived from TRANSITIONS): Y = allowed. Columns in the order of the rows.
_MATRIX = """
                        starting running gen_in_progress gen_failed unreachable finished node_lost stopped removed
starting                .        Y       Y               Y          Y           Y        Y         Y       Y
running                 Y        .       Y               Y          Y           Y        Y         Y       Y
generation_in_progress  Y        Y       .               Y          Y           Y        Y         Y       Y
generation_failed       Y        Y       Y               .          Y           Y        Y         Y       Y
engine_unreachable      Y        Y       Y               Y          .           Y        Y         Y       Y
finished                Y        Y       Y               Y          Y           .        Y         Y       Y
node_lost               Y        Y       Y               Y          Y           Y        .         Y       Y
stopped                 Y        .       .               .          .           .        .         .       Y
removed                 .        .       .               .          .           .        .         .       .
"""
_ORDER = [S.STARTING, S.RUNNING, S.GENERATION_IN_PROGRESS, S.GENERATION_FAILED, S.ENGINE_UNREACHABLE, S.FINISHED,
          S.NODE_LOST, S.STOPPED, S.REMOVED]
TRANSITION_TABLE: dict[tuple[Status, Status], bool] = {
    (S(row.split()[0]), to): cell == "Y"
    for row in _MATRIX.strip().splitlines()[1:]
    for to, cell in zip(_ORDER, row.split()[1:], strict=True)
}


def test_transition_table_covers_every_pair() -> None:
    assert set(TRANSITION_TABLE) == set(itertools.product(Status, Status))


@pytest.mark.parametrize(
    ("frm", "to", "allowed"),
    [(f, t, a) for (f, t), a in TRANSITION_TABLE.items()],
    ids=[f"{f.value}->{t.value}" for (f, t) in TRANSITION_TABLE],
)
def test_check_transition(frm: Status, to: Status, allowed: bool) -> None:
    if allowed:
        assert check_transition(frm, to) is None
    else:
        with pytest.raises(InvalidTransition) as exc:
            check_transition(frm, to)
        assert f"{frm.value} -> {to.value}" in str(exc.value)


def test_only_removed_is_terminal() -> None:
    assert [s for s in Status if s.is_terminal] == [Status.REMOVED]


def test_names_and_endpoint() -> None:
    assert container_name("g1") == "galaxy-game-g1"
    assert engine_endpoint("g1", 8080) == "http://galaxy-game-g1:8080"


# --------------------------------------------------------------------- records

def make_record(status: Status, **changes) -> RuntimeRecord:
    """A valid record in ``status``; ``changes`` are applied on top."""
    base = dict(
        game_id="g1",
        status=status,
        current_container_id=None,
        current_image_ref=None,
        engine_endpoint="http://galaxy-game-g1:8080",
        state_path="/var/lib/rtmanager/games/g1",
        docker_network="galaxy-games",
        started_at=None,
        stopped_at=None,
        removed_at=None,
        last_op_at=T0 + timedelta(seconds=30),
        created_at=T0,
        desired_status=DesiredStatus.RUNNING,
        desired_image_ref="galaxy/engine:1",
        generation=1,
        observed_generation=0,
    )
    if status.is_up:
        base.update(current_container_id="c1", current_image_ref="galaxy/engine:1",
                    started_at=T0 + timedelta(seconds=1), observed_generation=1)
    elif status is Status.STOPPED:
        base.update(current_container_id="c1", current_image_ref="galaxy/engine:1",
                    started_at=T0 + timedelta(seconds=1), stopped_at=T0 + timedelta(seconds=5),
                    desired_status=DesiredStatus.STOPPED, generation=2, observed_generation=2)
    elif status is Status.REMOVED:
        base.update(current_image_ref="galaxy/engine:1", started_at=T0 + timedelta(seconds=1),
                    stopped_at=T0 + timedelta(seconds=5), removed_at=T0 + timedelta(seconds=9),
                    desired_status=DesiredStatus.REMOVED, generation=3, observed_generation=3)
    base.update(changes)
    return RuntimeRecord(**base)


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.value)
def test_valid_record_per_status(status: Status) -> None:
    rec = make_record(status)
    rec.validate()
    assert rec.status is status


def test_converged() -> None:
    assert not make_record(Status.STARTING).converged
    assert make_record(Status.RUNNING).converged


def test_replace_returns_new_record() -> None:
    rec = make_record(Status.RUNNING)
    new = rec.replace(generation=2)
    assert new.generation == 2 and rec.generation == 1
    assert new is not rec


BREAKS = [
    ("running-without-container-id", Status.RUNNING, dict(current_container_id=None), "current_container_id"),
    ("running-with-empty-container-id", Status.RUNNING, dict(current_container_id=""), "current_container_id"),
    ("running-without-image", Status.RUNNING, dict(current_image_ref=None), "current_image_ref"),
    ("running-without-started-at", Status.RUNNING, dict(started_at=None), "started_at"),
    ("finished-without-container-id", Status.FINISHED, dict(current_container_id=None), "current_container_id"),
    ("unreachable-without-image", Status.ENGINE_UNREACHABLE, dict(current_image_ref=None), "current_image_ref"),
    ("negative-turn", Status.RUNNING, dict(turn=-1), "turn"),
    ("stopped-without-stopped-at", Status.STOPPED, dict(stopped_at=None), "stopped_at"),
    ("stopped-without-image", Status.STOPPED, dict(current_image_ref=None), "current_image_ref"),
    ("removed-with-container-id", Status.REMOVED, dict(current_container_id="c1"), "container id"),
    ("removed-without-removed-at", Status.REMOVED, dict(removed_at=None), "removed_at"),
    ("last-op-before-created", Status.STARTING, dict(last_op_at=T0 - timedelta(seconds=1)), "last_op_at"),
    ("started-before-created", Status.RUNNING, dict(started_at=T0 - timedelta(seconds=1)), "started_at"),
    ("stopped-before-started", Status.STOPPED, dict(stopped_at=T0), "stopped_at"),
    ("removed-before-created", Status.REMOVED, dict(removed_at=T0 - timedelta(seconds=1)), "removed_at"),
    ("observed-generation-above-generation", Status.RUNNING,
     dict(generation=1, observed_generation=2), "observed_generation"),
    ("negative-observed-generation", Status.STARTING, dict(observed_generation=-1), "observed_generation"),
    ("generation-zero", Status.STARTING, dict(generation=0, observed_generation=0), "generation"),
    ("desired-running-without-image", Status.STARTING, dict(desired_image_ref=None), "desired_image_ref"),
    ("desired-running-with-empty-image", Status.STARTING, dict(desired_image_ref=""), "desired_image_ref"),
    ("negative-spec-revision", Status.STARTING, dict(spec_revision=-1), "spec_revision"),
    ("negative-crash-count", Status.RUNNING, dict(crash_count=-1), "crash_count"),
    ("empty-endpoint", Status.STARTING, dict(engine_endpoint=" "), "engine_endpoint"),
    ("empty-state-path", Status.STARTING, dict(state_path=""), "state_path"),
    ("empty-network", Status.STARTING, dict(docker_network=""), "docker_network"),
    ("game-id-uppercase", Status.STARTING, dict(game_id="Game1"), "game_id"),
    ("game-id-empty", Status.STARTING, dict(game_id=""), "game_id"),
    ("game-id-slash", Status.STARTING, dict(game_id="a/b"), "game_id"),
    ("game-id-dotdot", Status.STARTING, dict(game_id=".."), "game_id"),
    ("game-id-leading-dash", Status.STARTING, dict(game_id="-a"), "game_id"),
    ("game-id-trailing-dash", Status.STARTING, dict(game_id="a-"), "game_id"),
    ("game-id-52-chars", Status.STARTING, dict(game_id="a" * 52), "game_id"),
    ("game-id-trailing-newline", Status.STARTING, dict(game_id="abc\n"), "game_id"),
]


@pytest.mark.parametrize(("status", "changes", "fragment"),
                         [b[1:] for b in BREAKS], ids=[b[0] for b in BREAKS])
def test_invariant_breaks_record(status: Status, changes: dict, fragment: str) -> None:
    make_record(status).validate()  # the base is valid: the change alone breaks it
    rec = make_record(status, **changes)
    with pytest.raises(InvalidRecord) as exc:
        rec.validate()
    assert fragment in str(exc.value)


@pytest.mark.parametrize("game_id", ["a", "0", "a-b", "g1", "a" * 51, "a" + "-" * 49 + "b"])
def test_good_game_ids_validate(game_id: str) -> None:
    make_record(Status.STARTING, game_id=game_id).validate()


# --------------------------------------------------------------------- results

WIRE_FIELDS = {"game_id", "outcome", "container_id", "engine_endpoint", "error_code",
               "error_message", "job", "job_entry_id", "result_id"}


def test_job_result_fields_minimal() -> None:
    fields = JobResult(result_id="r1", game_id="g1", outcome=Outcome.SUCCESS, job=JobKind.STOP).fields()
    assert set(fields) == WIRE_FIELDS
    assert len(fields) == 9
    assert all(isinstance(v, str) for v in fields.values())
    assert fields == {
        "game_id": "g1", "outcome": "success", "container_id": "", "engine_endpoint": "",
        "error_code": "", "error_message": "", "job": "stop", "job_entry_id": "", "result_id": "r1",
    }


def test_job_result_fields_full() -> None:
    fields = JobResult(result_id="r2", game_id="g1", outcome=Outcome.FAILURE, job=JobKind.START,
                       job_entry_id="1700000000000-0", container_id="abc",
                       engine_endpoint="http://galaxy-game-g1:8080",
                       error_code=ErrorCode.ENGINE_UNHEALTHY, error_message="no 2xx").fields()
    assert set(fields) == WIRE_FIELDS
    assert all(type(v) is str for v in fields.values())
    assert fields["outcome"] == "failure"
    assert fields["error_code"] == "engine_unhealthy"
    assert fields["job"] == "start"
    assert fields["job_entry_id"] == "1700000000000-0"
    assert fields["container_id"] == "abc"
    assert fields["error_message"] == "no 2xx"


def test_error_codes_are_the_contract() -> None:
    assert {c.value for c in ErrorCode} == {
        "replay_no_op", "invalid_request", "image_rejected", "image_unavailable",
        "container_start_failed", "engine_unhealthy", "superseded", "docker_unavailable",
        "internal_error", "generation_failed", "engine_unreachable", "engine_unsupported",
        "engine_refused", "storage_full", "host_drained",
    }
