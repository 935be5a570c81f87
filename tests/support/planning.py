"""Small factories for the planner's table (tests/unit/test_planner.py) and the tests that plan with
it: a record in a status, a container of ours or someone else's, the plan's keyword arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from desired.model import DesiredStatus, RuntimeRecord, Status
from observed.model import (
    LABEL_DATABASE,
    LABEL_EPOCH,
    LABEL_GAME_ID,
    LABEL_GENERATION,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_SPEC_HASH,
    MANAGED_BY,
    ObservedContainer,
)

INSTANCE = "default"
DATABASE = "5b0d6f7e-1c1f-4c55-9a43-6f5b2f4c8e10"
EPOCH = 3
HASH = "aaaaaaaaaaaaaaaa"
OLD_HASH = "bbbbbbbbbbbbbbbb"
NOW = datetime(2024, 1, 2, 12, 0, 0, tzinfo=UTC)
T0 = NOW - timedelta(days=1)
GRACE = 10.0
TTL = 3600.0


def ours(state: str = "running", *, spec_hash: str = HASH, cid: str = "c1", age: float | None = 600.0,
         instance: str = INSTANCE, database: str | None = DATABASE, epoch: int = 2, node: str | None = None,
         node_lost: bool = False) -> ObservedContainer:
    provenance = {LABEL_DATABASE: database, LABEL_EPOCH: str(epoch)} if database is not None else {}
    return ObservedContainer(
        id=cid, name="galaxy-game-g1", image="galaxy/engine:1", state=state,
        labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: instance, LABEL_GAME_ID: "g1",
                LABEL_SPEC_HASH: spec_hash, LABEL_GENERATION: "1", **provenance},
        created_at=None if age is None else NOW - timedelta(seconds=age),
        exit_code=0 if state == "exited" and not node_lost else None, node=node, node_lost=node_lost,
    )


def foreign(state: str = "running") -> ObservedContainer:
    return ObservedContainer(id="f1", name="galaxy-game-g1", image="nginx:latest", state=state,
                             labels={"maintainer": "someone"}, created_at=NOW - timedelta(days=3))


def record(status: Status, desired: DesiredStatus, *, converged: bool = True, cid: str | None = "c1",
           stopped_ago: float = 60.0, **extra) -> RuntimeRecord:
    gen = 5
    kw: dict = dict(
        game_id="g1", status=status, current_container_id=None, current_image_ref=None,
        engine_endpoint="http://galaxy-game-g1:8080", state_path="/var/lib/rtmanager/games/g1",
        docker_network="galaxy-games", started_at=None, stopped_at=None, removed_at=None,
        last_op_at=T0 + timedelta(minutes=1), created_at=T0, desired_status=desired,
        desired_image_ref="galaxy/engine:1", generation=gen, observed_generation=gen if converged else gen - 1,
    )
    if status.is_up:
        kw.update(current_container_id=cid, current_image_ref="galaxy/engine:1", started_at=T0)
    elif status is Status.STOPPED:
        kw.update(current_container_id=cid, current_image_ref="galaxy/engine:1", started_at=T0,
                  stopped_at=NOW - timedelta(seconds=stopped_ago))
    elif status is Status.REMOVED:
        kw.update(removed_at=T0 + timedelta(seconds=1))
    elif status is Status.NODE_LOST:
        kw.update(current_container_id=cid, current_image_ref="galaxy/engine:1", started_at=T0, node_id="n2",
                  node_lost_since=NOW - timedelta(seconds=30))
    kw.update(extra)
    r = RuntimeRecord(**kw)
    r.validate()
    return r


KW = dict(want_hash=HASH, instance=INSTANCE, now=NOW, orphan_grace=GRACE, database=DATABASE, epoch=EPOCH)
R, ST, RM = DesiredStatus.RUNNING, DesiredStatus.STOPPED, DesiredStatus.REMOVED
