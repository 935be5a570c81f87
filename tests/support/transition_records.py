"""Records for the transition and policy tables (tests/unit/test_transitions.py) and the state
directories' lifecycle tests: a running game with a turn, in any status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from desired.model import DesiredStatus, RuntimeRecord, Status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = Status


def rec(status: Status = S.RUNNING, **kw) -> RuntimeRecord:
    base = dict(game_id="g1", status=status, current_container_id="c1", current_image_ref="img:1",
                engine_endpoint="http://galaxy-game-g1:8080", state_path="/s/g1", docker_network="n",
                started_at=T0 + timedelta(seconds=1), stopped_at=None, removed_at=None,
                last_op_at=T0 + timedelta(seconds=2), created_at=T0, desired_status=DesiredStatus.RUNNING,
                desired_image_ref="img:1", generation=3, observed_generation=3, turn=4, phase="idle")
    if status is S.STARTING:
        base.update(observed_generation=2)
    if status is S.STOPPED:
        base.update(stopped_at=T0 + timedelta(seconds=2), desired_status=DesiredStatus.STOPPED)
    base.update(kw)
    r = RuntimeRecord(**base)
    r.validate()
    return r
