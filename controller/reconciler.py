"""The reconciler: workers that take a game id from the work queue and converge it.

``sync(game_id)`` is sample-controller's syncHandler: it re-reads the record
and the unit every time, asks ``plan`` for one action, carries it out, and
writes what it observed through a named store transition. Then it looks again
(``MAX_STEPS`` at most) until the plan says NOOP. Results are written, with the
final status, in one transaction (desired/store.py); the relay publishes them.

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
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable

from controller.config import Settings
from controller.metrics import Metrics
from controller.planner import DISRUPTION_POLL, Action, ActionKind, plan
from controller.storage import StateKeeper
from controller.workqueue import ShutDown, WorkQueue
from desired import storage, transitions, versions
from desired.clock import Clock
from desired.errors import (
    Conflict,
    ContainerStartFailed,
    DockerUnavailable,
    EngineUnhealthy,
    ImageRejected,
    ImageUnavailable,
    PermanentError,
    RtmError,
    StorageFull,
    StoreUnavailable,
    TemporaryError,
)
from desired.leader import Fence, Fenced
from desired.model import DesiredStatus, ErrorCode, JobKind, RuntimeRecord, Status, container_name
from desired.policy import CrashPolicy
from desired.ports import ReconcilerStore
from desired.transitions import Probe
from desired.values import Crash
from observed.backend import RuntimeBackend
from observed.docker import ensure_state_dir
from observed.engine import EngineClient
from observed.errors import (
    BackendUnavailable,
    EngineConflict,
    EngineError,
    EngineRefused,
    EngineUnsupported,
    ImageMissing,
    ObservedError,
    Refused,
)
from observed.model import ContainerSpec, ObservedContainer
from observed.statedir import NoSpace

log = logging.getLogger("rtmanager.reconciler")

MAX_STEPS = 8
REFUSED_RETRY = 5.0  # seconds before a stop or removal the daemon refused is tried again
TURN_POLL = 0.5  # seconds between looks at an engine while a turn is generated
WAITING = object()  # an action that will look again later by itself
_RESTORING = (ActionKind.CREATE, ActionKind.START, ActionKind.RECREATE, ActionKind.CONFIRM)
_DISRUPTING_OPS = (JobKind.STOP, JobKind.RESTART, JobKind.PATCH, JobKind.CLEANUP)  # may wait for a generation first

# The one table from the backend's errors to the results' error codes.
BACKEND_ERRORS: dict[type[ObservedError], type[RtmError]] = {
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
def backend_errors():
    try:
        yield
    except ObservedError as exc:
        raise domain_error(exc) from exc


def build_spec(settings: Settings, record: RuntimeRecord, *, database: str = "", epoch: int = 0) -> ContainerSpec:
    assert record.desired_image_ref
    return ContainerSpec(
        name=container_name(record.game_id),
        image=record.desired_image_ref,
        game_id=record.game_id,
        instance=settings.instance,
        network=settings.docker_network,
        state_path=record.state_path,
        state_target=settings.engine_state_dir,
        env={
            "GAME_ID": record.game_id,
            "ENGINE_PORT": str(settings.engine_port),
            "ENGINE_STATE_DIR": settings.engine_state_dir,
        },
        memory_bytes=settings.engine_memory,
        nano_cpus=settings.engine_nano_cpus,
        pids_limit=settings.engine_pids,
        generation=record.generation,
        spec_revision=record.spec_revision,
        user=settings.engine_user,
        node=record.node_id,
        read_only=settings.engine_read_only,
        tmpfs_bytes=settings.engine_tmpfs,
        disk_bytes=settings.engine_disk,
        database=database,
        epoch=epoch,
    )


class Reconciler:
    def __init__(self, settings: Settings, store: ReconcilerStore, backend: RuntimeBackend, engine: EngineClient,
                 metrics: Metrics, queue: WorkQueue, *, results_written: Callable[[], None],
                 fence: Fence | None = None, clock: Clock | None = None, database: str = "") -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        self.queue = queue
        self._results_written = results_written
        self.fence = fence
        self.clock = clock or store.clock
        self.database = database  # the identity uid of the database, on every unit's labels
        self.crash_policy = CrashPolicy(limit=settings.crash_limit, window=settings.crash_window,
                                        backoff_max=settings.crash_backoff_max)
        self.dispose_budget = settings.max_removals  # refilled by the resync, once per interval
        self._budget_refilled_at = time.monotonic()
        self.unowned: dict[str, str] = {}  # container id -> name, reported once each
        self.states = StateKeeper(settings, metrics)  # state directories: copies, restores, room
        self._hashes: dict[tuple, str] = {}

    @property
    def epoch(self) -> int:
        return self.fence.epoch if self.fence is not None else 1

    def refill_dispose_budget(self) -> None:
        """At most once per resync interval, however many resyncs run (events reconnecting force some)."""
        now = time.monotonic()
        if now - self._budget_refilled_at >= self.settings.resync_interval:
            self.dispose_budget = self.settings.max_removals
            self._budget_refilled_at = now

    def want_hash(self, record: RuntimeRecord) -> str | None:
        """The spec hash a record's container should carry; cached, since a resync asks for every game
        and the spec changes only with the image, the state path or the spec revision."""
        if not record.desired_image_ref:
            return None
        key = (record.game_id, record.desired_image_ref, record.state_path, record.spec_revision)
        found = self._hashes.get(key)
        if found is None:
            if len(self._hashes) > 200_000:
                self._hashes.clear()
            found = self._hashes[key] = build_spec(self.settings, record).spec_hash
        return found

    def plan_for(self, record: RuntimeRecord | None, container: ObservedContainer | None
                 ) -> tuple[Action, ContainerSpec | None]:
        spec = (build_spec(self.settings, record, database=self.database, epoch=self.epoch)
                if record and record.desired_image_ref else None)
        return self.plan_only(record, container), spec

    def plan_only(self, record: RuntimeRecord | None, container: ObservedContainer | None) -> Action:
        return plan(record, container, want_hash=self.want_hash(record) if record else None,
                      instance=self.settings.instance, now=self.clock.now(),
                      orphan_grace=self.settings.orphan_grace, cleanup_ttl=self.settings.cleanup_ttl,
                      database=self.database, epoch=self.epoch,
                      unreachable_restart_after=self.settings.unreachable_restart_after,
                      disruption_wait=self.settings.disruption_wait)

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
                await self.fail_if_overdue(str(key), code, exc.message, self.settings.job_timeout)
            except Exception as exc:  # noqa: BLE001 - never leave a game stuck silently
                delay = self.queue.add_rate_limited(key)
                self.metrics.queue_retries.inc()
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile failed unexpectedly, retrying in %.1fs", delay, extra={"game_id": key})
                # Neither an outage nor a conflict: a waiting job is answered once its start timeout
                # has passed, instead of waiting for the job timeout.
                await self.fail_if_overdue(str(key), ErrorCode.CONTAINER_START_FAILED,
                                           f"{exc.__class__.__name__}: {exc}", self.settings.start_timeout)
            finally:
                self.queue.done(key)

    async def sync(self, game_id: str) -> None:
        for _ in range(MAX_STEPS):
            record = await self.store.find(game_id)
            with backend_errors():
                container = await self.backend.inspect(container_name(game_id))
            action, spec = self.plan_for(record, container)
            if action.kind is ActionKind.NOOP:
                return
            if action.kind is ActionKind.UNOWNED:
                assert container is not None
                self.note_unowned(container, action.reason)
                return
            if action.check_engine and not self.settings.dry_run:
                # A planned disruption: the record's last probe may be stale, ask the engine now.
                assert record is not None and container is not None
                looked = await self._engine_generating(record, container)
                if looked in ("generating", "unknown") and action.kind is ActionKind.WAIT:
                    self.queue.add_after(game_id, max(action.delay, 0.05))
                    return
                if looked == "generating" and not record.status.is_up:
                    # The record does not know the engine as up (a replacement cut half-way), so no
                    # wait began on it to bound this one: the oldest pending job's age bounds it.
                    age = await self.store.oldest_pending_age(game_id) or 0.0
                    if age < self.settings.disruption_wait:
                        self.queue.add_after(game_id, DISRUPTION_POLL)
                        return
                    looked = "go"
                if looked not in ("go", "unknown"):
                    continue  # what the engine said changed the record: plan again
                if action.kind is ActionKind.WAIT and action.then is not None:
                    # The record still says generating, but the engine does not (or it no longer
                    # answers at all): that is not generating, the disruption goes ahead.
                    action = Action(action.then, "the engine does not say it generates a turn")
            if action.kind is ActionKind.WAIT:
                self.queue.add_after(game_id, max(action.delay, 0.05))
                return
            if self.settings.dry_run:
                log.info("dry run: would %s: %s", action.kind.value, action.reason,
                         extra={"game_id": game_id, "action": action.kind.value, "dry_run": True})
                return
            if action.kind is ActionKind.CLEANUP:
                # Removals nobody asked for (the cleanup TTL) are rationed: a wrong
                # database or clock must not empty the host in one go.
                if self.dispose_budget <= 0:
                    log.warning("not removing %s: the removal budget of this resync interval is spent",
                                container_name(game_id), extra={"game_id": game_id})
                    self.queue.add_after(game_id, self.settings.resync_interval)
                    return
                self.dispose_budget -= 1
            op_ids: list[int] = []
            if record is not None and not record.converged:
                for op_id, accepted in await self.store.claim(game_id, record.generation):
                    op_ids.append(op_id)
                    self.metrics.phase.labels("queued").observe((self.clock.now() - accepted).total_seconds())
            log.info("%s: %s", action.kind.value, action.reason, extra={
                "game_id": game_id, "action": action.kind.value, "operation_ids": ",".join(map(str, op_ids)),
                "generation": record.generation if record else None})
            if action.overdue is not None and record is not None:
                await self._note_overdue(record, action)
            started = asyncio.get_running_loop().time()
            result = "ok"
            try:
                # A container that is not ours only ever blocks the name: act as if there were none.
                ours = container if container is not None and container.managed_by(self.settings.instance) else None
                with backend_errors():
                    if await self._act(action.kind, record, ours, spec) is WAITING:
                        return  # comes back later by itself (add_after)
            except PermanentError as exc:
                result = "failed"
                assert record is not None
                if record.converged and action.kind in _RESTORING and not isinstance(exc, ImageRejected):
                    # Nobody asked for this start: the controller was bringing back a game that
                    # crashed or vanished. It counts as one more crash, with backoff and a limit.
                    await self._count_crash(record, Crash(code=exc.code, detail=exc.message, container_id=None))
                else:
                    await self._fail(record, exc.code, exc.message)
                    if record.desired_status is not DesiredStatus.RUNNING:
                        # A stop or removal the daemon refuses: answered; try again later, not in
                        # a loop of new generations.
                        self.queue.add_after(game_id, REFUSED_RETRY)
                        return
            except Conflict as exc:
                result = "conflict"
                log.info("record changed under us, looking again: %s", exc, extra={"game_id": game_id})
            except BaseException:
                result = "error"
                raise
            finally:
                self.metrics.reconciles.labels(action.kind.value, result).inc()
                self.metrics.reconcile_seconds.labels(action.kind.value).observe(
                    asyncio.get_running_loop().time() - started)
        log.warning("did not converge within %d steps; will look again", MAX_STEPS, extra={"game_id": game_id})
        self.queue.add_after(game_id, 1.0)

    # ---------------------------------------------------------------- actions
    async def _act(self, kind: ActionKind, record: RuntimeRecord | None, container: ObservedContainer | None,
                   spec: ContainerSpec | None) -> object:
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a backend action")
        assert record is not None
        if kind in (ActionKind.STOP, ActionKind.REMOVE, ActionKind.CLEANUP):
            assert container is not None
            grace = await self._stop_grace(record, container)  # the engine's version's, or the global one
        if kind is ActionKind.BLOCKED:
            raise ContainerStartFailed(f"the name {container_name(record.game_id)} is held by a container "
                                       "rtmanager does not manage")
        if kind in _RESTORING:
            assert spec is not None
            await self._run(kind, record, container, spec)
        elif kind is ActionKind.STOP:
            assert container is not None
            await self.backend.stop(container.id, grace)  # SIGTERM, the grace, then SIGKILL
            try:
                await self.store.mark_stopped(record, container_id=container.id)
            except Conflict:
                # A job came while the engine stopped (a start after the stop, say): the stop was
                # ours all the same, so record that nothing runs before planning for that job;
                # otherwise the exit reads as the running game's crash.
                await self.store.note_stopped(record.game_id, container_id=container.id)
                raise
            self._results_written()
        elif kind is ActionKind.MARK_STOPPED:
            await self.store.mark_stopped(record, container_id=container.id if container else None)
            self._results_written()
        elif kind is ActionKind.RECORD:
            if not transitions.turn_reached(record):  # a turn asked for before the game finished
                await self._fail_turn(record, ErrorCode.INVALID_REQUEST, f"the game finished at turn {record.turn}")
            else:
                await self.store.mark_converged(record)
                self._results_written()
        elif kind is ActionKind.RECOVER:
            assert container is not None
            return await self._recover(record, container)
        elif kind is ActionKind.REMOVE:
            assert container is not None
            await self.backend.remove(container.id, grace)
            await self.store.mark_removed(record)
            self._results_written()
        elif kind is ActionKind.CLEANUP:
            assert container is not None
            log.info("removing container stopped for longer than the cleanup TTL",
                     extra={"game_id": record.game_id, "container_id": container.id})
            await self.backend.remove(container.id, grace)
            await self.store.cleaned_up(record.game_id, record.generation)
        elif kind is ActionKind.MARK_REMOVED:
            await self.store.mark_removed(record)
            self._results_written()
        elif kind is ActionKind.TURN:
            assert container is not None
            return await self._turn(record, container)
        return None

    async def _run(self, kind: ActionKind, record: RuntimeRecord, container: ObservedContainer | None,
                   spec: ContainerSpec) -> None:
        # The allowlist holds at every start, not only when a job is accepted: restarts, crash
        # recoveries and spec changes reuse a stored image the operator may have banned since.
        if kind is not ActionKind.CONFIRM:
            if not self.settings.image_allowlist.allows(spec.image):
                raise ImageRejected(f"image {spec.image} is no longer allowed by RTMANAGER_IMAGE_ALLOWLIST")
            if self.settings.version_policy == "registry":
                refusal = versions.refuse_run(await self.store.engine_version_of(spec.image), spec.image)
                if refusal is not None:
                    raise ImageRejected(refusal)
        if kind is ActionKind.RECREATE:
            await self.backend.ensure_image(spec.image)  # pull before taking the running game down
        confirming_up = kind is ActionKind.CONFIRM and record.status.is_up and container is not None \
            and record.current_container_id == container.id
        if record.status is not Status.STARTING and not confirming_up:
            # A job replacing a running engine: remember what it ran, to start it again on failure.
            rollback = (record.current_image_ref if record.status.is_up and not record.converged
                        and not record.rolling_back else None)
            record = await self.store.mark_starting(record, rollback_image=rollback)
        if kind is ActionKind.RECREATE and container is not None:
            await self.backend.remove(container.id, await self._stop_grace(record, container))  # SIGTERM first
            container = None
        if container is None:
            entry = await self.store.engine_version_of(spec.image)
            if entry is not None and entry.stop_grace is not None:  # a Swarm service keeps it from its creation
                spec = dataclasses.replace(spec, stop_grace=float(entry.stop_grace))
            # A rollback: the old image starts on the state the old engine left (and a restore a
            # kill cut short is finished first, whatever is asked now).
            await self.states.restore(record)
            if storage.needs_backup(record, spec.image):
                # Another image replaces the running engine (stopped by now): keep what it left.
                await self.states.backup(record)
            elif not record.rolling_back:
                await self.states.check_room(record)  # a new game's directory needs room
            await self.backend.ensure_image(spec.image)
            await self.backend.prepare()
            await asyncio.to_thread(ensure_state_dir, self.settings.state_root, record.state_path,
                                    *_ids(self.settings.engine_user))
            # A new secret for each unit, recorded before the unit exists: a kill between the create
            # and the next write must not leave a unit whose token nobody knows.
            token = secrets.token_urlsafe(32)
            record = await self.store.set_admin_token(record, token)
            spec = dataclasses.replace(spec, admin_token=token)
            t0 = asyncio.get_running_loop().time()
            container = await self.backend.create(spec)
            self.metrics.phase.labels("container_created").observe(asyncio.get_running_loop().time() - t0)
            if container.spec_hash != spec.spec_hash or not container.managed_by(self.settings.instance):
                return  # adopted a container from an older attempt: plan again from what it is
        if container.admin_token is not None and container.admin_token != record.admin_token:
            # A unit that existed already (the create found one an earlier attempt made, or the record
            # does not know it: a restored database) runs with the token it was created with: record it.
            log.info("recording the admin token the unit %s was created with", container.id[:12],
                     extra={"game_id": record.game_id, "container_id": container.id})
            record = await self.store.set_admin_token(record, container.admin_token)
        if not container.running:
            await self.backend.start(container.id)
        await self._confirm(record, container.id, spec)

    async def _confirm(self, record: RuntimeRecord, container_id: str, spec: ContainerSpec) -> None:
        """Wait for the engine's health path, then record the game as running."""
        loop = asyncio.get_running_loop()
        last_look = [loop.time()]
        exited: list[ObservedContainer] = []

        async def still_running() -> bool:
            if loop.time() - last_look[0] < 0.5:
                return True
            last_look[0] = loop.time()
            seen = await self.backend.inspect(container_id)
            if seen is None or not seen.running:
                if seen is not None:
                    exited.append(seen)
                return False
            return True

        seen = await self.backend.inspect(container_id)
        if seen is None:
            raise ContainerStartFailed("the container disappeared right after start")
        if not seen.running:
            await self._raise_exited(seen)
        host = self._probe_host(record.game_id, seen.address)
        t0 = loop.time()
        ok, detail = await self.engine.wait_healthy(host, self.settings.start_timeout, still_running)
        self.metrics.probes.labels("healthy" if ok else "unhealthy").inc()
        if ok:
            # The answer came from the address this unit had: make sure it is still this unit's (a
            # daemon may hand a dead container's IP to the next one at once).
            again = await self.backend.inspect(container_id)
            if again is None or not again.running or again.address != seen.address:
                if again is not None and not again.running:
                    await self._raise_exited(again)
                raise ContainerStartFailed("the engine's container stopped or moved while it was probed")
        if not ok:
            if exited:
                await self._raise_exited(exited[-1])
            raise EngineUnhealthy(f"engine did not answer GET {self.settings.health_path} with 2xx within "
                                  f"{self.settings.start_timeout:g}s (last: {detail})")
        self.metrics.phase.labels("engine_healthy").observe(loop.time() - t0)
        probe = await self.probe(record, seen.address) if record.admin_api is not False else None
        s = self.settings
        await self.store.mark_running(record, container_id=container_id, image=spec.image,
                                      probe=probe if probe is not None and probe.healthy else None,
                                      unreachable_after=s.unreachable_after, generation_timeout=s.generation_timeout,
                                      node=seen.node)
        self._results_written()
        if storage.replacing(record):
            try:
                await self.states.drop(record.game_id)  # healthy: the copy of the replaced state is not needed
            except ObservedError as exc:  # converged all the same; the storage round deletes it later
                log.warning("could not delete the copy of the state directory: %s", exc.message,
                            extra={"game_id": record.game_id})

    # ------------------------------------------------------------------ turns
    async def _turn(self, record: RuntimeRecord, container: ObservedContainer) -> object:
        """Ask the engine for the turn desired state wants, level-triggered: look at the engine first,
        then ask for turn N+1 only when it is idle at N (its compare-and-swap on ``expected_turn``
        makes a repeated request harmless); poll while it generates."""
        host = self._probe_host(record.game_id, container.address)
        target = record.desired_turn or 0
        try:
            st = await self.engine.status(host, token=record.admin_token)
        except EngineUnsupported as exc:
            self.metrics.engine_calls.labels("status", "unsupported").inc()
            await self._fail_turn(record, ErrorCode.ENGINE_UNSUPPORTED, exc.message)
            return None
        except EngineRefused as exc:
            self.metrics.engine_calls.labels("status", "refused").inc()
            await self._fail_turn(record, ErrorCode.ENGINE_REFUSED, exc.message)
            return None
        except EngineError as exc:
            self.metrics.engine_calls.labels("status", "error").inc()
            if transitions.busy_generating(record, self.clock.now(), self.settings.generation_timeout):
                # A slow or timed-out poll of an engine generating the turn is not unreachable:
                # the health round and the generation timeout decide that (transitions.observed).
                self.queue.add_after(record.game_id, TURN_POLL)
                return WAITING
            age = await self.store.oldest_pending_age(record.game_id) or 0
            if record.status is Status.ENGINE_UNREACHABLE or age > self.settings.start_timeout:
                await self._fail_turn(record, ErrorCode.ENGINE_UNREACHABLE, exc.message)
                return None
            self.queue.add_after(record.game_id, TURN_POLL)
            return WAITING
        self.metrics.engine_calls.labels("status", "ok").inc()
        last = st.last_generation
        failed_turn = last.turn if last is not None and not last.ok else None
        asked_before = record.generation_started_at is not None
        probe = Probe(healthy=True, admin_api=True, turn=st.turn, phase=st.phase, failed_turn=failed_turn,
                      failed_error=last.error if failed_turn is not None and last is not None else "")
        if st.turn >= target:
            # Reached: the engine just answered, so the generation converges here, with its jobs.
            s = self.settings
            await self.store.mark_running(record, container_id=container.id, image=record.current_image_ref or "",
                                          probe=probe, unreachable_after=s.unreachable_after,
                                          generation_timeout=s.generation_timeout)
            self._note_generated(record, probe)
            self._results_written()
            return None
        record = await self._record_probe(record, probe)
        if st.phase == "generating":
            self.queue.add_after(record.game_id, TURN_POLL)
            return WAITING
        if st.phase == "finished":
            await self._fail_turn(record, ErrorCode.INVALID_REQUEST, f"the game finished at turn {st.turn}")
            return None
        if asked_before and failed_turn == st.turn + 1:
            self.metrics.turns.labels("failed").inc()
            await self._fail_turn(record, ErrorCode.GENERATION_FAILED,
                                  f"the engine failed to generate turn {failed_turn}: {last.error if last else ''}")
            return None
        if record.paused and not any(op.op is JobKind.FORCE_NEXT_TURN
                                     for op in await self.store.pending_operations(record.game_id)):
            # A pause accepted before the engine was asked: only a forced turn is generated paused
            # or not; a scheduled one is withdrawn (its job answered superseded, the pause success).
            log.info("paused before the engine was asked for turn %d: the scheduled turn is withdrawn", target,
                     extra={"game_id": record.game_id})
            try:
                await self.store.fail_turn(record, ErrorCode.SUPERSEDED,
                                           "the game was paused before the engine was asked for the turn")
            except Conflict:
                return None  # a newer job took over: plan again
            self._results_written()
            return None
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a turn request")
        try:
            started = await self.engine.request_turn(host, st.turn, token=record.admin_token)
        except EngineConflict:
            self.queue.add_after(record.game_id, TURN_POLL)  # busy, or its turn moved: look again
            return WAITING
        except EngineRefused as exc:
            self.metrics.engine_calls.labels("turns", "refused").inc()
            await self._fail_turn(record, ErrorCode.ENGINE_REFUSED, exc.message)
            return None
        except EngineError as exc:
            log.warning("turn request: %s", exc.message, extra={"game_id": record.game_id})
            self.queue.add_after(record.game_id, TURN_POLL)
            return WAITING
        self.metrics.engine_calls.labels("turns", "ok").inc()
        log.info("asked the engine for turn %d", st.turn + 1, extra={"game_id": record.game_id})
        if started:
            await self.store.turn_requested(record)
            self._results_written()  # generation_started
        self.queue.add_after(record.game_id, TURN_POLL)
        return WAITING

    async def _stop_grace(self, record: RuntimeRecord, container: ObservedContainer) -> float:
        """Seconds between SIGTERM and SIGKILL for the engine this unit runs: its registered version's
        ``stop_grace`` (whatever RTMANAGER_VERSION_POLICY), else RTMANAGER_STOP_GRACE."""
        image = record.current_image_ref if record.current_container_id == container.id else None
        image = image or container.image
        entry = await self.store.engine_version_of(image) if image else None
        return versions.stop_grace(entry, self.settings.stop_grace)

    async def _engine_generating(self, record: RuntimeRecord, container: ObservedContainer) -> str:
        """Right before a planned disruption: is the engine generating a turn? Its answer is recorded,
        with when the wait began (so that a restart of the controller does not reset the limit).
        ``generating``; ``changed``: the record changed, plan again; ``go``: disrupt it now. No answer,
        a garbage answer or no admin API is not generating: the disruption goes ahead."""
        if not container.running or not container.address:
            return "go"
        asking = record
        if container.admin_token and container.admin_token != record.admin_token:
            # The unit carries another token than the record (a restored database): ask with the
            # unit's own, or a refusal would read as "not generating" and cut the turn.
            asking = record.replace(admin_token=container.admin_token)
        probe = await self.probe(asking, container.address)
        s = self.settings
        try:
            if probe.healthy and probe.phase == "generating":
                log.info("the engine is generating turn %s: the disruption waits for it", (probe.turn or 0) + 1,
                         extra={"game_id": record.game_id})
                await self.store.record_observation(record, probe, unreachable_after=s.unreachable_after,
                                                    generation_timeout=s.generation_timeout, disruption_waits=True)
                self._results_written()  # a snapshot, when the status changed
                return "generating"
            if probe.healthy and await self._record_probe(record, probe) is not record:
                return "changed"
        except Conflict:
            return "changed"  # the record moved on meanwhile: plan again before disrupting anything
        if probe.healthy and probe.phase is None:
            # It answers its health path but not its status (busy, slow, refusing us, garbage): it
            # may be generating. Where the record says it was, the wait goes on (bounded).
            return "unknown"
        return "go"

    async def _note_overdue(self, record: RuntimeRecord, action: Action) -> None:
        """The disruption waited RTMANAGER_DISRUPTION_WAIT for a generation and goes ahead anyway: the
        operation log says so, and so do the results of the jobs it answers."""
        waited = action.overdue or 0.0
        note = (f"the engine was still generating a turn after {waited:.0f}s "
                f"(RTMANAGER_DISRUPTION_WAIT {self.settings.disruption_wait:g}s); {action.kind.value} went ahead "
                "and may have cut the turn")
        log.warning("%s", note, extra={"game_id": record.game_id, "action": action.kind.value})
        await self.store.note_disruption_overdue(record, action.kind.value, waited, note)

    async def _record_probe(self, record: RuntimeRecord, probe: Probe) -> RuntimeRecord:
        s = self.settings
        new = transitions.observed(record, self.clock.now(), probe, unreachable_after=s.unreachable_after,
                                   generation_timeout=s.generation_timeout)
        if new == record:
            return record
        self._note_generated(record, probe)
        written = await self.store.record_observation(record, probe, unreachable_after=s.unreachable_after,
                                                      generation_timeout=s.generation_timeout)
        self._results_written()  # a snapshot
        return written

    def _note_generated(self, record: RuntimeRecord, probe: Probe) -> None:
        if record.status is Status.GENERATION_IN_PROGRESS and probe.phase == "idle" and probe.turn is not None \
                and record.turn is not None and probe.turn > record.turn:
            self.metrics.turns.labels("generated").inc()
            if record.generation_started_at is not None:
                self.metrics.generation_seconds.observe((self.clock.now() - record.generation_started_at)
                                                        .total_seconds())

    async def _fail_turn(self, record: RuntimeRecord, code: ErrorCode, message: str) -> None:
        log.warning("turn failed: %s", message, extra={"game_id": record.game_id, "error_code": code.value})
        try:
            await self.store.fail_turn(record, code, message)
        except Conflict:
            return  # a newer job took over: it decides
        self._results_written()

    @staticmethod
    def _probe_host(game_id: str, address: str | None) -> str:
        return address or container_name(game_id)

    async def _exit_detail(self, seen: ObservedContainer, what: str, lines: int) -> tuple[str, str]:
        tail = await self.backend.logs_tail(seen.id, lines)
        detail = f"engine {what} with code {seen.exit_code}"
        if seen.oom_killed:
            detail += " (OOM-killed)"
        if tail:
            detail += f"; last log lines: {tail[-600:]}"
        return detail, tail

    async def _raise_exited(self, seen: ObservedContainer) -> None:
        detail, _ = await self._exit_detail(seen, "exited", 5)
        raise ContainerStartFailed(detail)

    async def probe(self, record: RuntimeRecord, address: str | None) -> Probe:
        """Ask a running engine how it is: its health path, then (when it has one) its admin status.
        ``address`` is the backend's (None: the unit does not run)."""
        if not address:
            return Probe(healthy=False)
        host = address
        if record.admin_api is not True:  # an engine known to have an admin API answers both at once
            ok, _ = await self.engine.check(host)
            self.metrics.probes.labels("healthy" if ok else "unreachable").inc()
            if not ok or record.admin_api is False:
                return Probe(healthy=ok)
        try:
            st = await self.engine.status(host, token=record.admin_token)
        except EngineUnsupported:
            self.metrics.engine_calls.labels("status", "unsupported").inc()
            return Probe(healthy=True, admin_api=False)
        except EngineRefused as exc:
            # It answers, so it is up; but not to us: a distinct error, neither a crash nor "no admin API".
            self.metrics.engine_calls.labels("status", "refused").inc()
            if record.last_error_code is not ErrorCode.ENGINE_REFUSED:
                log.error("engine refused rtmanager: %s", exc.message,
                          extra={"game_id": record.game_id, "error_code": ErrorCode.ENGINE_REFUSED.value})
            return Probe(healthy=True, refused=exc.message)
        except EngineError as exc:
            self.metrics.engine_calls.labels("status", "error").inc()
            log.info("engine status: %s", exc.message, extra={"game_id": record.game_id})
            if record.admin_api is True:  # the status did not answer: does the engine answer at all?
                ok, _ = await self.engine.check(host)
                self.metrics.probes.labels("healthy" if ok else "unreachable").inc()
                return Probe(healthy=ok)
            return Probe(healthy=True)
        if record.admin_api is True:
            self.metrics.probes.labels("healthy").inc()
        self.metrics.engine_calls.labels("status", "ok").inc()
        last = st.last_generation
        failed = last is not None and not last.ok
        return Probe(healthy=True, admin_api=True, turn=st.turn, phase=st.phase,
                     failed_turn=last.turn if failed else None, failed_error=last.error if failed else "")

    async def observe(self, record: RuntimeRecord, address: str | None) -> None:
        """One periodic look at a running engine; the record is written only when something changed."""
        probe = await self.probe(record, address)
        s = self.settings
        new = transitions.observed(record, self.clock.now(), probe, unreachable_after=s.unreachable_after,
                                   generation_timeout=s.generation_timeout)
        if new != record:
            if new.status is not record.status:
                log.warning("engine: %s -> %s", record.status.value, new.status.value,
                            extra={"game_id": record.game_id})
            try:
                await self.store.record_observation(record, probe, unreachable_after=s.unreachable_after,
                                                    generation_timeout=s.generation_timeout)
            except Conflict:
                pass  # the record moved on meanwhile; the next round looks again
            self._results_written()  # a snapshot
        if not address:
            self.queue.add(record.game_id)  # not running at all: let the reconciler look

    async def _recover(self, record: RuntimeRecord, container: ObservedContainer) -> object:
        """The engine of a running game exited on its own: record why, restart after a backoff.

        An engine stopped by a daemon restart did not crash: it starts again at once and does
        not count toward the crash limit (five daemon restarts must not give every game up)."""
        seen = await self.backend.inspect(container.id) or container
        if seen.running:  # not an exit: an engine that stopped answering for too long
            await self.backend.stop(seen.id, await self._stop_grace(record, seen))
            await self._count_crash(record, Crash(
                code=ErrorCode.ENGINE_UNREACHABLE, container_id=seen.id,
                detail=f"engine did not answer for more than {self.settings.unreachable_restart_after:g}s; "
                       "restarted"))
            return
        if await self.backend.stopped_by_daemon(seen):
            log.warning("engine stopped by a restart of the container daemon; starting it again (not a crash)",
                        extra={"game_id": record.game_id, "exit_code": seen.exit_code})
            self.metrics.daemon_restarts.inc()
            await self.store.mark_starting(record, rollback_image=None)
            return None
        detail, tail = await self._exit_detail(seen, "exited unexpectedly", 10)
        await self._count_crash(record, Crash(code=ErrorCode.CONTAINER_START_FAILED, detail=detail,
                                              container_id=container.id, exit_code=seen.exit_code,
                                              oom_killed=seen.oom_killed, log_tail=tail))

    async def _count_crash(self, record: RuntimeRecord, crash: Crash) -> None:
        """One more crash of a game nobody asked to change; the store applies the crash policy."""
        current = await self.store.find(record.game_id)  # the action may have moved its status
        if current is None or current.generation != record.generation:
            return  # a job changed the desired state meanwhile: plan again instead
        new, verdict = await self.store.record_crash(current, crash, self.crash_policy)
        if verdict.give_up:
            log.error("giving up after %d crashes", verdict.count,
                      extra={"game_id": record.game_id, "exit_code": crash.exit_code})
            self._results_written()
            return
        log.warning("engine crashed (%d in the window); restarting in %.1fs: %s", verdict.count, verdict.delay,
                    crash.detail, extra={"game_id": record.game_id, "exit_code": crash.exit_code,
                                         "oom_killed": crash.oom_killed})
        self.queue.add_after(record.game_id, verdict.delay)

    async def _fail(self, record: RuntimeRecord, code: ErrorCode, message: str, *, answer_now: bool = False) -> None:
        new = await self.store.fail_generation(record.game_id, record.generation, code, message,
                                               answer_now=answer_now)
        if new is None:
            return  # a newer generation took over meanwhile
        stopping = not answer_now and new.desired_status is DesiredStatus.STOPPED
        log.warning("generation %d failed: %s%s", record.generation, message,
                    f"; rolling back to {new.desired_image_ref}" if new.rolling_back else
                    "; answered once the engine is stopped" if stopping else "",
                    extra={"game_id": record.game_id, "error_code": code.value})
        self._results_written()

    async def fail_if_overdue(self, game_id: str, code: ErrorCode, message: str, timeout: float) -> None:
        """A job must not wait forever for a failure that keeps coming back."""
        try:
            age = await self.store.oldest_pending_age(game_id)
            if age is None or age < timeout:
                return
            record = await self.store.find(game_id)
            if record is None or record.converged:
                return
            if (age < timeout + self.settings.disruption_wait and record.status.is_up and record.admin_api is not False
                    and any(op.op in _DISRUPTING_OPS for op in await self.store.pending_operations(game_id))):
                # A stop or replacement of a running engine may have waited for a turn first: that
                # wait is not the job's delay. (Nothing generates in a game that is not up.)
                return
            log.error("job waited %.0fs; failing it with %s", age, code.value, extra={"game_id": game_id})
            await self._fail(record, code, f"gave up after {age:.0f}s: {message}", answer_now=True)
        except (StoreUnavailable, Conflict):
            pass
        except Exception:  # noqa: BLE001 - logged; the next failure tries again
            log.exception("could not fail an overdue job", extra={"game_id": game_id})


def _ids(user: str | None) -> tuple[int | None, int | None]:
    """(uid, gid) of RTMANAGER_ENGINE_USER, None where the image decides."""
    if not user:
        return None, None
    uid, _, gid = user.partition(":")
    return int(uid), int(gid) if gid else None
