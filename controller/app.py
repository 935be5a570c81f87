"""The composition root: builds every client inside the running loop, starts and supervises the
named tasks, and shuts down in order. Nothing else here: leadership is controller/leadership.py,
the triggers controller/triggers.py, admission controller/admission.py.

Tasks. Always: the leadership loop and the HTTP server. While this replica
leads: the intake, the outbox relay, N reconcile workers, the resync, the
NOTIFY listener, the health round, the turn clock, the rollout loop, the drain loop, the storage round and the
backend's event reader. Each loop
survives what goes wrong in it: per-game work fails or retries that game, and a
failed iteration is logged, counted (``rtmanager_loop_errors_total``), shown on
``/readyz`` and retried with a capped backoff. A leader task that dies of a
fenced write steps this replica down (it campaigns again); a task that ends
any other way is logged, counted (``rtmanager_loop_restarts_total``) and
started again after a backoff: a poison value must not end the process, since
every restart (and every replica) would meet it again.

Shutdown (SIGTERM / SIGINT): stop reading jobs, let the workers finish the
action in hand (bounded), stop the relay and flush the outbox once, hand the
lease over, close the clients, exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from controller import storage
from controller.admission import Admission
from controller.config import ConfigError, Settings
from controller.config_table import Backend
from controller.config_values import OFF_GAME_NETWORK
from controller.drains import Drainer
from controller.engine_proxy import ProxySettings
from controller.http import HttpDeps, HttpServer
from controller.intake import Intake
from controller.leadership import Leadership
from controller.logs import redact_url
from controller.metrics import Metrics
from controller.reconciler import Reconciler, backend_errors
from controller.relay import Relay
from controller.rollouts import RolloutLoop
from controller.storage import StorageRound
from controller.streams import RedisStreams
from controller.triggers import HealthRound, Readiness, Resync, TurnClock
from controller.turns import probe_host
from controller.workqueue import WorkQueue
from desired.clock import Clock
from desired.db.lease import Lease
from desired.db.migrate import migrate, schema_refusal
from desired.db.notifications import Notifications
from desired.db.pool import connect, create_pool
from desired.db.store import Store
from desired.errors import StoreError, StoreUnavailable
from desired.leader import Fence, Fenced
from desired.model import RuntimeRecord
from desired.values import Identity, WrongInstance
from desired.wakeup import Signal
from observed import statedir
from observed.backend import EventSource, RuntimeBackend
from observed.docker import DockerBackend
from observed.engine import OPERATOR_LIMIT, EngineClient
from observed.errors import ObservedError

log = logging.getLogger("rtmanager")

SHUTDOWN_DRAIN = 5.0  # seconds workers may finish the action in hand; the next leader redoes the rest
RESTART_FIRST, RESTART_MAX = 0.5, 30.0  # seconds before a task that ended unexpectedly starts again, doubling
RESTART_RESET = 60.0  # a task that ran this long before it ended starts again after RESTART_FIRST
SELF_REPORTING = {"leadership", "intake", "relay", "resync", "health", "turn-clock", "rollouts",
                  "drains"}  # call Metrics.loop_ok
STARTUP_WAIT = 60.0
ENGINE_ADDRESS_TTL = 2.0  # seconds the engine proxy trusts a unit's address it looked up


class Controller:
    """Everything that runs in ``rtmanager run``, wired together."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, clock: Clock | None = None,
                 identity: Identity | None = None, *, backend_factory: Callable[..., RuntimeBackend] | None = None,
                 engine: EngineClient | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock or Clock()
        self.identity = identity
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []         # for the life of the process
        self.leader_tasks: list[asyncio.Task[Any]] = []  # for one leadership term
        self.term_stopping = asyncio.Event()
        self.exit_code = 0
        self._sighup = False  # a SIGHUP handler of ours (RTMANAGER_API_TOKENS_FILE) is installed
        self.fence = Fence(instance=settings.leadership.instance, ttl=settings.leadership.lease_ttl,
                           holder=settings.streams.consumer_name)  # one name per replica, stable across restarts
        # backend_factory and engine: the benchmark's simulated daemon and engines (make_backend's
        # signature); production uses the defaults.
        self.backend = (backend_factory or make_backend)(settings, observer=self.metrics.docker_observer,
                                                         guard=self._may_act)
        self.engine = engine or EngineClient(port=settings.engine.engine_port, path=settings.engine.health_path,
                                             admin_path=settings.engine.admin_path,
                                             # an idle probe connection must outlive the interval to be reused
                                             keepalive_timeout=max(60.0, 2 * settings.engine.health_interval))
        # The HTTP surface's questions to engines (an operator's engine status) on a client and pool of their own:
        # calls to engines that do not answer must never hold the connections the health probes need.
        self.operator_engine = engine or EngineClient(port=settings.engine.engine_port,
                                                      path=settings.engine.health_path,
                                                      admin_path=settings.engine.admin_path, probe_keepalive=False,
                                                      limit=OPERATOR_LIMIT)
        self.queue = WorkQueue(on_change=self._queue_changed, on_timing=self._queue_timing)
        self._last_adds = 0
        self.outbox = Signal()  # raised by every commit that writes results or snapshots
        self.events: EventSource | None = None
        self._restart_delay: dict[str, float] = {}
        self._engine_addresses: dict[str, tuple[float, str | None]] = {}  # unit id -> (when seen, address)

    # ---------------------------------------------------------------- wiring
    def _queue_changed(self, q: WorkQueue) -> None:
        self.metrics.queue_depth.set(len(q))
        if q.adds != self._last_adds:
            self.metrics.queue_adds.inc(q.adds - self._last_adds)
            self._last_adds = q.adds

    def _queue_timing(self, what: str, seconds: float) -> None:
        (self.metrics.queue_wait if what == "queued" else self.metrics.queue_work).observe(seconds)

    def _may_act(self) -> None:
        """Checked before every backend call that changes something: a replica whose term has
        lapsed (a stall, a partition from Postgres) stops mid-action, not after it."""
        if not self.fence.valid_locally:
            raise Fenced(f"leadership term {self.fence.epoch} has lapsed; no more backend actions")

    async def _image_present(self, image: str) -> bool | None:
        try:
            return await self.backend.image_present(image)
        except ObservedError:
            return None  # the daemon does not answer: unknown

    async def _pull_image(self, image: str) -> None:
        with backend_errors():
            await self.backend.ensure_image(image)

    async def _locate_engine(self, record: RuntimeRecord) -> str | None:
        """Where the engine proxy reaches a game's engine: its unit's address as the health probe takes it
        (None: the unit does not run). Remembered for ENGINE_ADDRESS_TTL per unit, so that a gateway's
        traffic is not one daemon call per request; a replaced unit has another id."""
        unit = record.current_container_id
        if not unit:
            return None
        now = asyncio.get_running_loop().time()
        cached = self._engine_addresses.get(unit)
        if cached is not None and now - cached[0] < ENGINE_ADDRESS_TTL:
            return cached[1]
        try:
            seen = await self.backend.inspect(unit)
        except ObservedError:
            return None
        host = probe_host(record.game_id, seen.address) if seen is not None and seen.running else None
        if len(self._engine_addresses) >= 4096:
            self._engine_addresses.clear()
        self._engine_addresses[unit] = (now, host)
        return host

    async def _relay_check(self) -> None:
        """/readyz: the leader's relay finishes its passes (a standby runs none)."""
        if self.is_leader:
            self.relay.check_stalled()

    @property
    def is_leader(self) -> bool:
        return self.leadership.leading and self.fence.valid_locally

    @property
    def readiness_probes(self) -> int:
        return self.readiness.probes

    async def _claim_state_root(self) -> None:
        """The state root is this instance's (on this host, where a Docker backend's engines run): another
        instance's games would share its directories. WrongInstance if another instance claimed it."""
        s = self.settings
        owner = await asyncio.to_thread(statedir.claim_root, s.storage.state_root, s.leadership.instance)
        if owner is not None and owner != s.leadership.instance:
            raise WrongInstance(f"the state root {s.storage.state_root} belongs to instance {owner} (its "
                                f"{statedir.OWNER}); give each instance a state root of its own")

    def _job_admitted(self, game_id: str) -> None:
        """A job of the game may have been admitted: its next sync claims its operations (Reconciler.claimed)."""
        reconciler = getattr(self, "reconciler", None)  # made in start(), after the admission
        if reconciler is not None:
            reconciler.job_admitted(game_id)
        else:
            self.queue.add(game_id)

    async def start(self) -> None:
        """Connect, serve HTTP, and campaign for leadership; the leader's loops start once elected."""
        s = self.settings
        if s.runtime.backend is Backend.DOCKER:
            await self._claim_state_root()
        log.info("starting", extra={"instance": s.leadership.instance, "database": redact_url(s.database.database_url),
                                    "redis": redact_url(s.streams.redis_url), "network": s.runtime.docker_network,
                                    "concurrency": s.runtime.concurrency, "holder": self.fence.holder})
        # Reconcile workers, and the intake, relay, resync, health round, turn clock, HTTP.
        self.pool = await create_pool(s.database.database_url, max_size=s.runtime.concurrency + 6,
                                      lease_ttl=s.leadership.lease_ttl)
        self.store = Store(self.pool, fence=self.fence, clock=self.clock, outbox=self.outbox)
        if self.identity is None:
            self.identity = await Store(self.pool, clock=self.clock).claim_identity(s.leadership.instance)
        self.streams = RedisStreams(s.streams.redis_url, group=s.streams.consumer_group,
                                    consumer=s.streams.consumer_name)
        self.admission = Admission(self.store, s.record_defaults, wake=self._job_admitted,
                                   registry=s.images.version_policy == "registry")
        self.relay = Relay(s.streams, self.streams, self.store, self.metrics)
        self.intake = Intake(s.streams, self.streams, self.store, self.admission, self.metrics, fence=self.fence,
                             allowlist=s.images.image_allowlist)
        self.reconciler = Reconciler(s, self.store, self.backend, self.engine, self.metrics, self.queue,
                                     fence=self.fence, clock=self.clock,
                                     database=self.identity.uid)
        self.readiness = Readiness({"postgres": self.store.ping, "redis": self.streams.ping,
                                    "docker": self.backend.ping, "relay": self._relay_check,
                                    "state_storage": self.reconciler.states.readiness}, self.metrics)
        self.storage = StorageRound(config=s.storage, store=self.store, backend=self.backend,
                                    reconciler=self.reconciler, keeper=self.reconciler.states, metrics=self.metrics)
        self.resync = Resync(store=self.store, backend=self.backend, reconciler=self.reconciler, queue=self.queue,
                             metrics=self.metrics, interval=s.runtime.resync_interval,
                             retention_days=s.database.retention_days,
                             ready_check=self.readiness.ok)
        self.health = HealthRound(store=self.store, backend=self.backend, reconciler=self.reconciler,
                                  interval=s.engine.health_interval, metrics=self.metrics,
                                  steady_every=s.engine.health_steady_every)
        self.turn_clock = TurnClock(store=self.store, admission=self.admission, metrics=self.metrics,
                                    max_sleep=s.runtime.resync_interval)
        swarm_nodes = getattr(self.backend, "node_names", None)  # Swarm: a drain's node must be one of them
        self.drainer = Drainer(store=self.store, admission=self.admission, metrics=self.metrics, clock=self.clock,
                               wake=self.queue.add, nodes=swarm_nodes)
        self.reconciler.hold = self.drainer.hold  # no crash restart on a drained host or node
        self.reconciler.hold_removal = self.drainer.hold_removal  # nor a removal of what undrain brings back
        self.reconciler.starts.avoid = self.drainer.avoided_nodes  # no new unit on a drained node
        self.rollouts = RolloutLoop(store=self.store, admission=self.admission, metrics=self.metrics,
                                    interval=s.runtime.rollout_interval)
        self.outbox.subscribe(self.relay.poke)
        self.outbox.subscribe(self.rollouts.result_committed)  # a patch answered: its rollout may go on
        self.store.schedule.subscribe(self.turn_clock.wake.set)  # a new game, a generated turn, a resume, ...
        self.lease = Lease(s.database.database_url, self.fence)
        self.leadership = Leadership(self.lease, self.fence, self.metrics, on_elected=self._lead,
                                     on_deposed=self._step_down)
        self.http = HttpServer(HttpDeps(
            http=s.http, allowlist=s.images.image_allowlist, store=self.store, admission=self.admission,
            metrics=self.metrics,
            is_leader=lambda: self.is_leader, readiness=self.readiness.check,
            results_changed=self.outbox.next,
            unowned=lambda: self.resync.unowned,
            image_present=self._image_present,
            pull_image=self._pull_image,
            drains=self.store, backend=s.runtime.backend.value, state_shared=s.storage.state_shared,
            drains_changed=self.drainer.wake.set, drain_nodes=swarm_nodes,
            rollouts=self.store, rollout_wake=self.rollouts.wake.set, watch=self.store,
            version_registry=s.images.version_policy == "registry",
            engine=self.operator_engine, locate_engine=self._locate_engine,
            engine_proxy=ProxySettings(admin_path=s.engine.admin_path, max_body=s.engine.proxy_max_body,
                                       timeout=s.engine.proxy_timeout)))
        if s.http.api_tokens_file:  # SIGHUP: read RTMANAGER_API_TOKENS_FILE again now (it is polled too)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.http.tokens.reload)
            self._sighup = True
        if s.http.http_port:
            # Off the engines' network: an engine must not reach the API (docs/architecture.md).
            subnets = await self.backend.network_subnets() if s.http.http_host == OFF_GAME_NETWORK else None
            await self.http.start(subnets)
        self._spawn("leadership", lambda: self.leadership.run(self.stopping))

    # ------------------------------------------------------------ leadership
    async def _lead(self) -> None:
        s = self.settings
        self.term_stopping = asyncio.Event()
        self.queue.reset()
        # Claims everything once; reads only while this term is valid.
        self.intake = Intake(s.streams, self.streams, self.store, self.admission, self.metrics, fence=self.fence,
                             allowlist=s.images.image_allowlist)
        self.relay.reset()
        term = self.term_stopping
        listener = Notifications(s.database.database_url, self._job_admitted,  # an operator tool's commits
                                 outbox=self.outbox, schedule=self.store.schedule)
        self._spawn("relay", self.relay.run, leader=True)
        self._spawn("intake", self.intake.run, leader=True)
        for n in range(s.runtime.concurrency):
            self._spawn(f"worker-{n}", functools.partial(self.reconciler.worker, n), leader=True)
        self._spawn("resync", lambda: self.resync.run(term), leader=True)
        self._spawn("listener", lambda: listener.run(term), leader=True)
        if s.engine.health_interval > 0:
            self._spawn("health", lambda: self.health.run(term), leader=True)
        self._spawn("turn-clock", lambda: self.turn_clock.run(term), leader=True)
        self._spawn("rollouts", lambda: self.rollouts.run(term), leader=True)
        self._spawn("storage", lambda: self.storage.run(term), leader=True)
        self._spawn("drains", lambda: self.drainer.run(term), leader=True)
        self.events = events = self.backend.events(on_event=self._on_backend_event, on_connect=self.resync.now.set)
        if s.runtime.backend is Backend.DOCKER:  # Swarm's task poller is late by its interval: no cache there
            self.reconciler.units.stream = self._event_stream
        events.start()

    async def _step_down(self, reason: str) -> None:
        """The term is over: stop every leader task at once (the fence already refuses them)."""
        self._stop_events()
        self.term_stopping.set()
        self.intake.stop()
        self.relay.stop()
        self.queue.shut_down()
        tasks, self.leader_tasks = self.leader_tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in list(self.metrics.failing_loops):  # the term's loops are gone: nothing of theirs fails
            if name != "leadership":
                self.metrics.loop_ok(name)

    def _on_backend_event(self, game_id: str, action: str) -> None:
        log.debug("backend event %s", action, extra={"game_id": game_id})
        self.reconciler.units.touch(game_id)
        self.queue.add(game_id)

    def _event_stream(self) -> int | None:
        """The Docker event stream's connection number while it is connected (the reconciler trusts a
        unit it inspected only while the same connection lasts), None otherwise."""
        events = self.events
        if events is None or not getattr(events, "connected", False):
            return None
        return getattr(events, "connects", None)

    def _stop_events(self) -> None:
        self.reconciler.units.clear()  # a next term's stream numbers its connections anew
        if self.events is not None:
            self.events.stop()
            self.events = None

    # ----------------------------------------------------------- supervision
    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, object]], leader: bool = False) -> None:
        """Run ``factory()`` as a task; ``factory`` starts it again if it ends unexpectedly."""
        task = asyncio.create_task(factory(), name=name)
        (self.leader_tasks if leader else self.tasks).append(task)
        term = self.term_stopping if leader else None
        started = asyncio.get_running_loop().time()
        task.add_done_callback(lambda t: self._task_ended(t, factory, term, started))

    def _task_ended(self, task: asyncio.Task[Any], factory: Callable[[], Coroutine[Any, Any, object]] | None = None,
                    term: asyncio.Event | None = None, started: float = 0.0) -> None:
        """Supervision: a fenced leader task steps this replica down; a task that ends any other way
        (an error, or returning while nobody asked it to stop) is started again after a backoff
        (doubling per quick death, capped), for as long as its term lasts. Never the process's end:
        the restart would meet the same poison value, and so would every replica."""
        if task.cancelled():
            return
        exc = task.exception()
        if self.stopping.is_set() or (term is not None and term.is_set()):
            if exc is not None and not isinstance(exc, Fenced):
                log.error("task %s ended while stopping: %r", task.get_name(), exc, exc_info=exc)
            return
        if isinstance(exc, Fenced):
            self.leadership.lost(f"{task.get_name()}: {exc}")
            return
        name = task.get_name()
        for tasks in (self.leader_tasks, self.tasks):
            if task in tasks:
                tasks.remove(task)
        loop = asyncio.get_running_loop()
        previous = self._restart_delay.get(name)
        quick = previous is not None and loop.time() - started < RESTART_RESET
        delay = min(previous * 2, RESTART_MAX) if quick and previous is not None else RESTART_FIRST
        self._restart_delay[name] = delay
        self.metrics.loop_failed(name, exc or RuntimeError("the task returned"))
        self.metrics.loop_restarts.labels(name).inc()
        log.critical("task %s ended unexpectedly (%r); starting it again in %.1fs", name, exc, delay, exc_info=exc)
        if factory is not None:
            loop.call_later(delay, self._restart, name, factory, term)

    def _restart(self, name: str, factory: Callable[[], Coroutine[Any, Any, object]],
                 term: asyncio.Event | None) -> None:
        if self.stopping.is_set() or (term is not None and (term.is_set() or term is not self.term_stopping)):
            return  # stopping, or the term it served is over (a new term starts its own)
        log.warning("starting task %s again", name)
        if name not in SELF_REPORTING:
            self.metrics.loop_ok(name)  # the others say so themselves once an iteration succeeds
        self._spawn(name, factory, leader=term is not None)

    async def run_until_stopped(self, handle_signals: bool = True) -> int:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        await self.shutdown()
        return self.exit_code

    async def shutdown(self) -> None:
        """Stop reading jobs, let workers finish the action in hand (bounded), flush the outbox once,
        hand the lease over, close everything."""
        log.info("shutting down")
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self._stop_events()
        self.term_stopping.set()
        self.intake.stop()
        self.queue.shut_down()
        workers = [t for t in self.leader_tasks if t.get_name().startswith("worker-")]
        if workers:
            # A replica that lost its term has nothing left to finish: stop at once.
            drain = SHUTDOWN_DRAIN if self.fence.valid_locally else 0
            _, pending = await asyncio.wait(workers, timeout=drain) if drain else (set(), set(workers))
            for t in pending:
                t.cancel()
        relay_task = next((t for t in self.leader_tasks if t.get_name() == "relay"), None)
        others = [t for t in self.leader_tasks if t is not relay_task]
        for t in others:
            t.cancel()
        self.relay.stop()
        if relay_task is not None:
            await asyncio.gather(relay_task, return_exceptions=True)  # one publisher at a time
        if self.fence.valid_locally:
            try:
                await asyncio.wait_for(self.relay.flush(), 5)
            except Exception as exc:  # noqa: BLE001 - the outbox keeps them; the next leader publishes them
                log.warning("results left in the outbox: %s", exc)
        # Every other task of the term ends before the lease is handed over: a task cancelled inside a copy
        # or restore of a state directory waits for its file thread (storage.in_thread), and the next leader
        # must not copy or restore that game's directory beside it. The lease is renewed meanwhile; Lobby's
        # answers were published above, so a supervisor's SIGKILL during this wait costs only the lease's
        # expiry (and ends the thread with the process).
        if others:
            _, left = await asyncio.wait(others, timeout=storage.CANCEL_WAIT + 5)
            if left:
                log.error("tasks still running at the hand-over: %s", ", ".join(sorted(t.get_name() for t in left)))
        self.leadership.release()
        if self.fence.valid_locally:
            try:
                await asyncio.wait_for(self.lease.release(), 2)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not release the lease (it expires by itself): %s", exc)
        self.metrics.leader.set(0)
        for t in [*self.leader_tasks, *self.tasks]:
            t.cancel()
        await asyncio.gather(*self.leader_tasks, *self.tasks, return_exceptions=True)
        await self.http.stop()
        await self.engine.close()
        if self.operator_engine is not self.engine:
            await self.operator_engine.close()
        await self.lease.close()
        await self.streams.close()
        await self.pool.close()
        self.backend.close()
        log.info("stopped", extra={"exit_code": self.exit_code})


