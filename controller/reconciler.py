"""The reconciler: workers that take a game id from the work queue and converge it.

``sync(game_id)`` is sample-controller's syncHandler: it re-reads the record
and the container every time, asks ``plan`` for one action, carries it out, and
writes what it observed. Then it looks again (``MAX_STEPS`` at most) until the
plan says NOOP. Results are written, with the final status, in one transaction
(see desired/store.py); the relay publishes them.

Never hold a pooled Postgres connection across a Docker call or a probe: every
store call below acquires and releases its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from controller.config import Settings
from controller.metrics import Metrics
from controller.planner import ActionKind, plan
from controller.workqueue import ShutDown, WorkQueue
from desired.errors import (
    Conflict,
    ContainerStartFailed,
    EngineUnhealthy,
    ImageRejected,
    PermanentError,
    TemporaryError,
)
from desired.model import (
    ErrorCode,
    Health,
    OpKind,
    Outcome,
    RuntimeRecord,
    Status,
    container_name,
)
from desired.leader import Fence, Fenced
from desired.store import Finish, ReconcilerNote, StatusUpdate, Store
from observed.docker import DockerAdapter, ensure_state_dir
from observed.health import HealthProbe
from observed.model import ContainerSpec, ObservedContainer

log = logging.getLogger("rtmanager.reconciler")

MAX_STEPS = 6
CRASH_BACKOFF_BASE = 0.1  # seconds, doubled per crash like Docker's restart delay
_RESTORING = (ActionKind.CREATE, ActionKind.START, ActionKind.RECREATE, ActionKind.CONFIRM)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def build_spec(settings: Settings, record: RuntimeRecord) -> ContainerSpec:
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
    )


class Reconciler:
    def __init__(self, settings: Settings, store: Store, docker: DockerAdapter, probe: HealthProbe,
                 metrics: Metrics, queue: WorkQueue, results_written: Callable[[], None],
                 fence: Fence | None = None) -> None:
        self.settings = settings
        self.store = store
        self.docker = docker
        self.probe = probe
        self.metrics = metrics
        self.queue = queue
        self._results_written = results_written
        self.dispose_budget = settings.max_removals  # refilled by the resync, once per interval
        self._budget_refilled_at = time.monotonic()
        self.fence = fence

    def refill_dispose_budget(self) -> None:
        """At most once per resync interval, however many resyncs run (events reconnecting force some)."""
        now = time.monotonic()
        if now - self._budget_refilled_at >= self.settings.resync_interval:
            self.dispose_budget = self.settings.max_removals
            self._budget_refilled_at = now

    def plan_for(self, record: RuntimeRecord | None, container: ObservedContainer | None):
        spec = build_spec(self.settings, record) if record and record.desired_image_ref else None
        action = plan(record, container, want_hash=spec.spec_hash if spec else None,
                      instance=self.settings.instance, now=now_utc(), orphan_grace=self.settings.orphan_grace,
                      cleanup_ttl=self.settings.cleanup_ttl)
        return action, spec

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
            except TemporaryError as exc:
                delay = self.queue.add_rate_limited(key)
                self.metrics.queue_retries.inc()
                log.warning("temporary failure, retrying in %.1fs: %s", delay, exc.message,
                            extra={"game_id": key, "error_code": exc.code.value})
                await self._fail_if_overdue(str(key), exc.code, exc.message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.queue.add_rate_limited(key)
                self.metrics.queue_retries.inc()
                log.exception("reconcile failed unexpectedly, retrying in %.1fs", delay, extra={"game_id": key})
                # Whatever the cause, a waiting job gets an answer once it is overdue.
                await self._fail_if_overdue(str(key), ErrorCode.INTERNAL_ERROR, f"{exc.__class__.__name__}: {exc}")
            finally:
                self.queue.done(key)

    async def sync(self, game_id: str) -> None:
        for _ in range(MAX_STEPS):
            record = await self.store.find(game_id)
            container = await self.docker.inspect(container_name(game_id))
            action, spec = self.plan_for(record, container)
            if action.kind is ActionKind.NOOP:
                return
            if action.kind is ActionKind.WAIT:
                self.queue.add_after(game_id, max(action.delay, 0.05))
                return
            if self.settings.dry_run:
                log.info("dry run: would %s: %s", action.kind.value, action.reason,
                         extra={"game_id": game_id, "action": action.kind.value, "dry_run": True})
                return
            if action.kind in (ActionKind.DISPOSE, ActionKind.CLEANUP):
                # Removals nobody asked for (orphans, the cleanup TTL) are rationed: a wrong
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
                    self.metrics.phase.labels("queued").observe((now_utc() - accepted).total_seconds())
            log.info("%s: %s", action.kind.value, action.reason, extra={
                "game_id": game_id, "action": action.kind.value, "operation_ids": ",".join(map(str, op_ids)),
                "generation": record.generation if record else None})
            started = asyncio.get_running_loop().time()
            result = "ok"
            try:
                # A container that is not ours only ever blocks the name: act as if there were none.
                ours = container if container is not None and container.managed_by(self.settings.instance) else None
                await self._act(action.kind, record, ours, spec)
            except PermanentError as exc:
                result = "failed"
                assert record is not None
                if record.converged and action.kind in _RESTORING and not isinstance(exc, ImageRejected):
                    # Nobody asked for this start: the controller was bringing back a game that
                    # crashed or vanished. It counts as one more crash, with backoff and a limit.
                    await self._count_crash(record, exc.message, exc.code, None)
                else:
                    await self._give_up(record, exc)
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
                   spec: ContainerSpec | None) -> None:
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a Docker action")
        if kind is ActionKind.DISPOSE:
            assert container is not None
            log.warning("disposing orphan container %s", container.name, extra={"container_id": container.id})
            await self.docker.remove(container.id)
            return
        assert record is not None
        if kind is ActionKind.BLOCKED:
            raise ContainerStartFailed(f"the name {container_name(record.game_id)} is held by a container "
                                       "rtmanager does not manage")
        if kind in (ActionKind.CREATE, ActionKind.START, ActionKind.RECREATE, ActionKind.CONFIRM):
            assert spec is not None
            await self._run(kind, record, container, spec)
        elif kind is ActionKind.STOP:
            assert container is not None
            await self.docker.stop(container.id, self.settings.stop_grace)  # returns once it has exited
            await self._mark_stopped(record, container)
        elif kind is ActionKind.MARK_STOPPED:
            await self._mark_stopped(record, container)
        elif kind is ActionKind.RECOVER:
            assert container is not None
            await self._recover(record, container)
        elif kind in (ActionKind.REMOVE, ActionKind.CLEANUP):
            assert container is not None
            if kind is ActionKind.CLEANUP:
                log.info("removing container stopped for longer than the cleanup TTL",
                         extra={"game_id": record.game_id, "container_id": container.id})
            await self.docker.remove(container.id)
            if kind is ActionKind.REMOVE:
                await self._mark_removed(record, container.id)
            else:
                await self.store.cleaned_up(record.game_id, record.generation, now_utc())
        elif kind is ActionKind.MARK_REMOVED:
            await self._mark_removed(record, "")

    async def _run(self, kind: ActionKind, record: RuntimeRecord, container: ObservedContainer | None,
                   spec: ContainerSpec) -> None:
        # The allowlist holds at every start, not only when a job is accepted: restarts, crash
        # recoveries and spec changes reuse a stored image the operator may have banned since.
        if kind is not ActionKind.CONFIRM and not self.settings.image_allowlist.allows(spec.image):
            raise ImageRejected(f"image {spec.image} is no longer allowed by RTMANAGER_IMAGE_ALLOWLIST")
        if kind is ActionKind.RECREATE:
            await self.docker.ensure_image(spec.image)  # pull before taking the running game down
        if record.status is not Status.STARTING:
            record = await self.store.update_status(StatusUpdate(
                game_id=record.game_id, expected_status=record.status,
                expected_container_id=record.current_container_id, to=Status.STARTING, now=now_utc(),
                changes={"health": Health.UNKNOWN}))
        if kind is ActionKind.RECREATE and container is not None:
            await self.docker.remove(container.id)
            container = None
        if container is None:
            await self.docker.ensure_image(spec.image)
            await self.docker.ensure_network()
            await asyncio.to_thread(ensure_state_dir, self.settings.state_root, record.state_path,
                                    _uid(self.settings.engine_user))
            t0 = asyncio.get_running_loop().time()
            container = await self.docker.create(spec)
            self.metrics.phase.labels("container_created").observe(asyncio.get_running_loop().time() - t0)
            if container.spec_hash != spec.spec_hash or not container.managed_by(self.settings.instance):
                return  # adopted a container from an older attempt: plan again from what it is
        if not container.running:
            await self.docker.start(container.id)
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
            seen = await self.docker.inspect(container_id)
            if seen is None or not seen.running:
                if seen is not None:
                    exited.append(seen)
                return False
            return True

        seen = await self.docker.inspect(container_id)
        if seen is None:
            raise ContainerStartFailed("the container disappeared right after start")
        if not seen.running:
            await self._raise_exited(seen)
        host = seen.ip_address if (self.settings.probe_address == "ip" and seen.ip_address) else seen.name
        t0 = loop.time()
        ok, detail = await self.probe.wait_healthy(host, self.settings.start_timeout, still_running)
        self.metrics.probes.labels("healthy" if ok else "unhealthy").inc()
        if ok:
            self.metrics.phase.labels("engine_healthy").observe(loop.time() - t0)
        if not ok:
            if exited:
                await self._raise_exited(exited[-1])
            await self.docker.stop(container_id, self.settings.stop_grace)
            raise EngineUnhealthy(f"engine did not answer GET {self.settings.health_path} with 2xx within "
                                  f"{self.settings.start_timeout:g}s (last: {detail}); container stopped")
        await self.store.update_status(
            StatusUpdate(game_id=record.game_id, expected_status=Status.STARTING, expected_container_id=None,
                         to=Status.RUNNING, now=now_utc(), expected_generation=record.generation,
                         changes={"current_container_id": container_id, "current_image_ref": spec.image,
                                  "health": Health.HEALTHY, "observed_generation": record.generation,
                                  "health_checked_at": now_utc(), "restart_not_before": None}),
            finish=Finish(generation=record.generation, outcome=Outcome.SUCCESS))
        self._results_written()
        log.info("running and healthy", extra={"game_id": record.game_id, "container_id": container_id[:12]})

    async def _exit_detail(self, seen: ObservedContainer, what: str, lines: int) -> tuple[str, str]:
        """Why an engine stopped, for results and the record: exit code, OOM flag, last log lines."""
        tail = await self.docker.logs_tail(seen.id, lines)
        detail = f"engine {what} with code {seen.exit_code}"
        if seen.oom_killed:
            detail += " (OOM-killed)"
        if tail:
            detail += f"; last log lines: {tail[-600:]}"
        return detail, tail

    async def _raise_exited(self, seen: ObservedContainer) -> None:
        detail, _ = await self._exit_detail(seen, "exited", 5)
        raise ContainerStartFailed(detail)

    async def probe_health(self, record: RuntimeRecord, ip: str | None) -> None:
        """One periodic probe of a running engine; the record changes only when health does."""
        host = ip if (self.settings.probe_address == "ip" and ip) else container_name(record.game_id)
        ok, detail = await self.probe.check(host) if (ip or self.settings.probe_address != "ip") else (
            False, "container not running")
        self.metrics.probes.labels("healthy" if ok else "unreachable").inc()
        health = Health.HEALTHY if ok else Health.UNREACHABLE
        if health is record.health:
            return
        log.warning("engine health: %s -> %s (%s)", record.health.value, health.value, detail,
                    extra={"game_id": record.game_id})
        try:
            await self.store.update_status(StatusUpdate(
                game_id=record.game_id, expected_status=Status.RUNNING,
                expected_container_id=record.current_container_id, to=Status.RUNNING, now=now_utc(),
                changes={"health": health, "health_checked_at": now_utc()}))
        except Conflict:
            pass  # the record moved on meanwhile; the next round looks again
        if not ip:
            self.queue.add(record.game_id)  # not running at all: let the reconciler look

    async def _recover(self, record: RuntimeRecord, container: ObservedContainer) -> None:
        """The engine of a running game exited on its own: record why, restart after a backoff."""
        seen = await self.docker.inspect(container.id) or container
        detail, tail = await self._exit_detail(seen, "exited unexpectedly", 10)
        await self._count_crash(record, detail, ErrorCode.CONTAINER_START_FAILED, container.id,
                                exit_code=seen.exit_code, oom_killed=seen.oom_killed, log_tail=tail)

    async def _count_crash(self, record: RuntimeRecord, detail: str, code: ErrorCode, container_id: str | None,
                           exit_code: int | None = None, oom_killed: bool = False, log_tail: str = "") -> None:
        """One more crash of a game nobody asked to change (an exit, or a failed restart after one).

        Crashes are counted while each comes within RTMANAGER_CRASH_WINDOW of the
        previous one; the RTMANAGER_CRASH_LIMIT-th is terminal (the game is given
        up and left stopped); before that the restart waits 0.1 s, doubling.
        """
        s = self.settings
        generation = record.generation
        record = await self.store.get(record.game_id)  # the action may have moved its status
        if record.generation != generation:
            return  # a job changed the desired state meanwhile: plan again instead
        now = now_utc()
        recent = record.last_crash_at is not None and (now - record.last_crash_at).total_seconds() < s.crash_window
        count = record.crash_count + 1 if recent else 1
        observed: dict = {"crash_count": count, "last_crash_at": now}
        if exit_code is not None:
            observed.update(last_exit_code=exit_code, last_oom_killed=oom_killed)
        params = {"event": "crash", "exit_code": exit_code, "oom_killed": oom_killed, "crash_count": count,
                  "log_tail": log_tail[-2000:], "container_id": container_id, "detail": detail[:1000]}
        if count >= s.crash_limit:
            message = f"crash loop: {count} crashes within {s.crash_window:g}s; last: {detail}"
            log.error("giving up after %d crashes", count, extra={"game_id": record.game_id, "exit_code": exit_code})
            await self.store.give_up(record.game_id, record.generation, code, message, now, container_id,
                                     observed=observed,
                                     note=ReconcilerNote(op=OpKind.RESTART, params=params, error_code=code,
                                                         message=message))
            self._results_written()
            return
        delay = min(CRASH_BACKOFF_BASE * 2 ** (count - 1), s.crash_backoff_max)
        log.warning("engine crashed (%d in the window); restarting in %.1fs: %s", count, delay, detail,
                    extra={"game_id": record.game_id, "exit_code": exit_code, "oom_killed": oom_killed})
        await self.store.update_status(
            StatusUpdate(game_id=record.game_id, expected_status=record.status, expected_container_id=None,
                         to=Status.STARTING, now=now, expected_generation=record.generation,
                         changes={**observed, "health": Health.UNREACHABLE,
                                  "restart_not_before": now + timedelta(seconds=delay),
                                  "last_error_code": code, "last_error_message": detail}),
            note=ReconcilerNote(op=OpKind.RESTART, params={**params, "restart_in": delay}))
        self.queue.add_after(record.game_id, delay)

    async def _mark_stopped(self, record: RuntimeRecord, container: ObservedContainer | None) -> None:
        container_id = container.id if container is not None else None
        await self.store.update_status(
            StatusUpdate(game_id=record.game_id, expected_status=record.status,
                         expected_container_id=record.current_container_id, to=Status.STOPPED, now=now_utc(),
                         expected_generation=record.generation,
                         changes={"current_container_id": container_id,
                                  "current_image_ref": record.current_image_ref or record.desired_image_ref,
                                  "health": Health.UNKNOWN, "observed_generation": record.generation}),
            finish=Finish(generation=record.generation, outcome=Outcome.SUCCESS, container_id=container_id or ""))
        self._results_written()

    async def _mark_removed(self, record: RuntimeRecord, container_id: str) -> None:
        await self.store.update_status(
            StatusUpdate(game_id=record.game_id, expected_status=record.status,
                         expected_container_id=record.current_container_id, to=Status.REMOVED, now=now_utc(),
                         expected_generation=record.generation,
                         changes={"health": Health.UNKNOWN, "observed_generation": record.generation}),
            finish=Finish(generation=record.generation, outcome=Outcome.SUCCESS, container_id=container_id))
        self._results_written()

    async def _give_up(self, record: RuntimeRecord, exc: PermanentError) -> None:
        log.warning("giving up on generation %d: %s", record.generation, exc.message,
                    extra={"game_id": record.game_id, "error_code": exc.code.value})
        seen = await self.docker.inspect(container_name(record.game_id))
        ours = seen is not None and seen.managed_by(self.settings.instance)
        if ours and seen.running:
            await self.docker.stop(seen.id, self.settings.stop_grace)
        new = await self.store.give_up(record.game_id, record.generation, exc.code, exc.message, now_utc(),
                                       seen.id if ours else None)
        if new is not None:
            self._results_written()

    async def _fail_if_overdue(self, game_id: str, code: ErrorCode, message: str) -> None:
        """A job must not wait forever for a Docker daemon that does not come back."""
        try:
            ops = await self.store.pending_operations(game_id)
            if not ops:
                return
            age = (now_utc() - ops[0].created_at).total_seconds()
            if age < self.settings.job_timeout:
                return
            record = await self.store.find(game_id)
            if record is None:
                return
            log.error("job waited %.0fs; failing it with %s", age, code.value, extra={"game_id": game_id})
            if await self.store.give_up(game_id, record.generation, code,
                                        f"gave up after {age:.0f}s: {message}", now_utc(),
                                        record.current_container_id):
                self._results_written()
        except TemporaryError:
            pass
        except Exception:
            log.exception("could not fail an overdue job", extra={"game_id": game_id})


def _uid(user: str | None) -> int | None:
    return int(user.split(":", 1)[0]) if user else None

