"""Red-team 131: a rollout read its target version once per tick, before up to 50 rounds of patches; a version
disabled while the tick submitted them still got every remaining patch (admission checks the version only under
RTMANAGER_VERSION_POLICY=registry). It is read again before each patch."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.metrics import Metrics
from controller.rollouts import RolloutLoop
from desired.clock import ManualClock
from desired.jobs import Decision, DecisionAction
from desired.model import DesiredStatus, Status
from desired.rollouts import GameState, OnFailure, Rollout, RolloutGame, RolloutState
from desired.values import SubmitOutcome
from desired.versions import EngineVersion, VersionStatus
from tests.support.job_records import rec

T = datetime(2024, 1, 1, tzinfo=UTC)
OLD, NEW = "galaxy/engine:1", "galaxy/engine:2"
class Store:
    def __init__(self) -> None:
        self.clock = ManualClock(T)
        self.status = VersionStatus.ACTIVE
        self.records = {f"g{i}": rec(Status.RUNNING, DesiredStatus.RUNNING, gen=2, obs=2, game_id=f"g{i}",
                                     state_path=f"/s/g{i}", desired_image_ref=OLD, current_image_ref=OLD)
                        for i in range(5)}

    async def find(self, g):
        return self.records[g]

    async def engine_version_of(self, image):
        return EngineVersion(version="v2", image_ref=NEW, status=self.status, notes="", created_at=T, updated_at=T)

    async def settle_rollout_game(self, *a):
        return True

    async def pause_rollout(self, *a):
        return True

    async def finish_rollout(self, *a):
        return True


class Admission:
    registry = False  # RTMANAGER_VERSION_POLICY=allowlist (the default)

    def __init__(self, store):
        self.store, self.patched = store, []

    async def submit(self, job):
        self.patched.append(job.game_id)
        self.store.status = VersionStatus.DISABLED  # the operator disables v2 right after the first patch
        return SubmitOutcome(operation_id=len(self.patched), decision=Decision(action=DecisionAction.CHANGE))


async def test_a_version_disabled_during_a_tick_stops_the_next_patches() -> None:
    store = Store()
    adm = Admission(store)
    loop = RolloutLoop(store=store, admission=adm, metrics=Metrics(), interval=5)
    r = Rollout(id=1, target_version="v2", target_image_ref=NEW, source_version="v1", state=RolloutState.RUNNING,
                max_parallel=5, canary=0, canary_hold=0, failure_budget=1, on_failure=OnFailure.ROLLBACK,
                force=False, state_reason="", created_at=T, updated_at=T)
    games = [RolloutGame(rollout_id=1, game_id=f"g{i}", position=i + 1, state=GameState.WAITING,
                         from_image_ref=OLD) for i in range(5)]
    await loop.step(r, games)
    assert adm.patched == ["g0"], "patches went on after the target version was disabled"
