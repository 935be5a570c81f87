"""Records as the job rules see them (tests/unit/test_jobs.py and the tests of turn limits): a game
in a status with a desired status and generations, the record defaults, the times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from desired.jobs import RecordDefaults
from desired.model import DesiredStatus, RuntimeRecord, Status

DEFAULTS = RecordDefaults(docker_network="galaxy-games", state_root="/var/lib/rtmanager/games", engine_port=8080)
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
IMG1 = "galaxy/engine:1"
ENDPOINT = "http://galaxy-game-g1:8080"


def rec(status: Status, desired: DesiredStatus, *, gen: int, obs: int, **kw) -> RuntimeRecord:
    base = dict(
        game_id="g1", status=status, current_container_id=None, current_image_ref=None,
        engine_endpoint=ENDPOINT, state_path="/var/lib/rtmanager/games/g1", docker_network="galaxy-games",
        started_at=None, stopped_at=None, removed_at=None, last_op_at=T0 + timedelta(minutes=5),
        created_at=T0, desired_status=desired, desired_image_ref=IMG1, generation=gen,
        observed_generation=obs,
    )
    run = dict(current_container_id="c1", current_image_ref=IMG1, started_at=T0 + timedelta(seconds=1))
    stop = dict(run, stopped_at=T0 + timedelta(minutes=2))
    if status is Status.RUNNING:
        base.update(run)
    elif status is Status.STOPPED:
        base.update(stop)
    elif status is Status.REMOVED:
        base.update(stop, current_container_id=None, removed_at=T0 + timedelta(minutes=3))
    base.update(kw)
    r = RuntimeRecord(**base)
    r.validate()
    return r
