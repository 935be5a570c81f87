"""The drain loop: the leader converges every active drain (desired/drains.py) from its rows and the
runtime records, once per tick. Nothing is remembered between ticks: a kill -9 or a failover
resumes a drain where its rows say.

A *draining* drain takes games, ``max_parallel`` in flight at a time:

* a stop (a host drain; a node drain with node-local state and ``local_state: stop``; past the
  deadline with ``on_deadline: stop``) is a ``stop`` job through admission, source ``admin``: a
  planned disruption, so it waits for the engine's turn boundary (RTMANAGER_DISRUPTION_WAIT);
  past the drain's deadline the job is ``force``: no wait. The game's image, pause and schedule are
  recorded first, for undrain;
* a move (Swarm) clears the game's pin and revises its spec in one transaction (``take_move``): the
  reconciler replaces the unit -- a planned disruption too -- by one that avoids the drained node,
  and records the node Swarm placed it on.

Once nothing is left in flight or in scope, the drain is *drained*: it still refuses starts (a
host drain) and keeps new units off its node until undrain. An *undraining* drain starts the
games it stopped again, as they were (a ``start`` through admission, source ``admin``), except those
somebody else stopped or removed meanwhile, then it is *undrained*.

Restarts of a game on a drained target that nobody asked for (a crash's) are held back by the
reconciler (``Reconciler.hold``, from ``hold``): the drain stops or moves such a game first, with
nothing to wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from controller.admission import Admission
from controller.metrics import Metrics
from controller.triggers import wait_any
from desired import drains
from desired.clock import Clock
from desired.drains import Drain, DrainAction, DrainGame, DrainStatus, GameState, Restore
from desired.errors import Conflict, StoreUnavailable, TemporaryError
from desired.jobs import Job
from desired.leader import Fenced
from desired.model import DesiredStatus, JobKind, OpSource, RuntimeRecord, StopReason
from desired.ports import DrainStore

log = logging.getLogger("rtmanager.drains")

TICK = 1.0            # seconds between looks at the active drains
TICK_RETRY_MAX = 30.0


class Drainer:
    def __init__(self, *, store: DrainStore, admission: Admission, metrics: Metrics, clock: Clock,
                 wake: Callable[[str], None], interval: float = TICK) -> None:
        self.store = store
        self.admission = admission
        self.wake_game = wake  # the reconciler's work queue
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.wake = asyncio.Event()

    # ------------------------------------------------------------------ hooks
    async def hold(self, record: RuntimeRecord) -> str | None:
        """The reconciler's question before a restart nobody asked for (see the module's doc)."""
        targets = await self.store.drained_targets()
        if targets.host:
            return "the host is drained: the drain stops this game instead of restarting it"
        if record.node_id is not None and record.node_id in targets.nodes:
            return f"node {record.node_id} is drained: the drain moves or stops this game instead of restarting it"
        return None

    async def avoided_nodes(self) -> frozenset[str]:
        """The nodes no new unit may land on."""
        return (await self.store.drained_targets()).nodes

    # ------------------------------------------------------------------ loop
    async def run(self, stopping: asyncio.Event) -> None:
        backoff = self.interval
        while not stopping.is_set():
            self.wake.clear()
            try:
                await self.tick()
                backoff = self.interval
                self.metrics.loop_ok("drains")
                delay = self.interval
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - Postgres away, or a bug: back off, never die
                self.metrics.loop_failed("drains", exc)
                if isinstance(exc, (StoreUnavailable, Conflict, TemporaryError)):
                    log.warning("drain loop: %s; retrying in %.1fs", exc, backoff)
                else:
                    log.exception("drain loop failed unexpectedly; retrying in %.1fs", backoff)
                delay, backoff = backoff, min(backoff * 2, TICK_RETRY_MAX)
            await wait_any(stopping, self.wake, timeout=delay)

    async def tick(self) -> None:
        active = await self.store.active_drains()
        waiting = in_progress = 0
        for drain in active:
            if drain.status is DrainStatus.UNDRAINING:
                await self.undrain(drain)
            elif drain.status is DrainStatus.DRAINING:
                w, p = await self.drain(drain)
                waiting, in_progress = waiting + w, in_progress + p
            # drained: nothing to do until undrain (starts are refused, restarts held, new units kept off)
        for status in (DrainStatus.DRAINING, DrainStatus.DRAINED, DrainStatus.UNDRAINING):
            self.metrics.drains.labels(status.value).set(sum(d.status is status for d in active))
        self.metrics.drain_games.labels("waiting").set(waiting)
        self.metrics.drain_games.labels("in_progress").set(in_progress)

    # ------------------------------------------------------------------ draining
    async def drain(self, drain: Drain) -> tuple[int, int]:
        """One step of a draining drain; returns how many games wait to be taken and how many are in flight."""
        records, games = await self.store.drain_scope(drain)
        step = drains.plan(drain, records, games, self.clock.now())
        if step.finish:
            await self.store.finish_games(drain.id, [(g.game_id, *_outcome(g, records.get(g.game_id)))
                                                     for g in step.finish])
            for g in step.finish:
                log.info("drain %d: %s of %s done", drain.id, g.action.value, g.game_id,
                         extra={"game_id": g.game_id, "drain_id": drain.id})
        for g in step.resubmit:
            await self._stop(drain, records[g.game_id], g.forced)
        for g in step.force:
            log.warning("drain %d: deadline passed; %s of %s goes ahead without waiting for a turn boundary",
                        drain.id, g.action.value, g.game_id, extra={"game_id": g.game_id, "drain_id": drain.id})
            if g.action is DrainAction.STOP:
                await self.store.take_stop(drain, records[g.game_id], True)
                await self._stop(drain, records[g.game_id], True)
            else:
                await self.store.force_move(drain, g)
                self.wake_game(g.game_id)
        for t in step.take:
            log.info("drain %d: taking %s to %s it%s", drain.id, t.record.game_id, t.action.value,
                     " (deadline passed: at once)" if t.forced else " at a turn boundary",
                     extra={"game_id": t.record.game_id, "drain_id": drain.id})
            if t.action is DrainAction.STOP:
                await self.store.take_stop(drain, t.record, t.forced)
                await self._stop(drain, t.record, t.forced)
            else:
                moved = await self.store.take_move(drain, t.record, t.forced)
                if moved is None:
                    continue  # the record changed since it was read: the next tick looks again
                self.wake_game(moved.game_id)
            self.metrics.drain_actions.labels(t.action.value, str(t.forced).lower()).inc()
        if step.complete and await self.store.set_drain_status(drain.id, DrainStatus.DRAINING, DrainStatus.DRAINED):
            log.info("drain %d: %s is drained", drain.id, drain.target, extra={"drain_id": drain.id})
        in_flight = sum(g.state is GameState.IN_PROGRESS for g in games.values()) - len(step.finish) + len(step.take)
        return step.waiting, in_flight

    async def _stop(self, drain: Drain, record: RuntimeRecord, forced: bool) -> None:
        job = Job(kind=JobKind.STOP, game_id=record.game_id, source=OpSource.ADMIN, reason=StopReason.ADMIN_REQUEST,
                  force=forced)
        outcome = await self.admission.submit(job)
        d = outcome.decision
        generation = d.record.generation if d is not None and d.record is not None else record.generation
        if outcome.operation_id:
            await self.store.note_stop(drain.id, record.game_id, outcome.operation_id, generation)

    # ------------------------------------------------------------------ undraining
    async def undrain(self, drain: Drain) -> None:
        records, games = await self.store.drain_scope(drain)
        stopped = await self.store.stopped_since(drain.id)
        # A move under way goes on (its pin is cleared, its spec revised); the drain stops following it.
        await self.store.finish_games(drain.id, [
            (g.game_id, None, "undrained while moving: the move goes on") for g in games.values()
            if g.action is DrainAction.MOVE and g.state is GameState.IN_PROGRESS])
        for step in drains.restore_plan(games, records, stopped):
            g = step.game
            if step.verdict is Restore.START:
                await self._restore(g, records[g.game_id])
                await self.store.game_restored(drain.id, g.game_id, GameState.RESTORED, "started again")
                log.info("undrain %d: %s started again", drain.id, g.game_id,
                         extra={"game_id": g.game_id, "drain_id": drain.id})
            else:
                state = GameState.RESTORED if step.verdict is Restore.RESTORED else GameState.SKIPPED
                await self.store.game_restored(drain.id, g.game_id, state, step.note)
                log.info("undrain %d: %s: %s", drain.id, g.game_id, step.note,
                         extra={"game_id": g.game_id, "drain_id": drain.id})
        if await self.store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED):
            log.info("drain %d: %s is in use again", drain.id, drain.target, extra={"drain_id": drain.id})

    async def _restore(self, game: DrainGame, record: RuntimeRecord) -> None:
        """Start it again as it was: its image and schedule, and its pause (which a stop keeps)."""
        image = drains.restore_image(game, record)
        outcome = await self.admission.submit(Job(kind=JobKind.START, game_id=game.game_id, source=OpSource.ADMIN,
                                                  image_ref=image, turn_interval=game.turn_interval))
        d = outcome.decision
        after = d.record if d is not None and d.record is not None else record
        if after.desired_status is DesiredStatus.RUNNING and after.paused != game.paused:
            kind = JobKind.PAUSE if game.paused else JobKind.RESUME
            await self.admission.submit(Job(kind=kind, game_id=game.game_id, source=OpSource.ADMIN))


def _outcome(game: DrainGame, record: RuntimeRecord | None) -> tuple[str | None, str | None]:
    """(node it runs on now, note) of a game the drain is done with."""
    if record is None or record.desired_status is DesiredStatus.REMOVED:
        return None, "removed meanwhile"
    if game.action is DrainAction.MOVE:
        if record.desired_status is DesiredStatus.RUNNING:
            return record.node_id, f"moved to node {record.node_id}"
        why = f" ({record.last_error_code.value}: {record.last_error_message})" if record.last_error_code else ""
        return record.node_id, "stopped instead of moved" + why
    return record.node_id, "stopped"


def drain_json(drain: Drain, games: list[DrainGame] | None = None, counts: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """A drain as REST and ``rtmanager drains --json`` show it."""
    body: dict[str, Any] = {k: _plain(v) for k, v in dataclasses.asdict(drain).items()}
    body["target"] = "host" if drain.node is None else drain.node
    if games is not None:
        body["games"] = [{k: _plain(v) for k, v in dataclasses.asdict(g).items() if k != "drain_id"} for g in games]
        tally = {s.value: 0 for s in GameState}
        for g in games:
            tally[g.state.value] += 1
        body["counts"] = {**tally, **(counts or {})}
    return body


def _plain(v: Any) -> Any:
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "value"):
        return v.value
    return v
