"""The reconciler: workers that take a game id from the work queue and converge it.

``sync(game_id)`` is sample-controller's syncHandler: it re-reads the record
and the unit every time, asks ``plan`` for one action, carries it out, and
writes what it observed through a named store transition. Every handler returns
what comes next as a value (controller/step.py): look again now (``MAX_STEPS``
at most, until the plan says NOOP), or come back after a delay; ``sync`` alone
puts the game back on the work queue. Results are written, with the final
status, in one transaction (desired/db/); the relay publishes them.

Composed here: the unit's spec and its hash (controller/spec.py), the health
probe (controller/health.py), the turn protocol (controller/turns.py), the
start of an engine (controller/start.py), crashes (controller/crashes.py).

A failure that a job must hear about (``PermanentError``) ends its generation
(``Store.fail_generation``): the job is answered, and a new generation asks for
what is safe now (the previous image again, or stopped); the next step of the
same loop converges it. So a failed patch never leaves a healthy game stopped,
and no action here stops a game by itself: stops, like everything else, come
from the plan.

Never hold a pooled Postgres connection across a backend call or a probe: every
store call below acquires and releases its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import timedelta

from controller.config import Settings
from controller.crashes import Crashes
from controller.health import Health
from controller.metrics import Metrics
from controller.planner import (
    DISRUPTION_POLL,
    DISRUPTIONS,
    Action,
    ActionKind,
    disruption_deadline,
    disruption_wait_left,
    plan,
)
from controller.spec import Specs
from controller.start import Starts
from controller.step import AGAIN, DONE, Step, merge, requeue
from controller.storage import StateKeeper
from controller.turns import Look, Turns
from controller.units import UnitCache
from controller.workqueue import ShutDown, WorkQueue
from desired import storage, transitions
from desired.clock import Clock
from desired.errors import (
    Conflict,
    ContainerStartFailed,
    DockerUnavailable,
    ImageRejected,
    ImageUnavailable,
    NodeUnavailable,
    PermanentError,
    RtmError,
    StorageFull,
    StoreUnavailable,
    TemporaryError,
    Unplaceable,
)
from desired.leader import Fence, Fenced
from desired.model import DesiredStatus, ErrorCode, JobKind, RuntimeRecord, Status, container_name
from desired.policy import NODE_LOSS_POLL, NodeLossPolicy, rollback_target
from desired.ports import ReconcilerStore
from desired.values import Claimed, Crash
from observed.backend import RuntimeBackend
from observed.engine import EngineClient
from observed.errors import (
    BackendUnavailable,
    ImageMissing,
    NodeLost,
    ObservedError,
    Refused,
)
from observed.model import ContainerSpec, ObservedContainer
from observed.statedir import NoSpace

log = logging.getLogger("rtmanager.reconciler")

MAX_STEPS = 8
REFUSED_RETRY = 5.0  # seconds before a stop or removal the daemon refused is tried again
HOLD_RETRY = 5.0  # seconds before a restart a drain holds back is looked at again
CLOCK_SKEW = timedelta(seconds=120)  # what may part the daemon's clock from the database's
REVISIONS_BACK = 32  # spec revisions before the record's at which an engine may still be the replaced image's
_RESTORING = (ActionKind.CREATE, ActionKind.START, ActionKind.RECREATE, ActionKind.CONFIRM)
_DISRUPTING_OPS = (JobKind.STOP, JobKind.RESTART, JobKind.PATCH, JobKind.CLEANUP)  # may wait for a generation first

# The one table from the backend's errors to the results' error codes.
BACKEND_ERRORS: dict[type[ObservedError], type[RtmError]] = {
    NodeLost: NodeUnavailable,
    BackendUnavailable: DockerUnavailable,
    NoSpace: StorageFull,
    ImageMissing: ImageUnavailable,
    Refused: ContainerStartFailed,
}


def domain_error(exc: ObservedError) -> RtmError:
    for kind in type(exc).__mro__:
        if kind in BACKEND_ERRORS:
            return BACKEND_ERRORS[kind](exc.message)
    return ContainerStartFailed(exc.message)


@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    try:
        yield
    except ObservedError as exc:
        raise domain_error(exc) from exc


# Actions that leave the unit as it was inspected; planned only when the unit runs and is the record's.
KEEPS_UNIT = (ActionKind.TURN, ActionKind.RECORD)


class Reconciler:
    def __init__(self, settings: Settings, store: ReconcilerStore, backend: RuntimeBackend, engine: EngineClient,
                 metrics: Metrics, queue: WorkQueue, *, fence: Fence | None = None, clock: Clock | None = None,
                 database: str = "") -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        self.queue = queue
        self.fence = fence
        self.clock = clock or store.clock
        self.specs = Specs(settings, database)
        self.health = Health(settings, store, backend, engine, metrics, self.clock, wake=queue.add)
        self.turns = Turns(settings, store, engine, metrics, self.clock, self.health, fence)
        self.dispose_budget = settings.runtime.max_removals  # refilled by the resync, once per interval
        self._budget_refilled_at = time.monotonic()
        self.unowned: dict[str, str] = {}  # container id -> name, reported once each
        self.units = UnitCache()  # the composition root turns it on with the backend's event stream
        self.states = StateKeeper(settings, metrics, note=store.note_state_restore)  # copies, restores, room
        self.starts = Starts(settings, store, backend, engine, metrics, self.health, self.states, self.units)
        self.crashes = Crashes(settings, store, backend, metrics, self.health, self.starts)
        # Why a restart nobody asked for (a crash's, a vanished unit's) must not happen now (a drain of the
        # host or of the game's node: the drain stops or moves the game instead), or None. Set by the
        # composition root; read from the database at each such restart, never remembered.
        self.hold: Callable[[RuntimeRecord], Awaitable[str | None]] | None = None
        self.hold_removal: Callable[[RuntimeRecord], Awaitable[str | None]] | None = None
        # (game, (term, generation)) whose queued operations this process claimed, until a job of the game
        # may have been admitted since (``job_admitted``): a turn's poll of the engine claims nothing new.
        self._claimed: dict[str, tuple[int, int]] = {}
        # Games a job (or the resync's fallback) woke since their last look: that look claims as it reads.
        self._woken: set[str] = set()
        # Games whose claim found a pause, a resume or a reconcile (or nothing: what a predecessor claimed),
        # until the turn step has answered them (``Store.answer_during_turn``) or the generation converged:
        # an attempt that fails (a database or Docker blip) is made again at the next poll.
        self._control_due: set[str] = set()
        self._renames_told: set[str] = set()  # units found renamed, logged once each
        self.node_loss = NodeLossPolicy(mode=settings.runtime.node_loss, grace=settings.runtime.node_loss_grace,
                                        state_shared=settings.storage.state_shared)

    @property
    def epoch(self) -> int:
        return self.fence.epoch if self.fence is not None else 1

    async def observe(self, record: RuntimeRecord, address: str | None) -> bool:
        """The health round's look at one running engine (controller/health.py): True when it answered
        and nothing changed."""
        return await self.health.observe(record, address)

    def refill_dispose_budget(self) -> None:
        """At most once per resync interval, however many resyncs run (events reconnecting force some)."""
        now = time.monotonic()
        if now - self._budget_refilled_at >= self.settings.runtime.resync_interval:
            self.dispose_budget = self.settings.runtime.max_removals
            self._budget_refilled_at = now

    def plan_only(self, record: RuntimeRecord | None, container: ObservedContainer | None,
                  lost_nodes: frozenset[str] = frozenset()) -> Action:
        return plan(record, container, want_hash=self.specs.want_hash(record) if record else None,
                    instance=self.settings.leadership.instance, now=self.clock.now(),
                    orphan_grace=self.settings.runtime.orphan_grace, cleanup_ttl=self.settings.runtime.cleanup_ttl,
                    database=self.specs.database, epoch=self.epoch,
                    unreachable_restart_after=self.settings.engine.unreachable_restart_after,
                    disruption_wait=self.settings.runtime.disruption_wait, node_loss=self.node_loss,
                    lost_nodes=lost_nodes)

    def job_admitted(self, game_id: str) -> None:
        """Admission (or an operator tool's NOTIFY) may have queued an operation of the game: its next sync
        claims again, then it is worked on."""
        self._claimed.pop(game_id, None)
        self._woken.add(game_id)
        self.queue.add(game_id)

    def forget_claims(self, game_ids: Iterable[str]) -> None:
        """These games' next sync claims again: the resync's fallback for a wake that never came (a lost
        NOTIFY, a listener reconnecting), for the games with a queued operation."""
        for game_id in game_ids:
            self._claimed.pop(game_id, None)
            self._woken.add(game_id)

    def note_unowned(self, container: ObservedContainer, reason: str) -> None:
        """Loudly, once per unit: a game nobody accounts for is running (never touched here)."""
        if container.id not in self.unowned:
            self.unowned[container.id] = container.name
            log.error("unaccounted unit: %s; rtmanager adopt %s, or rtmanager dispose %s", reason,
                      container.game_id, container.game_id,
                      extra={"game_id": container.game_id, "container_id": container.id, "unowned": True})

    # ---------------------------------------------------------------- workers
    async def worker(self, n: int) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self.sync(str(key))
                self.queue.forget(key)
            except Fenced:
                raise  # this replica is no longer the leader: stop acting at once
            except asyncio.CancelledError:
                raise
            except TemporaryError as exc:
                delay = self.queue.add_rate_limited(key)
                self.metrics.queue_retries.inc()
                log.warning("temporary failure, retrying in %.1fs: %s", delay, exc.message,
                            extra={"game_id": key, "error_code": exc.code.value})
                code = ErrorCode.DOCKER_UNAVAILABLE if isinstance(exc, DockerUnavailable) else ErrorCode.INTERNAL_ERROR
                # A node that is lost is the node-loss policy's business: the overdue job is answered, the
                # game's desired state stays (it runs again when its node is back, or as the policy says).
                await self.fail_if_overdue(str(key), code, exc.message, self.settings.runtime.job_timeout,
                                           answer_only=isinstance(exc, NodeUnavailable),
                                           unplaced=isinstance(exc, Unplaceable))
            except Exception as exc:  # noqa: BLE001 - never leave a game stuck silently
                delay = self.queue.add_rate_limited(key)
                self.metrics.queue_retries.inc()
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile failed unexpectedly, retrying in %.1fs", delay, extra={"game_id": key})
                # Neither an outage nor a conflict: a waiting job is answered once its start timeout
                # has passed, instead of waiting for the job timeout.
                await self.fail_if_overdue(str(key), ErrorCode.CONTAINER_START_FAILED,
                                           f"{exc.__class__.__name__}: {exc}", self.settings.engine.start_timeout)
            finally:
                self.queue.done(key)

    async def sync(self, game_id: str) -> Step:
        """Converge one game: look, plan one action, carry it out, until a step says to stop. The only
        place that puts a game back on the work queue: once, at the earliest requeue of its steps."""
        steps: list[Step] = []
        try:
            for _ in range(MAX_STEPS):
                steps.append(await self._step(game_id, steps[-1].record if steps else None))
                if not steps[-1].again:
                    break
            else:
                log.warning("did not converge within %d steps; will look again", MAX_STEPS,
                            extra={"game_id": game_id})
                steps.append(requeue(1.0, "did not converge"))
        finally:
            # Also when a later step raises: a requeue an earlier step asked for (a crash's
            # backoff) still holds, and the worker's retry after the error can only come sooner.
            step = merge(*steps)
            if step.after is not None:
                self.queue.add_after(game_id, step.after)
        return step

    async def _step(self, game_id: str, written: RuntimeRecord | None = None) -> Step:
        """Look once, plan one action, carry it out: what comes next. ``written``: the record the previous
        step's transition committed (controller/step.py ``again_on``), planned on as it is."""
        claimed: list[Claimed] | None = None  # what this look claimed, when it did
        record: RuntimeRecord | None
        if written is not None:
            record = written
        elif game_id not in self._woken or self.settings.runtime.dry_run:
            # No job woke it since its last look (a poll, an event of its unit): a read; what it may still
            # have to claim (a generation that moved without a wake) is claimed below, once planned.
            record = await self.store.find(game_id)
        else:
            # A job woke it: its look claims its generation's queued operations in the same statement. A wake
            # while the statement runs marks it woken again: then the memo is not set, and the step claims.
            self._woken.discard(game_id)
            try:
                record, claimed = await self.store.find_and_claim(game_id)
            except BaseException:
                self._woken.add(game_id)
                raise
            if record is not None and game_id not in self._woken:
                self._claimed[game_id] = (self.epoch, record.generation)
            self._observe_claimed(claimed)
            self._note_control(game_id, claimed)
        if record is None or record.converged:
            self._claimed.pop(game_id, None)
            self._control_due.discard(game_id)
        container = self.units.get(record)
        with backend_errors():
            if container is None:
                token = self.units.token(game_id)
                container = await self.backend.inspect(container_name(game_id))
                if (record is not None and record.current_container_id and (container is None or not container.unit_of(
                        self.settings.leadership.instance, game_id))):
                    # No unit of the game under its name (none, or another game's): the one the record names.
                    container = await self._renamed(record) or container
                self.units.put(game_id, token, container)
            lost = await self.backend.lost_nodes()
        action = self.plan_only(record, container, lost)
        if action.kind is ActionKind.NOOP:
            return DONE
        if action.kind is ActionKind.UNOWNED:
            assert container is not None
            self.note_unowned(container, action.reason)
            return DONE
        # Whatever the convergence: an engine that crashes mid-turn (a turn's generation is not converged)
        # on a drained target must not be restarted there either.
        if (self.hold is not None and action.kind in (ActionKind.CREATE, ActionKind.START) and record is not None
                and record.desired_status is DesiredStatus.RUNNING):
            held = await self.hold(record)
            if held is not None:
                log.info("not restarting: %s", held, extra={"game_id": game_id})
                return requeue(HOLD_RETRY, held)
        if action.check_engine and not self.settings.runtime.dry_run:
            # A planned disruption: the record's last probe may be stale, ask the engine now.
            assert record is not None and container is not None
            checked, record = await self._check_engine(record, container, action, lost)
            if not isinstance(checked, Action):
                return checked
            action = checked
        if action.kind is ActionKind.WAIT:
            if record is not None and record.status is Status.NODE_LOST and not record.converged:
                # A job waits for a node that may never come back: answered after RTMANAGER_JOB_TIMEOUT
                # (docker_unavailable), the game left to the node-loss policy.
                await self.fail_if_overdue(game_id, ErrorCode.DOCKER_UNAVAILABLE, action.reason,
                                           self.settings.runtime.job_timeout, answer_only=True)
            return requeue(action.delay, action.reason)
        if self.settings.runtime.dry_run:
            log.info("dry run: would %s: %s", action.kind.value, action.reason,
                     extra={"game_id": game_id, "action": action.kind.value, "dry_run": True})
            return DONE
        if action.kind is ActionKind.CLEANUP and self.hold_removal is not None and record is not None:
            # A removal nobody asked for is final (the game_id cannot be started again): none while a drain
            # holds the game's host or node, or took the game, and may start it again at undrain.
            held = await self.hold_removal(record)
            if held is not None:
                log.info("not removing after the cleanup TTL: %s", held, extra={"game_id": game_id})
                # At the resync's pace: a drain may hold many stopped games for long, and nothing is urgent.
                return requeue(self.settings.runtime.resync_interval, held)
        if action.kind is ActionKind.CLEANUP:
            # Removals nobody asked for (the cleanup TTL) are rationed: a wrong
            # database or clock must not empty the host in one go.
            if self.dispose_budget <= 0:
                log.warning("not removing %s: the removal budget of this resync interval is spent",
                            container_name(game_id), extra={"game_id": game_id})
                return requeue(self.settings.runtime.resync_interval, "the removal budget is spent")
            self.dispose_budget -= 1
        if action.kind not in KEEPS_UNIT:
            self.units.touch(game_id)
        if record is not None and not record.converged and self._claimed.get(game_id) != (self.epoch,
                                                                                           record.generation):
            # Claimed once per generation, and again after every admission of a job of the game (it may have
            # joined the generation): a poll of the same generation in between has nothing to claim.
            # The memo before the claim: an admission's wake handled while the claim is in flight (its commit
            # after the claim's snapshot) clears it, so the next sync claims what that admission queued.
            self._claimed[game_id] = (self.epoch, record.generation)
            try:
                more = await self.store.claim(game_id, record.generation)
            except BaseException:
                self._claimed.pop(game_id, None)
                raise
            self._observe_claimed(more)
            self._note_control(game_id, more)
            claimed = (claimed or []) + more
        op_ids = [c.id for c in claimed or ()]
        log.info("%s: %s", action.kind.value, action.reason, extra={
            "game_id": game_id, "action": action.kind.value, "operation_ids": ",".join(map(str, op_ids)),
            "generation": record.generation if record else None})
        if action.overdue is not None and record is not None:
            await self._note_overdue(record, action)
        started = asyncio.get_running_loop().time()
        result = "ok"
        try:
            # A container that is not ours only ever blocks the name: act as if there were none.
            instance = self.settings.leadership.instance
            ours = container if container is not None and record is not None and container.unit_of(
                instance, record.game_id) else None
            if action.kind is ActionKind.TURN and record is not None and game_id in self._control_due:
                # A pause, a resume or a reconcile joined the turn's generation: the unit is the one wanted and
                # only the turn is to come, so they are answered now (unless a job that changes what runs
                # joined it too); the turn's jobs wait for it (an engine may generate for long, or for ever).
                # Looked for once a claim found one of them, or nothing (after a restart, what its predecessor
                # claimed): not at every turn, whose own job's claim costs no statement more.
                record = await self.store.answer_during_turn(record) or record
                self._control_due.discard(game_id)
            with backend_errors():
                return await self._act(action.kind, record, ours, self.specs.build(record, self.epoch)
                                       if record else None, action.node, reason=action.reason)
        except PermanentError as exc:
            result = "failed"
            assert record is not None
            if action.kind is ActionKind.RECREATE and ours is not None and record.status.is_up:
                kept = await self._kept(record, ours, exc)
                if kept is not None:
                    return kept
            if record.status is Status.NODE_LOST and action.kind in _RESTORING:
                # The first start after its node came back: what fails is the engine the node's dockerd
                # stopped when the node went down (Swarm shows its task running until the node's agent
                # reports the exit). Not a crash; the next look starts it (and counts a failure then).
                log.warning("the engine did not survive the loss of its node: starting it again (not a crash): %s",
                            exc.message, extra={"game_id": game_id})
                return AGAIN
            if record.converged and action.kind in _RESTORING and not isinstance(exc, ImageRejected):
                # Nobody asked for this start: the controller was bringing back a game that
                # crashed or vanished. It counts as one more crash, with backoff and a limit.
                return await self.crashes.count(record, Crash(code=exc.code, detail=exc.message, container_id=None))
            await self._fail(record, exc.code, exc.message)
            if record.desired_status is not DesiredStatus.RUNNING:
                # A stop or removal the daemon refuses: answered; try again later, not in
                # a loop of new generations.
                return requeue(REFUSED_RETRY, "the daemon refused a stop or a removal")
            return AGAIN
        except Conflict as exc:
            result = "conflict"
            log.info("record changed under us, looking again: %s", exc, extra={"game_id": game_id})
            return AGAIN
        except BaseException:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(action.kind.value, result).inc()
            self.metrics.reconcile_seconds.labels(action.kind.value).observe(
                asyncio.get_running_loop().time() - started)

    async def _kept(self, record: RuntimeRecord, unit: ObservedContainer, exc: PermanentError) -> Step | None:
        """A replacement of the running engine failed; None unless that engine still runs (the failure came
        before it was touched: an image no longer allowed, one that cannot be pulled, no room for the copy).
        Then the game keeps it. A drift nobody asked for (a setting changed) stays as it is, said in the log
        and tried again later: no crash, no stop. A job's generation is answered with the failure and desired
        state goes back to that engine (its image and spec revision), as a patch's failure goes back to the
        image it replaced; a restart has no other image to go back to, and stopping a healthy game for it
        would destroy what nobody asked to end."""
        found = await self.backend.inspect(unit.id)
        if found is None or found.state != "running" or found.id != record.current_container_id:
            return None  # touched, gone, or paused from outside (a frozen engine is no engine to keep)
        if found.node is not None and record.node_id != found.node and (
                found.node in record.avoid_nodes or record.node_id is not None):
            # A move (a drain's, a node loss's, a job admitted as one): keeping the unit would keep the game on
            # the node it must leave, and the drain would never end. The failure goes the usual way: stopped,
            # and undrain starts it again on its node. (A node the game once left and is pinned to again, back
            # there after another move, stays in avoid_nodes: a unit there is no move, as the planner says.)
            return None
        if record.converged:
            log.error("the engine's unit is no longer the one the settings make, and replacing it failed before "
                      "it was touched: %s; the running engine is kept, and the replacement tried again in %gs",
                      exc.message, self.settings.runtime.resync_interval,
                      extra={"game_id": record.game_id, "error_code": exc.code.value})
            return requeue(self.settings.runtime.resync_interval, "a drift whose replacement failed untouched")
        base = record.replace(desired_image_ref=record.current_image_ref)
        revision = next((rev for rev in range(record.spec_revision,
                                              max(-1, record.spec_revision - REVISIONS_BACK - 1), -1)
                         if found.spec_hash == self.specs.want_hash(base.replace(spec_revision=rev))), None)
        if revision is None:
            return None  # not an engine this record's settings make: the failure goes the usual way
        await self._fail(record, exc.code, exc.message, kept_revision=revision)
        return AGAIN

    async def _stopping(self, record: RuntimeRecord, unit: ObservedContainer, grace: float) -> RuntimeRecord | Step:
        """Before a unit of the game is asked to stop: written (``Starts.mark``), so that the gateway's
        pass-through (every replica's, from the record) sends the record's engine nothing more while it saves
        its state. A stop of that unit already begun less than its grace (and STOP_SLACK) ago (a predecessor's,
        in its grace when this leader took over; or this one's, whose call timed out) is waited for, not
        signalled again: a second SIGTERM lands in the middle of the engine's save. The step to wait, then."""
        left = transitions.stop_left(record, self.clock.now(), grace, unit.id)
        if left > 0 and unit.running:
            log.info("a stop of unit %s begun %s is under way: waiting %.0fs for its grace, not signalling it "
                     "again", unit.id[:12], record.stopping_since.isoformat() if record.stopping_since else "?",
                     left, extra={"game_id": record.game_id})
            return requeue(min(left, DISRUPTION_POLL * 5), "a stop of the engine is under way")
        return await self.starts.mark(record, unit.id, grace)  # marked again at each signal: each has its grace

    async def _stop_over(self, record: RuntimeRecord, unit: ObservedContainer | None) -> RuntimeRecord | Step:
        """An up game wanted running whose record marks a stop of its engine (one whose call raised, then a
        start; or a predecessor's, in its grace when it died): before the running engine is recorded right or
        asked for a turn, that stop is waited out (its exit is then a start's business, not a crash), and then
        the mark cleared (the pass-through open again). The step to wait, or the record."""
        if (not record.status.is_up or unit is None or unit.id != record.current_container_id
                or transitions.stop_mark_of(record, unit.id) is None):
            return record  # no mark, or one of another unit (a replacement's new unit that failed)
        left = transitions.stop_left(record, self.clock.now(), await self.starts.stop_grace(record, unit), unit.id)
        if left > 0 and unit.running:
            return requeue(min(left, DISRUPTION_POLL * 5), "a stop of the engine may still be under way")
        return await self.store.clear_stopping(record)

    async def _stopped_later(self, record: RuntimeRecord, unit: ObservedContainer) -> Step | None:
        """The cleanup TTL counts from the engine's own stop when it is later than the record's (a database
        restored from an older backup, whose game was started and stopped again on the same container since):
        a removal for good waits until the TTL has passed from that stop too. None when it has."""
        found = await self.backend.inspect(unit.id)
        finished = found.finished_at if found is not None else None
        now = self.clock.now()
        # Within CLOCK_SKEW of the record's stop it is that stop (the daemon's clock is not the database's);
        # a time ahead of now is a clock not to be trusted.
        if (finished is None or record.stopped_at is None or finished <= record.stopped_at + CLOCK_SKEW
                or finished > now + CLOCK_SKEW):
            return None
        left = self.settings.runtime.cleanup_ttl - (now - finished).total_seconds()
        if left <= 0:
            return None
        log.warning("not removing yet: the engine stopped at %s, later than the record says (%s; a database "
                    "restored from an older backup?); the cleanup TTL counts from the later stop",
                    finished.isoformat(), record.stopped_at.isoformat(), extra={"game_id": record.game_id})
        return requeue(min(left, self.settings.runtime.resync_interval), "the engine stopped later than recorded")

    async def _renamed(self, record: RuntimeRecord) -> ObservedContainer | None:
        """No unit of the game has its name: the unit the record names, when it is still there under another
        name (renamed from outside) and is this instance's unit of this game. It is the game's engine: creating
        another would make two engines of one game, on one state directory and one network alias; stopping
        or replacing it goes by its id."""
        assert record.current_container_id
        found = await self.backend.inspect(record.current_container_id)
        if found is None or not found.unit_of(self.settings.leadership.instance, record.game_id):
            return None
        if found.id not in self._renames_told:
            self._renames_told.add(found.id)
            log.warning("the game's unit was renamed to %s from outside; it is still the game's engine (rename it "
                        "back to %s)", found.name, container_name(record.game_id),
                        extra={"game_id": record.game_id, "container_id": found.id})
        return found

    def _runs_replaced(self, record: RuntimeRecord, unit: ObservedContainer | None) -> bool:
        """Whether ``unit`` is an engine of the image a replacement under way replaces (started again by a
        rollback, or by a job that asked for it), by its spec hash: the image a Swarm service shows has no
        digest, and an image name alone may be another's with a digest. At the record's spec revision or one
        of the few before it: a restart or a drain's move since (a new revision) does not make that engine
        another image's."""
        replaced = storage.replaced_image(record)
        if unit is None or replaced is None or not record.desired_image_ref:
            return False
        base = record.replace(desired_image_ref=replaced)
        return any(unit.spec_hash == self.specs.want_hash(base.replace(spec_revision=rev))
                   for rev in range(record.spec_revision, max(-1, record.spec_revision - REVISIONS_BACK - 1), -1))

    def _note_control(self, game_id: str, claimed: list[Claimed]) -> None:
        """A claim found a pause, a resume or a reconcile, or nothing (what a predecessor claimed): the turn
        step looks for them (``_control_due``), until it has answered them."""
        if not claimed or any(c.op in transitions.ANSWERED_DURING_TURN for c in claimed):
            self._control_due.add(game_id)

    def _observe_claimed(self, claimed: list[Claimed]) -> None:
        now = self.clock.now()
        for c in claimed:
            self.metrics.phase.labels("queued").observe((now - c.accepted_at).total_seconds())

    async def _check_engine(self, record: RuntimeRecord, container: ObservedContainer, action: Action,
                            lost: frozenset[str]) -> tuple[Action | Step, RuntimeRecord]:
        """Right before a planned disruption: the action to carry out now (with the record as it is now),
        or the step that waits for the engine's turn (or plans again, when what the engine said changed
        the record)."""
        if action.kind is ActionKind.RECREATE and container.id != record.current_container_id:
            return await self._check_unnamed(record, container, action), record
        looked, seen = await self.turns.engine_generating(record, container, overdue=action.overdue is not None)
        if looked is Look.IDLE:
            # It has just said it is not generating, and that answer was written: plan on the written record
            # and carry out the disruption it still asks for without asking again. Asking again would let an
            # engine whose status flips between generating and idle hold the disruption for ever, each
            # "generating" starting the wait anew.
            again = self.plan_only(seen, container, lost)
            kind = again.then if again.kind is ActionKind.WAIT and again.then is not None else again.kind
            if kind in DISRUPTIONS:
                return Action(kind, f"{again.reason}; the engine says it is not generating"), seen
            return AGAIN, seen
        return await self._check_look(record, looked, action), record

    async def _check_unnamed(self, record: RuntimeRecord, container: ObservedContainer,
                             action: Action) -> Action | Step:
        """A replacement of a unit the record does not name (planner ``planned_disruption``): while its engine
        says it generates a turn, it waits, up to RTMANAGER_DISRUPTION_WAIT (or the generation's own
        deadline) from the first look that found it so (written on the record, kept across restarts)."""
        if not await self.turns.unit_generating(record, container):
            return action
        now = self.clock.now()
        if record.disruption_wait_since is None:
            try:
                record = await self.store.note_disruption_wait(record)
            except Conflict:
                return AGAIN
        since = record.disruption_wait_since or now
        waited = max(0.0, (now - since).total_seconds())
        if disruption_wait_left(record, now, disruption_wait=self.settings.runtime.disruption_wait,
                                waited=waited) > 0:
            log.info("the engine of unit %s, which the record does not name, is generating a turn: its "
                     "replacement waits", container.id[:12], extra={"game_id": record.game_id})
            return requeue(DISRUPTION_POLL, "the engine generates a turn; its replacement waits")
        return Action(action.kind, f"{action.reason}; the engine still generates a turn after {waited:.0f}s "
                                   f"(RTMANAGER_DISRUPTION_WAIT): going ahead anyway", overdue=waited)

    async def _check_look(self, record: RuntimeRecord, looked: Look, action: Action) -> Action | Step:
        if action.overdue is not None and action.kind is not ActionKind.WAIT:
            # Its wait ran out: it goes ahead, generating or not, unless what the engine said changed the record
            # (a generation begun since the wait began: plan again, on its own wait).
            return action if looked in (Look.GO, Look.UNKNOWN, Look.GENERATING) else AGAIN
        if looked in (Look.GENERATING, Look.UNKNOWN) and action.kind is ActionKind.WAIT:
            return requeue(action.delay, action.reason)
        if looked is Look.GENERATING and not record.status.is_up:
            # The record does not know the engine as up (a replacement cut half-way, a node that
            # came back after its game was stopped): the wait is bounded by the oldest pending
            # job's age, or, with no job (the controller's own stop), by the first look that found
            # the engine generating (written by that look, kept across restarts).
            now = self.clock.now()
            age = await self.store.oldest_pending_age(record.game_id) or 0.0
            if record.disruption_wait_since is not None:
                age = max(age, (now - record.disruption_wait_since).total_seconds())
            if disruption_wait_left(record, now, disruption_wait=self.settings.runtime.disruption_wait,
                                    waited=age) > 0:
                return requeue(DISRUPTION_POLL, "the engine generates a turn; the disruption waits")
            looked = Look.GO
        if looked not in (Look.GO, Look.UNKNOWN):
            return AGAIN  # what the engine said changed the record: plan again
        if action.kind is ActionKind.WAIT and action.then is not None:
            # The record still says generating, but the engine does not (or it no longer
            # answers at all): that is not generating, the disruption goes ahead.
            return Action(action.then, "the engine does not say it generates a turn")
        return action

    # ---------------------------------------------------------------- actions
    async def _act(self, kind: ActionKind, record: RuntimeRecord | None, container: ObservedContainer | None,
                   spec: ContainerSpec | None, node: str = "", *, reason: str = "") -> Step:
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a backend action")
        assert record is not None
        if kind in (ActionKind.STOP, ActionKind.REMOVE) or (kind is ActionKind.CLEANUP and container is not None):
            assert container is not None
            grace = await self.starts.stop_grace(record, container)  # the engine's version's, or the global one
        if kind is ActionKind.BLOCKED:
            raise ContainerStartFailed(reason)  # whose unit holds the name (planner.held), before any side effect
        if kind in _RESTORING:
            assert spec is not None
            if (kind is ActionKind.RECREATE and record.rolling_back and container is not None
                    and container.id != record.current_container_id and self._runs_replaced(record, container)):
                # A job came during the rollback's health wait (a patch, a restart, a drain's move): the engine
                # it replaces is the rollback's, on its restored state, and what it wrote since is the state a
                # failure goes back to.
                record = await self.store.mark_rollback_overtaken(record, container_id=container.id)
            waited = await self.starts.run(kind, record, container, spec)
            if waited is not None:
                return waited
        elif kind is ActionKind.STOP:
            assert container is not None
            if record.status is Status.STOPPED and record.converged:
                # Started by hand, or the record is older than what ran (a database restored from a backup).
                log.warning("the engine runs although the record says stopped since %s; stopping it (after a "
                            "restore of the database, Lobby may have to send its start again)",
                            record.stopped_at.isoformat() if record.stopped_at else "?",
                            extra={"game_id": record.game_id, "container_id": container.id})
            stopping = await self._stopping(record, container, grace)
            if not isinstance(stopping, RuntimeRecord):
                return stopping
            record = stopping
            # SIGTERM, the grace, SIGKILL
            await self.starts.signal(record, container.id, self.backend.stop(container.id, grace))
            await self.states.restore_at_stop(record, self._runs_replaced(record, container))
            try:
                await self.store.mark_stopped(record, container_id=container.id, stopped_now=True)
            except Conflict:
                # A job came while the engine stopped (a start after the stop, say): the stop was
                # ours all the same, so record that nothing runs before planning for that job;
                # otherwise the exit reads as the running game's crash.
                await self.store.note_stopped(record.game_id, container_id=container.id)
                raise
        elif kind is ActionKind.MARK_STOPPED:
            await self.states.restore_at_stop(record, self._runs_replaced(record, container))
            await self.store.mark_stopped(record, container_id=container.id if container else None)
        elif kind is ActionKind.RECORD:
            over = await self._stop_over(record, container)
            if not isinstance(over, RuntimeRecord):
                return over
            record = over
            if not transitions.turn_reached(record):  # a turn asked for before the game finished
                return await self.turns.fail_turn(record, ErrorCode.INVALID_REQUEST,
                                                  f"the game finished at turn {record.turn}")
            await self.store.mark_converged(record)
        elif kind is ActionKind.RECOVER:
            assert container is not None
            return await self.crashes.recover(record, container)
        elif kind is ActionKind.CLEANUP:
            if container is not None:
                later = await self._stopped_later(record, container)
                if later is not None:
                    return later
                log.info("removing container stopped for longer than the cleanup TTL",
                         extra={"game_id": record.game_id, "container_id": container.id})
                await self.backend.remove(container.id, grace)
            else:  # removed before a kill cut the cleanup short (or a restore of the database undid its record)
                log.info("the container of a game stopped for longer than the cleanup TTL is gone: recording the "
                         "cleanup", extra={"game_id": record.game_id, "container_id": record.current_container_id})
            await self.store.cleaned_up(record.game_id, record.generation)
        elif kind is ActionKind.REMOVE:
            assert container is not None
            stopping = await self._stopping(record, container, grace)
            if not isinstance(stopping, RuntimeRecord):
                return stopping
            record = stopping
            await self.starts.signal(record, container.id, self.backend.remove(container.id, grace))
            # A removal during a replacement (Lobby's cancel: a stop, then a cleanup) keeps, for the
            # retention, the state the replaced engine left, as a stop does.
            await self.states.restore_at_stop(record, self._runs_replaced(record, container))
            await self.store.mark_removed(record)
        elif kind is ActionKind.MARK_REMOVED:
            # No unit (a removal cut after the unit went, or one removed from outside): what a removal
            # during a replacement owes the state directory is done here, as MARK_STOPPED does.
            await self.states.restore_at_stop(record, self._runs_replaced(record, container))
            await self.store.mark_removed(record)
        elif kind in (ActionKind.NODE_LOST, ActionKind.MOVE, ActionKind.LOST_STOP):
            return await self._node_loss(kind, record, node)
        elif kind is ActionKind.TURN:
            assert container is not None
            over = await self._stop_over(record, container)
            if not isinstance(over, RuntimeRecord):
                return over
            record = over
            return await self.turns.turn(record, container)
        return AGAIN

    async def _node_loss(self, kind: ActionKind, record: RuntimeRecord, node: str) -> Step:
        """The game's node is lost: record it (no crash is counted), or, after the grace period, move the
        game off it or stop it, as RTMANAGER_NODE_LOSS says (desired/policy.py)."""
        if kind is ActionKind.NODE_LOST:
            log.warning("the node %s of the engine is lost: not a crash; RTMANAGER_NODE_LOSS=%s after %gs",
                        node[:12], self.node_loss.mode.value, self.node_loss.grace, extra={"game_id": record.game_id})
            self.metrics.node_lost.inc()
            await self.store.record_node_loss(record, "lost", node=node)
        elif kind is ActionKind.MOVE:
            avoid = frozenset({node}) | (await self.starts.avoid() if self.starts.avoid is not None else frozenset())
            if not await self.backend.placeable(avoid):
                # Moving would remove the only unit and then find nowhere to start it: the game keeps its
                # unit and its pin, and waits (for its node, or for another node to be usable).
                log.warning("not moving the game off its lost node %s: no other node is usable", node[:12],
                            extra={"game_id": record.game_id})
                return requeue(NODE_LOSS_POLL, "no usable node to move the game to")
            log.warning("moving the game off its lost node %s", node[:12], extra={"game_id": record.game_id})
            await self.store.record_node_loss(record, "move", node=node)
        else:
            message = (f"stopped: its node {node[:12]} was lost for more than {self.node_loss.grace:g}s "
                       "(RTMANAGER_NODE_LOSS=stop)")
            log.warning("%s", message, extra={"game_id": record.game_id})
            await self.store.record_node_loss(record, "stop", node=node, message=message)
        return AGAIN

    async def _note_overdue(self, record: RuntimeRecord, action: Action) -> None:
        """The disruption waited RTMANAGER_DISRUPTION_WAIT for a generation and goes ahead anyway: the
        operation log says so, and so do the results of the jobs it answers."""
        waited = action.overdue or 0.0
        note = (f"the engine was still generating a turn after {waited:.0f}s "
                f"(RTMANAGER_DISRUPTION_WAIT {self.settings.runtime.disruption_wait:g}s); "
                f"{action.kind.value} went ahead and may have cut the turn")
        log.warning("%s", note, extra={"game_id": record.game_id, "action": action.kind.value})
        await self.store.note_disruption_overdue(record, action.kind.value, waited, note)

    # ---------------------------------------------------------------- failures
    async def _fail(self, record: RuntimeRecord, code: ErrorCode, message: str, *, answer_now: bool = False,
                    kept_revision: int | None = None) -> None:
        new = await self.store.fail_generation(record.game_id, record.generation, code, message,
                                               answer_now=answer_now, kept_revision=kept_revision)
        if new is None:
            return  # a newer generation took over meanwhile
        stopping = not answer_now and new.desired_status is DesiredStatus.STOPPED
        log.warning("generation %d failed: %s%s", record.generation, message,
                    f"; rolling back to {new.desired_image_ref}" if new.rolling_back else
                    "; answered once the engine is stopped" if stopping else "",
                    extra={"game_id": record.game_id, "error_code": code.value})

    async def fail_if_overdue(self, game_id: str, code: ErrorCode, message: str, timeout: float, *,
                              answer_only: bool = False, unplaced: bool = False) -> None:
        """A job must not wait forever for a failure that keeps coming back. ``answer_only`` (the game's node
        is lost): its jobs are answered with the failure, and desired state stays what they asked for. But a
        replacement not begun for want of a node (``unplaced``) of a game still running the image it ran fails
        as any failed replacement: back to that image (not carried out later, after Lobby heard it failed)."""
        try:
            age = await self.store.oldest_pending_age(game_id)
            if age is None or age < timeout:
                return
            record = await self.store.find(game_id)
            if record is None or record.converged:
                return
            if (record.stopping_since is not None and record.desired_status is DesiredStatus.RUNNING
                    and (record.status.is_up or record.status is Status.STARTING)):
                grace = await self.starts.stop_grace(record, None)
                # The first signal may have come after the job waited for a turn (the disruption wait, or a
                # drain's deadline, below): that wait, then one stop's grace, bound the job's age.
                held = timeout + self.settings.runtime.disruption_wait + grace + transitions.STOP_SLACK
                until = disruption_deadline(record)
                if (transitions.stop_left(record, self.clock.now(), grace, record.stopping_unit) > 0
                        and (age < held or (until is not None and self.clock.now() < until + timedelta(
                            seconds=grace + transitions.STOP_SLACK)))):
                    # A job waits out a stop or removal of the engine that may be under way (its grace and
                    # STOP_SLACK: _stop_over, start.run): that wait is not the job's delay, and failing it now
                    # would stop an engine that may be healthy. Once, not again at each removal that fails and
                    # marks anew: bounded by the job's age.
                    return
            until = disruption_deadline(record)  # a drain's stop or move waits until the drain's deadline
            if ((age < timeout + self.settings.runtime.disruption_wait
                 or (until is not None and self.clock.now() < until)) and record.status.is_up
                    and record.admin_api is not False
                    and any(op.op in _DISRUPTING_OPS for op in await self.store.pending_operations(game_id))):
                # A stop or replacement of a running engine may have waited for a turn first: that
                # wait is not the job's delay. (Nothing generates in a game that is not up.)
                return
            log.error("job waited %.0fs; failing it with %s", age, code.value, extra={"game_id": game_id})
            if answer_only and not (unplaced and rollback_target(record) is not None):
                await self.store.answer_overdue(record.game_id, record.generation, code,
                                                f"gave up waiting after {age:.0f}s: {message}")
                return
            await self._fail(record, code, f"gave up after {age:.0f}s: {message}", answer_now=True)
        except (StoreUnavailable, Conflict):
            pass
        except Exception:  # noqa: BLE001 - logged; the next failure tries again
            log.exception("could not fail an overdue job", extra={"game_id": game_id})
