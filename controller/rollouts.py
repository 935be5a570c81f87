"""The rollout loop: runs in the leader only, beside the turn clock, and moves every rollout that is
not finished one step per tick.

Level-triggered: each tick reads the rollouts' rows, their patches' operations and their games'
runtime records again (never what an earlier tick or an earlier leader remembered), asks
desired/rollouts.py what follows, and writes it. A game is moved by a ``patch`` job through
admission (controller/admission.py, source ``admin``): it waits for the turn boundary and its state
directory is copied first, exactly as any patch; the game's row takes the step in the patch's own
transaction, so a kill -9 between the two cannot happen. A patch the rollout began before a
failover is followed by the next leader from its operation id.

The tick sleeps ``RTMANAGER_ROLLOUT_INTERVAL`` (the canary hold is counted in it), and is woken
early by every commit that writes a result (a patch answered) and by a rollout created or steered
through this replica's REST API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from controller.admission import Admission
from controller.metrics import Metrics
from desired import rollouts
from desired.errors import Conflict, StoreUnavailable, TemporaryError
from desired.jobs import Job
from desired.leader import Fenced
from desired.model import JobKind, OpSource, StopReason
from desired.ports import RolloutStore
from desired.rollouts import GameState, Rollout, RolloutGame, RolloutState, RolloutStep

log = logging.getLogger("rtmanager.rollouts")

RETRY, RETRY_MAX = 2.0, 30.0  # seconds between failed ticks, doubling
MAX_ROUNDS = 50  # starts re-planned within one tick after skips (a skip frees a slot at once)


class RolloutLoop:
    def __init__(self, *, store: RolloutStore, admission: Admission, metrics: Metrics, interval: float) -> None:
        self.store = store
        self.admission = admission
        self.metrics = metrics
        self.interval = interval
        self.wake = asyncio.Event()
        # Whether the last tick found a rollout unfinished: only then can a committed result move one
        # (``result_committed``). A rollout begun here wakes the loop itself (rollouts_http.py); one begun by
        # another process is found by the interval's tick, as before.
        self.busy = True

    def result_committed(self) -> None:
        """The outbox's signal: a patch answered may let its rollout go on (nothing to do with none unfinished)."""
        if self.busy:
            self.wake.set()

    async def tick(self) -> None:
        unfinished = await self.store.unfinished_rollouts()
        self.busy = bool(unfinished)
        for rollout, games in unfinished:
            try:
                await self.step(rollout, games)
            except (TemporaryError, Fenced):
                raise  # not this rollout's doing: the tick fails
            except Exception:  # noqa: BLE001 - one rollout's bad data must not stop the others
                self.metrics.loop_errors.labels("rollouts").inc()
                log.exception("rollout %d: this step failed; trying again next tick", rollout.id)
        by_rollout, by_game = await self.store.rollout_gauges()
        for s in RolloutState:
            self.metrics.rollouts.labels(s.value).set(by_rollout.get(s.value, 0))
        for g in GameState:
            self.metrics.rollout_games.labels(g.value).set(by_game.get(g.value, 0))

    async def step(self, rollout: Rollout, games: list[RolloutGame]) -> None:
        """Follow the patches in flight, then pause, finish, or start the next games."""
        now = self.store.clock.now()
        in_flight = [g for g in games if g.state is GameState.IN_PROGRESS]
        failing: set[str] = set()  # in flight, their patch failed: they count against the budget already
        if in_flight:
            ops = await self.store.rollout_operations(
                [i for g in in_flight for i in (g.operation_id, g.back_operation_id) if i])
            settled: dict[str, RolloutGame] = {}
            for g in in_flight:
                record = await self.store.find(g.game_id)
                op = ops.get(g.operation_id) if g.operation_id else None
                back = ops.get(g.back_operation_id) if g.back_operation_id else None
                verdict = rollouts.follow(rollout, g, op, record, now, back)
                if verdict.failing:
                    failing.add(g.game_id)
                if verdict.then is None and verdict.state is GameState.IN_PROGRESS:
                    if verdict.reason != g.reason:
                        await self.store.settle_rollout_game(rollout.id, g.game_id, g.state, g.state, verdict.reason)
                    continue
                if verdict.then is None:
                    ok = await self.store.settle_rollout_game(rollout.id, g.game_id, GameState.IN_PROGRESS,
                                                              verdict.state, verdict.reason)
                    state: GameState | None = verdict.state if ok else None
                else:
                    state = await self._submit(rollout, g.game_id, verdict.then, verdict.image_ref, RolloutStep(
                        rollout_id=rollout.id, expect=GameState.IN_PROGRESS, state=verdict.state,
                        reason=verdict.reason, back=verdict.then is JobKind.PATCH))
                if state is not None:
                    log.info("rollout %d: game %s %s: %s", rollout.id, g.game_id, state.value,
                             verdict.reason, extra={"game_id": g.game_id})
                    settled[g.game_id] = dataclasses.replace(g, state=state, reason=verdict.reason,
                                                             finished_at=now if state.is_final else None)
            games = [settled.get(g.game_id, g) for g in games]
        if (rollout.state is RolloutState.RUNNING and any(g.state is GameState.WAITING for g in games)
                and await self._target_refused(rollout)):
            return
        not_ready: set[str] = set()  # waiting games briefly not up: passed over this tick, tried next tick
        for _ in range(MAX_ROUNDS):
            plan = rollouts.plan(rollout, games, frozenset(not_ready), frozenset(failing))
            if plan.pause is not None:
                if await self.store.pause_rollout(rollout.id, plan.pause):
                    log.warning("rollout %d paused itself: %s", rollout.id, plan.pause)
                return
            if plan.complete or (rollout.state is RolloutState.ABORTED
                                 and not any(g.state is GameState.IN_PROGRESS for g in games)):
                if await self.store.finish_rollout(rollout.id):
                    log.info("rollout %d %s: %s", rollout.id,
                             "completed" if rollout.state is RolloutState.RUNNING else "finished (aborted)",
                             rollouts.counts(games))
                return
            if not plan.start:
                return
            again = False  # a game settled at once or was passed over: its slot is free for the next
            started: dict[str, RolloutGame] = {}
            for game_id, canary in plan.start:
                old = next(g for g in games if g.game_id == game_id)
                record = await self.store.find(game_id)
                why = rollouts.skip_reason(record, rollout.target_image_ref, old.from_image_ref)
                wait = rollouts.not_ready(record) if record is not None and why is None else None
                if why is not None:
                    await self.store.settle_rollout_game(rollout.id, game_id, GameState.WAITING, GameState.SKIPPED,
                                                         why)
                    log.info("rollout %d: game %s skipped: %s", rollout.id, game_id, why, extra={"game_id": game_id})
                    now_state = GameState.SKIPPED
                elif wait is not None:
                    not_ready.add(game_id)
                    if wait != old.reason:
                        await self.store.settle_rollout_game(rollout.id, game_id, GameState.WAITING,
                                                             GameState.WAITING, wait)
                    again = True
                    continue
                else:
                    if await self._target_refused(rollout):  # read again before each patch: it may be
                        return  # disabled while a tick starts patches (admission checks it only under registry)
                    reason = f"patching to {rollout.target_version}" + (" (canary)" if canary else "")
                    recorded = await self._submit(rollout, game_id, JobKind.PATCH, rollout.target_image_ref,
                                                  RolloutStep(rollout_id=rollout.id, expect=GameState.WAITING,
                                                              state=GameState.IN_PROGRESS, reason=reason,
                                                              canary=canary))
                    if recorded is None:
                        return  # paused or aborted meanwhile, or the game moved: the next tick reads it again
                    now_state = recorded
                again = again or now_state.is_final
                started[game_id] = dataclasses.replace(old, state=now_state, canary=canary and now_state is
                                                       GameState.IN_PROGRESS,
                                                       finished_at=now if now_state.is_final else None)
            games = [started.get(g.game_id, g) for g in games]
            if not again:
                return

    async def _target_refused(self, rollout: Rollout) -> bool:
        """The target version refuses new patches now (disabled, deprecated, gone): the rollout pauses itself."""
        refusal = rollouts.target_refusal(rollout, await self.store.engine_version_of(rollout.target_image_ref),
                                          registry=self.admission.registry)
        if refusal is None:
            return False
        if await self.store.pause_rollout(rollout.id, refusal):
            log.warning("rollout %d paused itself: %s", rollout.id, refusal)
        return True

    async def _submit(self, rollout: Rollout, game_id: str, kind: JobKind, image_ref: str | None,
                      step: RolloutStep) -> GameState | None:
        """A job through admission that records ``step`` on the game's row in its transaction: the
        state the row took (a refused patch fails at once, a patch already done is done), or None when
        the row, the rollout or the game moved meanwhile (nothing was recorded)."""
        job = Job(kind=kind, game_id=game_id, source=OpSource.ADMIN, image_ref=image_ref if kind is JobKind.PATCH
                  else None, reason=StopReason.ADMIN_REQUEST if kind is JobKind.STOP else None, force=rollout.force,
                  rollout=step)
        try:
            outcome = await self.admission.submit(job)
        except Conflict as exc:
            log.info("rollout %d: %s", rollout.id, exc, extra={"game_id": game_id})
            return None
        d = outcome.decision
        if d is None:
            return step.state
        return rollouts.step_outcome(step, d.action, d.error_code, d.message)[0]

    async def run(self, stopping: asyncio.Event) -> None:
        backoff = RETRY
        while not stopping.is_set():
            self.wake.clear()
            delay = self.interval
            try:
                await self.tick()
                backoff = RETRY
                self.metrics.loop_ok("rollouts")
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - Postgres away, or a bug: back off, never die
                self.metrics.loop_failed("rollouts", exc)
                if isinstance(exc, StoreUnavailable):
                    log.warning("rollouts: %s; retrying in %.1fs", exc, backoff)
                else:
                    log.exception("rollouts: the tick failed; retrying in %.1fs", backoff)
                delay, backoff = backoff, min(backoff * 2, RETRY_MAX)
            waiters = [asyncio.create_task(stopping.wait()), asyncio.create_task(self.wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            await asyncio.sleep(0.05)  # a burst of wakes (results of many games) makes one tick
