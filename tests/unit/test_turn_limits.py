"""Issue 21, defect 4: an engine at the largest turn a record can hold.

The turn columns are 32-bit integers. An engine reporting turn 2147483647 (valid by the
contract) must not make the controller ask for turn 2147483648, which no column holds: that
game's turn work fails for that game, with a clear code and message, and nothing else does. An
engine reporting a number outside the columns' range is a garbage answer from that engine."""

from __future__ import annotations

from datetime import timedelta

import pytest

from desired.jobs import Job, decide, turn_due
from desired.model import MAX_TURN, DesiredStatus, ErrorCode, InvalidRecord, JobKind, OpSource, Status
from observed.engine import MAX_TURN as ENGINE_MAX_TURN
from observed.engine import parse_status
from observed.errors import EngineUnreachable
from tests.support.job_records import DEFAULTS, NOW, rec


def test_the_largest_turn_is_the_largest_32_bit_signed_integer():
    assert MAX_TURN == ENGINE_MAX_TURN == 2**31 - 1


def test_an_engine_at_the_largest_turn_is_believed():
    st = parse_status({"turn": MAX_TURN, "phase": "idle",
                       "last_generation": {"turn": MAX_TURN, "ok": True, "error": ""}})
    assert st.turn == MAX_TURN


@pytest.mark.parametrize("turn", [MAX_TURN + 1, 2**63, 10**40, -1, 1.5, 2.0, True, False, "7", None])
def test_a_turn_outside_the_columns_range_is_a_garbage_answer(turn):
    with pytest.raises(EngineUnreachable):
        parse_status({"turn": turn, "phase": "idle", "last_generation": None})


@pytest.mark.parametrize("turn", [MAX_TURN + 1, 10**40, -1, 1.5, True])
def test_a_last_generation_turn_outside_the_range_is_a_garbage_answer(turn):
    with pytest.raises(EngineUnreachable):
        parse_status({"turn": 3, "phase": "idle", "last_generation": {"turn": turn, "ok": False, "error": "x"}})


def test_a_game_at_the_largest_turn_gets_no_next_turn_and_its_job_fails_clearly():
    record = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1, turn=MAX_TURN, phase="idle", admin_api=True)
    d = decide(record, Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY), NOW, DEFAULTS)
    assert d.action == "reject"
    assert d.error_code is ErrorCode.GENERATION_FAILED
    assert str(MAX_TURN) in d.message and "largest" in d.message


def test_the_clock_never_asks_a_game_at_the_largest_turn_for_one_more():
    record = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1, turn=MAX_TURN, phase="idle", admin_api=True)
    record = record.replace(turn_interval=10, clock_from=NOW - timedelta(hours=1))
    assert not turn_due(record, NOW)
    d = decide(record, Job(kind=JobKind.TURN, game_id="g1", source=OpSource.SCHEDULER), NOW, DEFAULTS)
    assert d.action == "skip"  # no operation, no result: the clock's question is withdrawn
    assert turn_due(record.replace(turn=MAX_TURN - 1), NOW)


def test_the_turn_before_the_largest_may_still_be_asked_for():
    record = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1, turn=MAX_TURN - 1, phase="idle",
                 admin_api=True)
    d = decide(record, Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY), NOW, DEFAULTS)
    assert d.action == "change" and d.record is not None and d.record.desired_turn == MAX_TURN
    d.record.validate()


@pytest.mark.parametrize("field,value", [("turn", MAX_TURN + 1), ("desired_turn", MAX_TURN + 1),
                                         ("desired_turn", -1), ("last_exit_code", 2**31)])
def test_a_record_never_holds_a_number_its_column_cannot(field, value):
    record = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1)
    with pytest.raises(InvalidRecord):
        record.replace(**{field: value}).validate()
