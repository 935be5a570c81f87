"""Issue 21, root cause: an error nobody classified must not end a loop, let alone the process.

Each adapter's fake (tests/fakes.py: ``fail``) raises an unknown error (a RuntimeError subclass)
for a while; each loop keeps running, reports the failure (a metric, /readyz's ``loops``), backs
off, and does its work once the error stops. Per-game work fails or retries that game alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.admission import Admission
from controller.config import Settings
from controller.intake import Intake
from controller.leadership import Leadership
from controller.metrics import Metrics
from controller.relay import Relay
from controller.triggers import HealthRound, Readiness, Resync, TurnClock
from desired.jobs import Job
from desired.leader import Fence
from desired.model import JobKind, OpSource, Status
from tests.fakes import FakeStore, FakeStreams, defaults
from tests.support import eventually
from tests.support.world import IMG, FakeLease, World, answered

# Virtual time (looptime): the loops' backoffs and polls are asyncio sleeps, so the event loop's
# clock jumps over them when nothing else is ready. A test whose code also reads time.monotonic
# (a leadership term, a game's hold-back) runs on real time: it says so with looptime(False).
pytestmark = pytest.mark.looptime

START, RESULTS = "runtime:start_jobs", "runtime:job_results"


class Boom(RuntimeError):
    """An error no adapter classified."""


def errors(metrics: Metrics, loop: str) -> float:
    return metrics.loop_errors.labels(loop)._value.get()


async def stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------ intake
class BlockingStreams(FakeStreams):
    """XREADGROUP's BLOCK: an empty read waits a moment instead of returning at once."""

    async def read_new(self, streams, count, block_ms):
        got = await super().read_new(streams, count, block_ms)
        if not got and block_ms:
            await asyncio.sleep(0.01)
        return got


@pytest.mark.parametrize("adapter", ["streams", "store"])
async def test_the_intake_survives_an_unknown_error_and_admits_the_entry_after(adapter):
    settings = Settings.from_env({"RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*"})
    streams, store, metrics = BlockingStreams(), FakeStore(), Metrics()
    intake = Intake(settings.streams, streams, store, Admission(store, defaults(), wake=lambda g: None), metrics,
                    allowlist=settings.images.image_allowlist)
    broken = streams if adapter == "streams" else store
    broken.fail = Boom("nobody knows this one")
    task = asyncio.create_task(intake.run())
    try:
        entry = streams.xadd(START, {"game_id": "g1", "image_ref": IMG})
        await eventually(lambda: errors(metrics, "intake") >= 2, 10.0, interval=0.01)
        assert not task.done() and "intake" in metrics.failing_loops and not intake.healthy
        broken.fail = None
        await eventually(lambda: any(o.entry_id == entry for o in store.ops), 15.0, interval=0.02)
        await eventually(lambda: "intake" not in metrics.failing_loops, 5.0, interval=0.01)
    finally:
        intake.stop()
        await asyncio.wait_for(task, 5)


# ------------------------------------------------------------------- relay
@pytest.mark.parametrize("adapter", ["streams", "store"])
async def test_the_relay_survives_an_unknown_error_and_publishes_after(adapter):
    settings = Settings.from_env({})
    streams, store, metrics = FakeStreams(), FakeStore(), Metrics()
    relay = Relay(settings.streams, streams, store, metrics)
    await answered(store, 2)
    broken = streams if adapter == "streams" else store
    broken.fail = Boom("nobody knows this one")
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: errors(metrics, "relay") >= 2, 10.0, interval=0.01)
        assert not task.done() and "relay" in metrics.failing_loops and streams.fields_of(RESULTS) == []
        broken.fail = None
        await eventually(lambda: len(streams.fields_of(RESULTS)) == 2, 15.0, interval=0.02)
        await eventually(lambda: "relay" not in metrics.failing_loops, 5.0, interval=0.01)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


