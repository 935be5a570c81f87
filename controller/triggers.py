"""Triggers: what tells the work queue which game to look at, and readiness.

A stream entry, a NOTIFY or a backend event is only a hint about which key to
look at; the periodic resync is what makes the loop level-triggered. Each
trigger is a loop the composition root runs while this replica leads:

* ``Resync``: one backend list call and one records query per interval; queue
  every game whose plan is not NOOP (and report unowned units);
* ``HealthRound``: probe running engines every RTMANAGER_HEALTH_INTERVAL;
* NOTIFY (``desired.db.notifications.Notifications``) and backend events
  (``RuntimeBackend.events``), wired in the composition root.

``Readiness`` answers /readyz from a result cached for about a second, computed
by one probe at a time: a flood of requests never fans out to Postgres, Redis
and Docker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from controller.admission import Admission
from controller.metrics import Metrics, one_round
from controller.pacing import ProbePacing
from controller.planner import ActionKind
from controller.reconciler import KEEPS_UNIT, Reconciler, backend_errors
from controller.workqueue import WorkQueue
from desired.errors import Conflict, StorageFull, StoreUnavailable, TemporaryError
from desired.jobs import DecisionAction, Job
from desired.leader import Fenced
from desired.model import JobKind, OpSource, container_name
from desired.ports import HealthStore, ResyncStore, TurnClockStore
from desired.transitions import DUE_PAGE
from observed.backend import RuntimeBackend

log = logging.getLogger("rtmanager.triggers")

PRUNE_EVERY = 3600.0
MIN_TICK = 0.25  # seconds between two ticks of the turn clock, at least
HEALTH_CONCURRENCY = 16
PLAN_SLICE = 2000  # records the resync plans between two yields to the event loop
TICK_RETRY, TICK_RETRY_MAX = 2.0, 30.0   # seconds between failed ticks of the turn clock, doubling
GAME_RETRY, GAME_RETRY_MAX = 1.0, 60.0   # seconds before a game whose turn job failed is asked again


async def wait_any(*events: asyncio.Event, timeout: float | None) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Resync:
    def __init__(self, *, store: ResyncStore, backend: RuntimeBackend, reconciler: Reconciler, queue: WorkQueue,
                 metrics: Metrics, interval: float, retention_days: float,
                 ready_check: Callable[[], Awaitable[bool]]) -> None:
        self.store = store
        self.backend = backend
        self.reconciler = reconciler
        self.queue = queue
        self.metrics = metrics
        self.interval = interval
        self.retention_days = retention_days
        self._ready_check = ready_check
        self.now = asyncio.Event()  # set to resync at once (events reconnected)
        self.unowned = 0  # units of this instance without a record, at the last resync (/readyz)

    async def once(self) -> int:
        """List the backend (one call) and live records (one query); queue every game not converged, but a
        turn in flight or a record to write whose next look is already due within the interval: at 1,000
        games with turns in flight, queueing those again cost each a record read and an engine request for
        nothing. A unit the list shows otherwise than the record says is queued at once."""
        # A job that joined a generation whose wake was lost (a replica's NOTIFY): claimed at the next sync.
        # Only games with a queued operation: forgetting every claim made every turn in flight claim again.
        self.reconciler.forget_claims(await self.store.games_with_queued_operations())
        with backend_errors():
            containers = await self.backend.list_managed()
        self.reconciler.units.compare(containers)
        records = await self.store.list_live()
        by_game = {}
        unowned = 0
        for c in containers:
            if c.game_id and c.name == container_name(c.game_id):
                by_game[c.game_id] = c
            else:
                self.queue.add(c.game_id or c.name)  # odd container: let sync look at it
        self.reconciler.refill_dispose_budget()
        queued = 0
        for i, rec in enumerate(records):
            if i and not i % PLAN_SLICE:
                await asyncio.sleep(0)  # let the loop go (a lease renewal waits as long as it is held)
            action = self.reconciler.plan_only(rec, by_game.pop(rec.game_id, None))
            if action.kind is not ActionKind.NOOP:
                if action.kind not in KEEPS_UNIT:
                    # The list shows the unit otherwise than the record says: its next look is a real
                    # one (a missed event), now. A turn or a record to write is no such finding (the unit
                    # runs and is the record's), and must not cost every game with a turn in flight an inspect.
                    self.reconciler.units.touch(rec.game_id)
                elif self.queue.due_within(rec.game_id, self.interval):
                    continue  # its poll (or retry) is due within the interval anyway: not queued again
                self.queue.add(rec.game_id)
                queued += 1
        for game_id, c in by_game.items():  # units without a live record: orphans, unowned, or removed records
            if c.id in self.reconciler.unowned:
                unowned += 1
                continue
            self.queue.add(game_id)
            queued += 1
        self.metrics.unowned.set(unowned)
        self.unowned = unowned
        for status, count in (await self.store.count_by_status()).items():
            self.metrics.records.labels(status).set(count)
        self.metrics.paused.set(sum(1 for r in records if r.paused and r.status.is_up))
        self.metrics.outbox_pending.set(await self.store.unpublished_count())
        worst, late = await self.store.turn_lateness()
        self.metrics.turn_lateness.set(worst)
        self.metrics.turns_late.set(late)
        return queued

    async def run(self, stopping: asyncio.Event) -> None:
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            if self.retention_days and loop.time() - last_prune > PRUNE_EVERY:
                try:
                    results, ops = await self.store.prune(self.retention_days)
                    last_prune = loop.time()
                    if results or ops:
                        log.info("retention: removed %d results and %d operations older than %g days",
                                 results, ops, self.retention_days)
                except Exception as exc:  # noqa: BLE001 - retried next round
                    log.warning("retention failed: %s", exc)
            try:
                t0 = loop.time()
                queued = await self.once()
                self.metrics.resync_seconds.observe(loop.time() - t0)
                self.metrics.resyncs.labels("ok").inc()
                self.metrics.loop_ok("resync")
                self.metrics.ready.set(1 if await self._ready_check() else 0)
                if queued:
                    log.info("resync queued %d games", queued)
            except Exception as exc:  # noqa: BLE001 - the backend or Postgres away: next interval
                self.metrics.resyncs.labels("error").inc()
                self.metrics.loop_failed("resync", exc)
                self.metrics.ready.set(0)
                if isinstance(exc, TemporaryError):
                    log.warning("resync failed: %s", exc)
                else:
                    log.exception("resync failed unexpectedly; trying again next interval")
            await wait_any(stopping, self.now, timeout=self.interval)
            self.now.clear()


class HealthRound:
    """Probe running engines; the reconciler writes the health field only when it changes."""

    def __init__(self, *, store: HealthStore, backend: RuntimeBackend, reconciler: Reconciler, interval: float,
                 metrics: Metrics, steady_every: int = 1) -> None:
        self.metrics = metrics
        self.store = store
        self.backend = backend
        self.reconciler = reconciler
        self.interval = interval
        self.pacing = ProbePacing(steady_every)  # which engines a round probes (controller/pacing.py)

    async def once(self) -> None:
        records = await self.store.list_up()
        self.pacing.start_round(r.game_id for r in records)
        if not records:
            return
        units, health = self.reconciler.units, self.reconciler.health
        with backend_errors():
            listed = await self.backend.list_managed()
        units.compare(listed)
        addresses = {c.id: c.address for c in listed if c.running}
        del listed
        health.forget_answers(self.interval)
        todo = []
        for rec in records:
            address = addresses.get(rec.current_container_id or "")
            if address is None or (self.pacing.due(rec, units.touches(rec.game_id))
                                   and not health.answered_within(rec, self.interval)):
                # A unit not running is always looked at (no probe: a wake). An engine whose status the turn
                # path got within the interval is not probed: that answer is as fresh as this probe would be.
                todo.append((rec, address))
        if len(todo) < len(records):
            self.metrics.probes_deferred.inc(len(records) - len(todo))
        del records
        # A fixed number of workers take the records in turn: one task per game would make, at 100,000
        # games, 100,000 tasks with their frames alive at once (what the garbage collector walked). A
        # record is let go once taken, so the heap shrinks as the round goes.
        todo.reverse()

        async def worker() -> None:
            while todo:
                rec, address = todo.pop()
                touches = units.touches(rec.game_id)
                try:
                    steady = await self.reconciler.observe(rec, address)
                    self.pacing.probed(rec, touches, steady)
                except (TemporaryError, Fenced):
                    raise  # not this game's doing: the round fails (its engines stay due)
                except Exception:  # noqa: BLE001 - this game's bad data fails this game's probe, not the round
                    self.pacing.forget(rec.game_id)
                    self.metrics.reconcile_errors.inc()
                    log.exception("health probe failed", extra={"game_id": rec.game_id})

        workers = [asyncio.create_task(worker()) for _ in range(HEALTH_CONCURRENCY)]
        try:
            await asyncio.gather(*workers)
        finally:  # the round failed (or was cancelled): its other probes stop with it
            for t in workers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _timed_once(self) -> None:
        t0 = asyncio.get_running_loop().time()
        await self.once()
        self.metrics.health_round_seconds.observe(asyncio.get_running_loop().time() - t0)

    async def run(self, stopping: asyncio.Event) -> None:
        self.pacing = ProbePacing(self.pacing.every)  # a new term knows nothing of the engines yet
        while not stopping.is_set():
            await wait_any(stopping, timeout=self.interval)
            if stopping.is_set():
                return
            await one_round("health", self._timed_once, self.metrics, log)


class TurnClock:
    """The turn clock: a ``turn`` job (source scheduler) for every running, unpaused game whose interval
    has passed since its last turn (or since it was started or resumed).

    One due-time query per tick, not a timer per game; the tick sleeps until the next game is due
    (at most a resync interval, and woken by the store's ``schedule`` signal when a due time may
    have moved). A game asks for one turn at a time, so ticks missed during an outage give one turn
    when it ends, not a burst."""

    def __init__(self, *, store: TurnClockStore, admission: Admission, metrics: Metrics, max_sleep: float) -> None:
        self.store = store
        self.admission = admission
        self.metrics = metrics
        self.max_sleep = max_sleep
        self.wake = asyncio.Event()
        self.held: dict[str, tuple[float, float]] = {}  # game -> (not before, backoff): its turn job failed
        self.page = DUE_PAGE  # the most games one due query returns (the store's page)

    async def tick(self) -> float:
        """Ask for the turns that are due; return the seconds until the next one.

        The games due are asked for together, in one statement of the store (``ask_due_turns``: the
        due query, the games' locks, their new generations and their ``turn`` operations), and each
        game asked wakes the reconciler. Should that statement fail for a reason that is not an outage
        (one record's bad data fails it for the whole page), the tick asks game by game
        (``_tick_one_by_one``), where a game whose turn job fails is that game's failure: it is logged
        and held back (GAME_RETRY, doubling up to GAME_RETRY_MAX), and left out of the statement while
        held, so that the other games get their turns."""
        now = time.monotonic()
        skip = sorted(g for g, h in self.held.items() if h[0] > now)
        try:
            asked, next_in, again = await self.store.ask_due_turns(self.page, skip)
        except (TemporaryError, Fenced):
            raise  # not a game's doing: the tick fails
        except Exception:  # noqa: BLE001 - a record the statement cannot take: game by game
            log.exception("turn clock: the due games could not be asked for at once; asking one by one")
            return await self._tick_one_by_one()
        # Holds that ran out were tried in the statement: asked, or not due any more.
        self.held = {g: h for g, h in self.held.items() if h[0] > now}
        for game_id in asked:
            self.admission.wake(game_id)
        delay = self._next_delay(len(asked), next_in, again, now)
        if again and not asked:
            # A due game passed over (another transaction held its record): not at max_sleep, nor at once.
            delay = min(delay, MIN_TICK)
        return delay

    async def _tick_one_by_one(self) -> float:
        due, next_in = await self.store.due_turns()
        now = time.monotonic()
        self.held = {g: h for g, h in self.held.items() if g in due}
        asked = 0
        for game_id in due:
            held = self.held.get(game_id)
            if held is not None and held[0] > now:
                continue
            try:
                # Decided again under the record's lock: a pause or a forced turn since the query skips it.
                outcome = await self.admission.submit(Job(kind=JobKind.TURN, game_id=game_id,
                                                          source=OpSource.SCHEDULER))
            except (TemporaryError, Fenced):
                raise  # not this game's doing: the tick fails
            except Conflict:
                continue  # the record moved meanwhile: the next tick looks again
            except Exception:  # noqa: BLE001 - this game's turn fails, not the clock
                backoff = min(held[1] * 2, GAME_RETRY_MAX) if held is not None else GAME_RETRY
                self.held[game_id] = (now + backoff, backoff)
                self.metrics.turns.labels("error").inc()
                log.exception("turn clock: could not ask for a turn; trying this game again in %.0fs", backoff,
                              extra={"game_id": game_id})
                continue
            self.held.pop(game_id, None)
            decision = getattr(outcome, "decision", None)
            asked += decision is None or decision.action is not DecisionAction.SKIP
        return self._next_delay(asked, next_in, len(due) >= self.page, now)

    def _next_delay(self, asked: int, next_in: float | None, full: bool, now: float) -> float:
        if asked:
            log.info("turn clock: asked for %d turns", asked)
        delay = self.max_sleep if next_in is None else min(next_in, self.max_sleep)
        if asked and full:
            # A full page of games due now: more may be due behind it. A turn asked is no wake (the game is no
            # longer due: desired/transitions.py moves_the_clock), so look again now, not at max_sleep.
            delay = 0.0
        if self.held:
            delay = min(delay, max(0.0, min(h[0] for h in self.held.values()) - now))
        return delay

    async def run(self, stopping: asyncio.Event) -> None:
        backoff = TICK_RETRY
        while not stopping.is_set():
            self.wake.clear()  # a wake while the tick runs is kept for the next one
            try:
                delay = await self.tick()
                backoff = TICK_RETRY
                self.metrics.loop_ok("turn-clock")
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - Postgres away, or a bug: back off, never die
                self.metrics.loop_failed("turn-clock", exc)
                if isinstance(exc, (StoreUnavailable, Conflict)):
                    log.warning("turn clock: %s; retrying in %.1fs", exc, backoff)
                else:
                    log.exception("turn clock failed unexpectedly; retrying in %.1fs", backoff)
                delay, backoff = backoff, min(backoff * 2, TICK_RETRY_MAX)
            # Every commit that moves a due time wakes the clock (a new game, a generated turn), and with
            # many games one is due every few ms: at most a few due-time queries a second, however many
            # commits or due times there are (a due game waits at most MIN_TICK). A full page goes on now.
            await wait_any(stopping, timeout=MIN_TICK if delay > 0 else 0.0)
            if not self.wake.is_set():
                await wait_any(stopping, self.wake, timeout=max(0.0, delay - MIN_TICK))


class Readiness:
    """``/readyz``: Postgres, Redis and the backend answer. Cached for ``ttl`` seconds, one probe at a time."""

    def __init__(self, checks: dict[str, Callable[[], Awaitable[None]]], metrics: Metrics, *, ttl: float = 1.0,
                 timeout: float = 2.0) -> None:
        self.checks = checks
        self.metrics = metrics
        self.ttl = ttl
        self.timeout = timeout
        self.probes = 0  # how many times the dependencies were really asked
        self._cached: tuple[float, dict[str, str]] | None = None
        self._inflight: asyncio.Task[dict[str, str]] | None = None

    async def check(self) -> dict[str, str]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.ttl:
            return self._cached[1]
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._probe())
        return await asyncio.shield(self._inflight)

    async def ok(self) -> bool:
        return all(v == "ok" for v in (await self.check()).values())

    async def _probe(self) -> dict[str, str]:
        self.probes += 1
        results: dict[str, str] = {}

        async def one(name: str, fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await asyncio.wait_for(fn(), self.timeout)
                results[name] = "ok"
            except StorageFull as exc:  # says why: which threshold, how much is free
                results[name] = f"error: {exc.__class__.__name__}: {exc.message}"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                results[name] = f"error: {exc.__class__.__name__}"

        await asyncio.gather(*(one(n, fn) for n, fn in self.checks.items()))
        failing = dict(self.metrics.failing_loops)  # loops backing off: an outage the pings miss, or a bug
        results["loops"] = "ok" if not failing else "error: " + "; ".join(f"{k}: {v}"
                                                                         for k, v in sorted(failing.items()))
        self.metrics.ready.set(1 if all(v == "ok" for v in results.values()) else 0)
        self._cached = (time.monotonic(), results)
        return results