_T = TypeVar("_T")


def make_backend(settings: Settings, **hooks: Any) -> RuntimeBackend:
    """The runtime backend of RTMANAGER_BACKEND: one Docker host, or a Docker Swarm."""
    common = dict(instance=settings.leadership.instance, network=settings.runtime.docker_network,
                  pool_size=max(4,
                                settings.runtime.concurrency + 2), probe_address=settings.runtime.probe_address,
                                **hooks)
    if settings.runtime.backend == "swarm":
        from observed.swarm import SwarmBackend

        return SwarmBackend(port=settings.engine.engine_port, stop_grace=settings.runtime.stop_grace,
                            state_helper_image=settings.storage.state_helper_image, **common)
    return DockerBackend(**common)


async def prepare_database(settings: Settings) -> Identity:
    """Wait (bounded) for Postgres, apply pending migrations (when configured), claim the identity."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_WAIT
    delay = 0.2
    while True:
        try:
            conn = await connect(settings.database.database_url)
            break
        except StoreError as exc:  # the driver refuses the URL's settings: no wait will change that
            raise ConfigError(f"RTMANAGER_DATABASE_URL: {exc}") from None
        except StoreUnavailable as exc:
            if loop.time() > deadline:
                raise
            log.warning("waiting for Postgres: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    try:
        if settings.database.auto_migrate:
            applied = await migrate(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        refusal = await schema_refusal(conn)
        if refusal is not None:
            raise SchemaMissing(refusal)
    finally:
        await conn.close()
    pool = await create_pool(settings.database.database_url, max_size=1, lease_ttl=settings.leadership.lease_ttl)
    try:
        return await Store(pool).claim_identity(settings.leadership.instance)
    except StoreError as exc:
        raise SchemaMissing("the database has no rtmanager schema: run `rtmanager migrate` "
                            f"(or set RTMANAGER_AUTO_MIGRATE=1): {exc}") from exc
    finally:
        await pool.close()


async def run(settings: Settings, signalled: Callable[[], bool] | None = None) -> int:
    """``signalled``: whether a SIGTERM or SIGINT came before the event loop took the signals over
    (the CLI catches them from the process's first moment)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start-up ends it cleanly too
        loop.add_signal_handler(sig, stopping.set)
    if signalled is not None and signalled():
        stopping.set()
    try:
        identity = await _until(stopping, prepare_database(settings))
    except WrongInstance as exc:
        log.error("RTMANAGER_INSTANCE: the database at %s: %s", redact_url(settings.database.database_url), exc)
        return 2
    except StoreUnavailable as exc:
        log.error("cannot reach Postgres at %s: %s", redact_url(settings.database.database_url), exc)
        return 1
    except SchemaMissing as exc:
        log.error("%s", exc)
        return 1
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if identity is None:
        return 0
    controller = Controller(settings, identity=identity)
    controller.stopping = stopping
    try:
        await controller.start()
    except WrongInstance as exc:
        log.error("RTMANAGER_INSTANCE: %s", exc)
        return 2
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except StoreUnavailable as exc:
        log.error("cannot reach Postgres at %s: %s", redact_url(settings.database.database_url), exc)
        return 1
    tune_gc()
    return await controller.run_until_stopped(handle_signals=False)


GC_THRESHOLD0 = 50_000  # allocations between two young collections (Python's default: 700)


def tune_gc() -> None:
    """Once started. What start-up built (modules, classes, settings, pools, the HTTP app) lives as
    long as the process: frozen, it leaves the cyclic collector's generations, so a full collection
    walks only what the rounds allocate. And a young collection every 50,000 allocations instead of
    700: a resync or a health round at 100,000 games allocates about a million objects that stay
    alive until it ends, and every young collection walked them again (bench/README.md: 1.5 -> 0.4 s
    of GC in a 50,000-game round). Cyclic garbage waits a little longer; what refcounting frees is
    freed at once as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


class SchemaMissing(RuntimeError):
    pass


async def _until(stopping: asyncio.Event, coro: Awaitable[_T]) -> _T | None:
    """Run ``coro`` unless ``stopping`` is set first (then None)."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None
