"""The drain loop: the leader converges every active drain (desired/drains.py) from its rows and the
runtime records, once per tick. Nothing is remembered between ticks: a kill -9 or a failover
resumes a drain where its rows say.

A *draining* drain takes games, ``max_parallel`` in flight at a time:

* a stop (a host drain; a node drain with node-local state and ``local_state: stop``; past the
  deadline with ``on_deadline: stop``) is a ``stop`` job through admission, source ``admin``: a
  planned disruption, so it waits for the engine's turn boundary, until the drain's deadline (the
  generation's own, when later than RTMANAGER_DISRUPTION_WAIT); past the deadline the job is
  ``force``: no wait. The job carries the drain (``Job.drain``): it is tagged with the drain's id,
  and the game's row (its image, pause and schedule, for undrain) is written in the job's own
  transaction only when the record is as the plan saw it and the stop changes it;
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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from controller.admission import Admission
from controller.metrics import Metrics
from controller.triggers import wait_any
from desired import drains
from desired.clock import Clock
from desired.drains import Drain, DrainAction, DrainGame, DrainStatus, DrainStep, GameState, Restore, StepKind
from desired.errors import Conflict, StoreUnavailable, TemporaryError
from desired.jobs import DecisionAction, Job
from desired.leader import Fenced
from desired.model import DesiredStatus, JobKind, OpSource, RuntimeRecord, StopReason
from desired.ports import DrainStore

log = logging.getLogger("rtmanager.drains")

TICK = 1.0            # seconds between looks at the active drains
TICK_RETRY_MAX = 30.0


class Drainer:
    def __init__(self, *, store: DrainStore, admission: Admission, metrics: Metrics, clock: Clock,
                 wake: Callable[[str], None], interval: float = TICK,
                 nodes: Callable[[], Awaitable[Mapping[str, str]]] | None = None) -> None:
        self.store = store
        self.nodes = nodes  # Swarm: the nodes (id -> hostname); a drain of another node fails
        self.admission = admission
        self.wake_game = wake  # the reconciler's work queue
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.wake = asyncio.Event()

    # ------------------------------------------------------------------ hooks
    async def hold(self, record: RuntimeRecord) -> str | None:
        """The reconciler's question before a restart nobody asked for (see the module's doc), and before a
        removal nobody asked for (the cleanup TTL)."""
        targets = await self.store.drained_targets()
        if targets.host:
            return "the host is drained (the drain stops its games, and undrain starts them again)"
        if record.node_id is not None and record.node_id in targets.nodes:
            return f"node {record.node_id} is drained (the drain moves or stops its games)"
        return None

    async def hold_removal(self, record: RuntimeRecord) -> str | None:
        """The reconciler's question before a removal nobody asked for (the cleanup TTL), which is final: held
        as a restart is (``hold``), and also when a drain not undrained yet took the game and may start it
        again (a move that failed leaves it stopped and pinned nowhere, so no drained node names it)."""
        held = await self.hold(record)
        if held is None and await self.store.brought_back_at_undrain(record.game_id):
            held = "a drain took the game and its undrain starts it again"
        return held

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
        if drain.node is not None and self.nodes is not None and not games:
            # A drain written straight to the database (the CLI) is checked here, before it takes anything:
            # a node the Swarm does not know (a typo, a hostname) fails visibly instead of "drained".
            known = await self.nodes()
            if drain.node not in known:
                why = drains.unknown_node(drain.node, known)
                if await self.store.fail_drain(drain.id, why):
                    log.error("drain %d failed: %s", drain.id, why, extra={"drain_id": drain.id})
                return 0, 0
        step = drains.plan(drain, records, games, self.clock.now())
        if step.finish:
            await self.store.finish_games(drain.id, [(g.game_id, *_outcome(g, records.get(g.game_id)))
                                                     for g in step.finish])
            for g in step.finish:
                log.info("drain %d: %s of %s done", drain.id, g.action.value, g.game_id,
                         extra={"game_id": g.game_id, "drain_id": drain.id})
        forcing = {g.game_id for g in step.force}
        for g in step.resubmit:
            if g.game_id not in forcing:
                await self._stop(drain, records[g.game_id], StepKind.AGAIN, g.forced)
        for g in step.force:
            log.warning("drain %d: deadline passed; %s of %s goes ahead without waiting for a turn boundary",
                        drain.id, g.action.value, g.game_id, extra={"game_id": g.game_id, "drain_id": drain.id})
            if g.action is DrainAction.STOP:
                await self._stop(drain, records[g.game_id], StepKind.AGAIN, True)
            else:
                await self.store.force_move(drain, g)
                self.wake_game(g.game_id)
        for t in step.take:
            log.info("drain %d: taking %s to %s it%s", drain.id, t.record.game_id, t.action.value,
                     " (deadline passed: at once)" if t.forced else " at a turn boundary",
                     extra={"game_id": t.record.game_id, "drain_id": drain.id})
            if t.action is DrainAction.STOP:
                if not await self._stop(drain, t.record, StepKind.TAKE, t.forced):
                    continue  # the record changed since it was read: the next tick looks again
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

    async def _stop(self, drain: Drain, record: RuntimeRecord, kind: StepKind, forced: bool) -> bool:
        """The drain's stop, tagged with the drain; a take writes the game's row in the stop's own
        transaction, under the game's lock, only if the record is still what the plan saw and the stop
        changes it (desired/db/drains.py ``record_drain_step``). Before the deadline the stop waits for a
        turn boundary until the drain's deadline. False when the store refused the step (Conflict)."""
        job = Job(kind=JobKind.STOP, game_id=record.game_id, source=OpSource.ADMIN, reason=StopReason.ADMIN_REQUEST,
                  force=forced, drain=DrainStep(drain_id=drain.id, kind=kind, generation=record.generation,
                                                wait_until=drain.deadline_at, forced=forced))
        try:
            await self.admission.submit(job)
        except Conflict as exc:
            log.info("drain %d: %s", drain.id, exc, extra={"game_id": record.game_id, "drain_id": drain.id})
            return False
        return True

    # ------------------------------------------------------------------ undraining
    async def undrain(self, drain: Drain) -> None:
        records, games = await self.store.drain_scope(drain)
        stopped = await self.store.stopped_since(drain.id)
        # A move under way goes on (its pin is cleared, its spec revised); the drain stops following it.
        await self.store.finish_games(drain.id, [
            (g.game_id, None, "undrained while moving: the move goes on") for g in games.values()
            if g.action is DrainAction.MOVE and g.state is GameState.IN_PROGRESS])
        settled = True
        for step in drains.restore_plan(games, records, stopped):
            g = step.game
            if step.verdict is Restore.START:
                settled = await self._restore(drain, g, records[g.game_id]) and settled
            else:
                state = GameState.RESTORED if step.verdict is Restore.RESTORED else GameState.SKIPPED
                await self.store.game_restored(drain.id, g.game_id, state, step.note)
                log.info("undrain %d: %s: %s", drain.id, g.game_id, step.note,
                         extra={"game_id": g.game_id, "drain_id": drain.id})
        if not settled:
            return  # a restore the store refused (somebody else's stop meanwhile): the next tick looks again
        if await self.store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED):
            log.info("drain %d: %s is in use again", drain.id, drain.target, extra={"drain_id": drain.id})

    async def _restore(self, drain: Drain, game: DrainGame, record: RuntimeRecord) -> bool:
        """Start it again as it was: its image and schedule, and its pause (which a stop keeps); a game a
        failed move stopped, pinned back to its node. Judged as a rollout's patch back is (the image the
        game ran: only a disabled version refuses it); the row settles in the start's own transaction:
        restored, or skipped with the refusal. False when the store refused the step (Conflict)."""
        image = drains.restore_image(game, record)
        pin = game.from_node if game.action is DrainAction.MOVE else None
        try:
            outcome = await self.admission.submit(Job(
                kind=JobKind.START, game_id=game.game_id, source=OpSource.ADMIN, image_ref=image,
                turn_interval=game.turn_interval,
                drain=DrainStep(drain_id=drain.id, kind=StepKind.RESTORE, pin=pin)))
        except Conflict as exc:
            log.info("undrain %d: %s", drain.id, exc, extra={"game_id": game.game_id, "drain_id": drain.id})
            return False
        d = outcome.decision
        if d is not None and d.action is DecisionAction.REJECT:
            log.warning("undrain %d: %s is not started again: %s", drain.id, game.game_id, d.message,
                        extra={"game_id": game.game_id, "drain_id": drain.id})
            return True
        log.info("undrain %d: %s started again%s", drain.id, game.game_id, f" on node {pin}" if pin else "",
                 extra={"game_id": game.game_id, "drain_id": drain.id})
        after = d.record if d is not None and d.record is not None else record
        if after.desired_status is DesiredStatus.RUNNING and after.paused != game.paused:
            kind = JobKind.PAUSE if game.paused else JobKind.RESUME
            await self.admission.submit(Job(kind=kind, game_id=game.game_id, source=OpSource.ADMIN))
        return True


def _outcome(game: DrainGame, record: RuntimeRecord | None) -> tuple[str | None, str | None]:
    """(node it runs on now, note) of a game the drain is done with."""
    if record is None or record.desired_status is DesiredStatus.REMOVED:
        return None, "removed meanwhile"
    if game.action is DrainAction.MOVE:
        if record.desired_status is DesiredStatus.RUNNING:
            return record.node_id, f"moved to node {record.node_id}"
        why = f" ({record.last_error_code.value}: {record.last_error_message})" if record.last_error_code else ""
        return None, "stopped instead of moved" + why  # no node: undrain brings back only moves that failed
    if record.desired_status is DesiredStatus.RUNNING:
        return record.node_id, "moved off the node by another job (a start or restart)"
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