# -------------------------------------------------------------- turn clock
class Asked:
    """Admission: records the turn jobs; ``poison`` games raise an unknown error."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.poison: set[str] = set()

    async def submit(self, job: Job):
        if job.game_id in self.poison:
            raise Boom(f"{job.game_id}: a value no column holds")
        self.asked.append(job.game_id)

    def wake(self, game_id: str) -> None:
        self.asked.append(game_id)


class DueStore:
    """The turn clock's store: these games are due now. Its one statement (``ask_due_turns``) fails as a
    whole on a poisoned game, as the real one fails on one record a column cannot hold."""

    def __init__(self, due: list[str], admission: Asked) -> None:
        self.due = due
        self.admission = admission
        self.fail: Exception | None = None
        self.statements = 0

    async def due_turns(self):
        if self.fail is not None:
            raise self.fail
        return list(self.due), None

    async def ask_due_turns(self, limit, skip=()):
        self.statements += 1
        if self.fail is not None:
            raise self.fail
        asked = [g for g in self.due if g not in skip]
        if self.admission.poison & set(asked):
            raise Boom("a value no column holds")
        return asked, None, False


async def test_the_turn_clock_survives_an_unknown_store_error_and_asks_after():
    admission, metrics = Asked(), Metrics()
    store = DueStore(["g1"], admission)
    store.fail = Boom("nobody knows this one")
    clock = TurnClock(store=store, admission=admission, metrics=metrics, max_sleep=0.2)
    stopping = asyncio.Event()
    task = asyncio.create_task(clock.run(stopping))
    try:
        await eventually(lambda: errors(metrics, "turn-clock") >= 1, 10.0, interval=0.01)
        assert not task.done() and "turn-clock" in metrics.failing_loops and admission.asked == []
        store.fail = None
        clock.wake.set()
        await eventually(lambda: "g1" in admission.asked, 10.0, interval=0.01)
        assert "turn-clock" not in metrics.failing_loops
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


@pytest.mark.looptime(False)  # the turn clock holds a game back by time.monotonic()
async def test_one_games_poison_fails_that_game_with_backoff_and_the_others_get_turns():
    admission, metrics = Asked(), Metrics()
    store = DueStore(["bad", "good"], admission)
    admission.poison.add("bad")
    clock = TurnClock(store=store, admission=admission, metrics=metrics, max_sleep=0.05)
    stopping = asyncio.Event()
    task = asyncio.create_task(clock.run(stopping))
    try:
        await eventually(lambda: admission.asked.count("good") >= 3, 10.0, interval=0.01)
        assert not task.done() and "bad" in clock.held
        assert "turn-clock" not in metrics.failing_loops  # one game's failure, not the clock's
        held_until = clock.held["bad"][0]
        assert held_until > time.monotonic()  # backing off that game, not asking it on every tick
        # While it is held, the others are asked for together again (the statement leaves it out).
        n, good = store.statements, admission.asked.count("good")
        await eventually(lambda: store.statements >= n + 2 and admission.asked.count("good") >= good + 2, 10.0,
                         interval=0.01)
        admission.poison.clear()
        await eventually(lambda: "bad" in admission.asked, 10.0, interval=0.02)
        assert "bad" not in clock.held
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


# ------------------------------------------------- health round and resync
async def up(w: World, *games: str) -> None:
    for g in games:
        await w.job(JobKind.START, g, IMG)
        assert (await w.sync(g)).status is Status.RUNNING


@pytest.mark.parametrize("adapter", ["store", "backend"])
async def test_the_health_round_survives_an_unknown_error_and_probes_after(tmp_path, adapter):
    w = World(tmp_path)
    await up(w, "g1")
    metrics = Metrics()
    round_ = HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=0.02, metrics=metrics)
    broken = w.store if adapter == "store" else w.backend
    broken.fail = Boom("nobody knows this one")
    stopping = asyncio.Event()
    task = asyncio.create_task(round_.run(stopping))
    try:
        await eventually(lambda: errors(metrics, "health") >= 2, 10.0, interval=0.01)
        assert not task.done() and "health" in metrics.failing_loops
        broken.fail = None
        w.store.records["g1"] = w.store.records["g1"].replace(turn=None)  # something for the round to record
        await eventually(lambda: w.store.records["g1"].turn == 0 and "health" not in metrics.failing_loops, 10.0,
                         interval=0.01)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


async def test_one_engines_unknown_error_fails_that_games_probe_not_the_round(tmp_path):
    w = World(tmp_path)
    await up(w, "g1", "g2")
    w.engine.fail["galaxy-game-g1"] = Boom("garbage")
    g2 = w.store.records["g2"]
    w.store.records["g2"] = g2.replace(admin_api=None, turn=None)  # g2 has something to record
    round_ = HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=1, metrics=Metrics())
    await round_.once()  # does not raise
    assert w.store.records["g2"].admin_api is True and w.store.records["g2"].turn == 0


@pytest.mark.parametrize("adapter", ["store", "backend"])
async def test_the_resync_survives_an_unknown_error_and_queues_after(tmp_path, adapter):
    w = World(tmp_path)
    await up(w, "g1")
    w.backend.containers.clear()  # the engine vanished: the resync must queue it
    metrics = Metrics()

    async def ready() -> bool:
        return True

    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue, metrics=metrics,
                    interval=0.02, retention_days=0, ready_check=ready)
    broken = w.store if adapter == "store" else w.backend
    broken.fail = Boom("nobody knows this one")
    stopping = asyncio.Event()
    task = asyncio.create_task(resync.run(stopping))
    try:
        await eventually(lambda: errors(metrics, "resync") >= 2, 10.0, interval=0.01)
        assert not task.done() and "resync" in metrics.failing_loops and len(w.queue) == 0
        broken.fail = None
        await eventually(lambda: len(w.queue) == 1 and "resync" not in metrics.failing_loops, 10.0, interval=0.01)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


# ------------------------------------------------------------------ workers
@pytest.mark.parametrize("adapter", ["store", "backend", "engine"])
async def test_a_reconcile_worker_survives_an_unknown_error_and_converges_after(tmp_path, adapter):
    w = World(tmp_path)
    await up(w, "g1")
    await w.store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY), w.defaults)
    boom = Boom("nobody knows this one")
    if adapter == "store":
        w.store.fail = boom
    elif adapter == "backend":
        w.backend.fail = boom
    else:
        w.engine.fail["galaxy-game-g1"] = boom
    task = asyncio.create_task(w.reconciler.worker(0))
    try:
        w.queue.add("g1")
        await eventually(lambda: w.reconciler.metrics.reconcile_errors._value.get() >= 1, 10.0, interval=0.01)
        assert not task.done()
        w.store.fail = w.backend.fail = None
        w.engine.fail.clear()
        await eventually(lambda: w.store.records["g1"].converged and w.store.records["g1"].turn == 1, 15.0,
                         interval=0.02)
    finally:
        w.queue.shut_down()
        await asyncio.wait_for(task, 5)


# --------------------------------------------------------------- leadership
@pytest.mark.looptime(False)  # the fence's term ends by time.monotonic()
async def test_leadership_survives_an_unknown_error_campaigning_and_renewing():
    fence = Fence(instance="i", holder="me", ttl=0.6)
    lease, metrics = FakeLease(fence), Metrics()
    real_acquire, real_renew = lease.acquire, lease.renew
    broken = {"acquire": True, "renew": False}

    async def acquire(reclaim: bool = False):
        if broken["acquire"]:
            raise Boom("nobody knows this one")
        return await real_acquire(reclaim)

    async def renew():
        if broken["renew"]:
            raise Boom("nobody knows this one")
        return await real_renew()

    lease.acquire, lease.renew = acquire, renew  # type: ignore[method-assign]
    events: list[str] = []

    async def elected():
        events.append("elected")

    async def deposed(reason):
        events.append("deposed")

    leadership = Leadership(lease, fence, metrics, on_elected=elected, on_deposed=deposed)
    stopping = asyncio.Event()
    task = asyncio.create_task(leadership.run(stopping))
    try:
        await eventually(lambda: errors(metrics, "leadership") >= 1, 10.0, interval=0.01)
        assert not task.done() and events == []
        broken["acquire"] = False
        await eventually(lambda: events == ["elected"], 10.0, interval=0.01)
        broken["renew"] = True  # briefly: the term holds
        await eventually(lambda: errors(metrics, "leadership") >= 2, 10.0, interval=0.01)
        broken["renew"] = False
        await asyncio.sleep(fence.ttl)
        assert events == ["elected"] and leadership.leading and not task.done()
    finally:
        stopping.set()
        leadership.release()
        await asyncio.wait_for(task, 5)


async def test_leadership_steps_down_when_the_leaders_tasks_cannot_start_and_campaigns_again():
    fence = Fence(instance="i", holder="me", ttl=0.3)
    lease, metrics = FakeLease(fence), Metrics()
    events: list[str] = []

    async def elected():
        events.append("elected")
        if events.count("elected") == 1:
            raise Boom("the leader's tasks could not start")

    async def deposed(reason):
        events.append("deposed")
        lease.free = True  # the lease expired meanwhile

    leadership = Leadership(lease, fence, metrics, on_elected=elected, on_deposed=deposed)
    stopping = asyncio.Event()
    task = asyncio.create_task(leadership.run(stopping))
    try:
        await eventually(lambda: events == ["elected", "deposed", "elected"], 10.0, interval=0.01)
        assert leadership.leading and not task.done()
    finally:
        stopping.set()
        leadership.release()
        await asyncio.wait_for(task, 5)


# ----------------------------------------------------------------- readyz
async def test_readyz_shows_a_failing_loop_until_it_recovers():
    metrics = Metrics()

    async def fine() -> None:
        return None

    readiness = Readiness({"redis": fine}, metrics, ttl=0)
    assert (await readiness.check()) == {"redis": "ok", "loops": "ok"}
    metrics.loop_failed("relay", Boom("NOREPLICAS Not enough good replicas to write."))
    checks = await readiness.check()
    assert checks["redis"] == "ok" and checks["loops"].startswith("error: relay: Boom: NOREPLICAS")
    assert not await readiness.ok() and metrics.ready._value.get() == 0
    metrics.loop_ok("relay")
    assert (await readiness.check())["loops"] == "ok" and await readiness.ok()


# -------------------------------------------------------------- supervision
def controller():
    from controller.app import Controller
    from tests.fakes import FakeBackend, FakeEngine

    backend = FakeBackend()
    return Controller(Settings.from_env({}), backend_factory=lambda s, **kw: backend, engine=FakeEngine(backend))


async def test_a_loop_that_dies_is_started_again_with_backoff_and_the_process_goes_on(monkeypatch):
    import controller.app as app

    monkeypatch.setattr(app, "RESTART_FIRST", 0.01)
    c = controller()
    runs: list[float] = []

    async def loop() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) <= 3:
            raise Boom("a poison value")
        await asyncio.Event().wait()

    c._spawn("turn-clock", loop, leader=True)
    try:
        await eventually(lambda: len(runs) == 4, 10.0, interval=0.01)
        assert not c.stopping.is_set() and c.exit_code == 0
        assert c.metrics.loop_restarts.labels("turn-clock")._value.get() == 3
        assert "turn-clock" in c.metrics.failing_loops  # until the loop says otherwise
        assert runs[3] - runs[2] >= runs[2] - runs[1] >= 0.01  # backing off, doubling
        assert len([t for t in c.leader_tasks if not t.done()]) == 1
    finally:
        c.term_stopping.set()
        for t in c.leader_tasks:
            t.cancel()
        await asyncio.gather(*c.leader_tasks, return_exceptions=True)


async def test_a_loop_of_a_term_that_is_over_is_not_started_again(monkeypatch):
    import controller.app as app

    monkeypatch.setattr(app, "RESTART_FIRST", 0.3)
    c = controller()
    runs: list[int] = []
    ended = asyncio.Event()

    async def loop() -> None:
        runs.append(1)
        ended.set()
        raise Boom("a poison value")

    c._spawn("intake", loop, leader=True)
    await asyncio.wait_for(ended.wait(), 5)
    c.term_stopping.set()  # stepped down before the restart came due
    c.term_stopping = asyncio.Event()
    await asyncio.sleep(0.6)  # past the restart's due time: nothing may start
    assert runs == [1] and not c.stopping.is_set()


async def test_a_fenced_loop_steps_down_instead_of_restarting():
    from desired.leader import Fenced

    c = controller()
    lost: list[str] = []

    class Stub:
        def lost(self, reason: str) -> None:
            lost.append(reason)

    c.leadership = Stub()  # type: ignore[assignment]

    async def loop() -> None:
        raise Fenced("another replica leads")

    c._spawn("relay", loop, leader=True)
    await eventually(lambda: lost, 5.0, interval=0.01)
    assert "relay" in lost[0] and not c.stopping.is_set()
    assert c.metrics.loop_restarts.labels("relay")._value.get() == 0
