"""In-memory worlds the unit modules share: a ``Reconciler`` over the adapters' fakes (``World``), a
lease whose answers the test decides (``FakeLease``), and answered jobs in a fake store."""

from __future__ import annotations

import os
import time

from controller.config import Settings
from controller.metrics import Metrics
from controller.reconciler import Reconciler
from controller.workqueue import WorkQueue
from desired.errors import StoreUnavailable
from desired.jobs import Job
from desired.leader import Fence
from desired.model import ErrorCode, JobKind, OpSource, StopReason
from tests.fakes import FakeBackend, FakeEngine, FakeStore, defaults

IMG, IMG2 = "galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1"


class World:
    """One ``Reconciler`` over the fakes: ``job`` records a job as admission would, ``sync`` runs one
    reconcile of a game and returns its record."""

    def __init__(self, tmp_path, **env: str) -> None:
        # The engine user is whoever runs the tests: the unit tier needs no root to give a game's
        # state directory to its engine (the product's default, 10000, does).
        self.settings = Settings.from_env({"RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
                                           "RTMANAGER_STATE_ROOT": str(tmp_path / "games"),
                                           "RTMANAGER_ENGINE_USER": f"{os.getuid()}:{os.getgid()}",
                                           "RTMANAGER_ORPHAN_GRACE": "0", **env})
        self.store = FakeStore()
        self.backend = FakeBackend()
        self.engine = FakeEngine(self.backend)
        self.queue = WorkQueue()
        self.reconciler = Reconciler(self.settings, self.store, self.backend, self.engine, Metrics(), self.queue,
                                     clock=self.store.clock, database="db-1")
        self.defaults = defaults(str(tmp_path / "games"))

    async def job(self, kind: JobKind, game: str, image: str | None = None) -> None:
        await self.store.submit(Job(kind=kind, game_id=game, source=OpSource.LOBBY, image_ref=image,
                                    reason=StopReason.CANCELLED if kind is JobKind.STOP else None,
                                    stream="s", entry_id=f"{len(self.store.ops) + 1}-0"), self.defaults)

    async def sync(self, game: str):
        await self.reconciler.sync(game)
        return self.store.records.get(game)

    def results(self, game: str) -> list[tuple[str, str, str]]:
        return [(r["job"], r["outcome"], r["error_code"]) for r in self.store.results_for(game)]

    def running(self, game: str) -> list:
        return [c for c in self.backend.containers.values() if c.name == f"galaxy-game-{game}" and c.state == "running"]


async def started(w: World, game: str = "g1", image: str = IMG):
    await w.job(JobKind.START, game, image)
    return await w.sync(game)


class FakeLease:
    """A lease whose answers the test decides: ``free`` (acquire), ``renews`` (renew), ``down`` (outage)."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.free = True
        self.renews = True
        self.down = False
        self.epoch = 0

    reclaimed = False
    held_for = None  # how long a held lease has left: unknown, so the standby polls

    async def acquire(self, reclaim: bool = False):
        if self.down:
            raise StoreUnavailable("postgres: fake outage")
        if not self.free:
            return None
        self.epoch += 1
        self.fence.epoch = self.epoch
        self.fence.deadline = time.monotonic() + self.fence.ttl
        self.free = False
        return self.epoch

    async def renew(self):
        if self.down:
            raise StoreUnavailable("postgres: fake outage")
        if not self.fence.valid_locally or not self.renews:
            return False
        self.fence.deadline = time.monotonic() + self.fence.ttl
        return True

    async def close(self):
        pass


async def answered(store: FakeStore, n: int) -> None:
    for i in range(n):
        await store.reject_entry(kind=JobKind.STOP, game_id=f"g{i % 3}", stream="s", entry_id=f"{i + 1}-0",
                                 code=ErrorCode.INVALID_REQUEST, message="bad")


def turn_engine(w: World, refuse: int = 0) -> dict:
    """An engine whose turn and phase the test moves (``eng["turn"]``, ``eng["phase"]``): it answers its
    status from them, refuses the first ``refuse`` turn requests with 409 (loading), then generates."""
    from observed.engine import EngineStatus
    from observed.errors import EngineConflict

    eng = {"turn": 0, "phase": "idle", "refuse": refuse}

    async def request_turn(host, expected_turn, *, token=""):
        if eng["refuse"] > 0:
            eng["refuse"] -= 1
            raise EngineConflict("loading")
        eng["phase"] = "generating"
        return True

    async def status(host, *, token=""):
        return EngineStatus(turn=eng["turn"], phase=eng["phase"])

    w.engine.request_turn = request_turn
    w.engine.status = status
    return eng
