"""The composition root: builds every client inside the running loop and supervises the tasks.

Tasks (each named, each kept): the intake, the outbox relay, N reconcile
workers, the resync loop, the Postgres listener and the HTTP server. If any of
them dies the process stops loudly (exit 1) instead of limping on. On SIGTERM
or SIGINT: stop reading jobs, let the workers finish the action in hand (within
a bound), flush the outbox, close the clients, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal

import asyncpg
import redis.asyncio as aioredis
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from controller.config import Settings
from controller.http import HttpServer
from controller.intake import Intake
from controller.metrics import Metrics
from controller.planner import ActionKind
from controller.reconciler import Reconciler
from controller.relay import Relay
from controller.workqueue import WorkQueue
from desired.model import Status, container_name
from desired.leader import Fence, Fenced, Lease
from desired.store import NOTIFY_CHANNEL, PG_UNAVAILABLE, Store
from observed.docker import DockerAdapter
from observed.events import EventWatcher
from observed.health import HealthProbe
from controller.logs import redact_url

log = logging.getLogger("rtmanager")

SHUTDOWN_DRAIN = 15.0
EXIT_LOST_LEADERSHIP = 3
PRUNE_EVERY = 3600.0


class Controller:
    """Everything that runs in ``rtmanager run``, wired together."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self.fence = Fence(instance=settings.instance, ttl=settings.lease_ttl,
                           holder=f"{settings.consumer_name}-{os.getpid()}-{secrets.token_hex(3)}")
        self.docker = DockerAdapter(instance=settings.instance, network=settings.docker_network,
                                    pool_size=max(4, settings.concurrency + 2),
                                    observer=self.metrics.docker_observer, guard=self._may_act)
        self.probe = HealthProbe(port=settings.engine_port, path=settings.health_path)
        self.queue = WorkQueue(on_change=self._queue_changed, on_timing=self._queue_timing)
        self._last_adds = 0
        self.resync_now = asyncio.Event()
        self.results_changed = asyncio.Event()
        self.lease_done = asyncio.Event()  # set by shutdown once the term's last writes are done
        self.events: EventWatcher | None = None
        self.exit_code = 0

    def _queue_changed(self, q: WorkQueue) -> None:
        self.metrics.queue_depth.set(len(q))
        if q.adds != self._last_adds:
            self.metrics.queue_adds.inc(q.adds - self._last_adds)
            self._last_adds = q.adds

    def _may_act(self) -> None:
        """Checked before every Docker call that changes something: a replica whose term has
        lapsed (a stall, a partition from Postgres) stops mid-action, not after it."""
        if not self.fence.valid_locally:
            raise Fenced(f"leadership term {self.fence.epoch} has lapsed; no more Docker actions")

    def _queue_timing(self, what: str, seconds: float) -> None:
        (self.metrics.queue_wait if what == "queued" else self.metrics.queue_work).observe(seconds)

    async def start(self) -> None:
        """Connect, serve HTTP, and campaign for leadership; the leader's loops start once elected."""
        s = self.settings
        log.info("starting", extra={"instance": s.instance, "database": redact_url(s.database_url),
                                    "redis": redact_url(s.redis_url), "network": s.docker_network,
                                    "concurrency": s.concurrency, "holder": self.fence.holder})
        self.pool = await asyncpg.create_pool(
            s.database_url, min_size=1, max_size=max(4, s.concurrency + 4), command_timeout=30,
            # A leader paused inside a transaction must not hold off a take-over for long.
            server_settings={"idle_in_transaction_session_timeout": str(int(s.lease_ttl * 1000))},
            # Pool connections never LISTEN, SET, hold session locks or open cursors, so the
            # default reset (4 statements per release) is pure overhead; asyncpg still rolls
            # back a transaction left open.
            reset=_no_session_state)
        self.redis = aioredis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                             health_check_interval=15)
        self.store = Store(self.pool, fence=self.fence)
        self.lease = Lease(self.pool, self.fence)
        self.relay = Relay(s, self.redis, self.store, self.metrics)
        self.intake = Intake(s, self.redis, self.store, self.metrics, desired_changed=self.queue.add,
                             results_written=self._results_written)
        self.reconciler = Reconciler(s, self.store, self.docker, self.probe, self.metrics, self.queue,
                                     results_written=self._results_written, fence=self.fence)
        self.http = HttpServer(self)
        if s.http_port:
            await self.http.start()
        self._spawn("leadership", self.leadership_loop())

    def _results_written(self) -> None:
        self.relay.poke()
        # Wake every REST caller waiting for its job; later waiters take the fresh event.
        changed, self.results_changed = self.results_changed, asyncio.Event()
        changed.set()

    async def _lead(self) -> None:
        s = self.settings
        log.info("elected leader", extra={"epoch": self.fence.epoch})
        self.metrics.leader.set(1)
        self.intake.claim_everything_once = True  # entries the previous leader read but did not ack
        self._spawn("relay", self.relay.run())
        self._spawn("intake", self.intake.run())
        for n in range(s.concurrency):
            self._spawn(f"worker-{n}", self.reconciler.worker(n))
        self._spawn("resync", self.resync_loop())
        self._spawn("listener", self.listen_loop())
        if s.health_interval > 0:
            self._spawn("health", self.health_loop())
        self.events = EventWatcher(instance=s.instance, loop=asyncio.get_running_loop(),
                                   on_event=self._on_docker_event, on_connect=self.resync_now.set)
        self.events.start()

    async def leadership_loop(self) -> None:
        """Campaign until elected, then renew; a lost term stops the process (exit 3)."""
        ttl = self.settings.lease_ttl
        announced = False
        while not self.stopping.is_set():
            try:
                if await self.lease.acquire() is not None:
                    break
            except Exception as exc:  # noqa: BLE001 - a standby must outlive any Postgres trouble
                log.warning("leader election: %s: %s", exc.__class__.__name__, exc)
            if not announced:
                log.info("standing by: another replica holds the lease of instance %s", self.settings.instance)
                announced = True
            await self._wait_any(self.stopping, timeout=min(1.0, ttl / 3))
        if self.stopping.is_set():
            return
        await self._lead()
        # Renew until shutdown has drained the workers and flushed the outbox (``lease_done``),
        # not merely until the stop signal: the last writes of a graceful stop need the term.
        while not self.lease_done.is_set():
            await self._wait_any(self.lease_done, timeout=ttl / 5)
            if self.lease_done.is_set():
                return
            try:
                renewed = await asyncio.wait_for(self.lease.renew(), ttl / 2)
            except Exception as exc:  # noqa: BLE001 - retried until the term lapses locally
                log.warning("could not renew the lease: %s", exc)
                renewed = self.fence.valid_locally  # keep trying until the term lapses locally
                if renewed:
                    continue
            if not renewed:
                log.critical("lost leadership (term %d); stopping", self.fence.epoch)
                self.metrics.leader.set(0)
                self.exit_code = EXIT_LOST_LEADERSHIP
                self.stopping.set()
                return

    @property
    def is_leader(self) -> bool:
        return self.fence.valid_locally

    def _spawn(self, name: str, coro) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task) -> None:
        """Supervision: a loop that dies stops the whole process loudly instead of limping on."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and self.stopping.is_set():
            return
        if isinstance(exc, Fenced):
            log.critical("fenced: %s; stopping", exc)
            self.exit_code = self.exit_code or EXIT_LOST_LEADERSHIP
        else:
            log.critical("task %s ended unexpectedly: %r", task.get_name(), exc, exc_info=exc)
            self.exit_code = self.exit_code or 1
        self.stopping.set()

    async def run_until_stopped(self, handle_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        await self.shutdown()
        return self.exit_code

    def _on_docker_event(self, game_id: str, action: str) -> None:
        log.debug("docker event %s", action, extra={"game_id": game_id})
        self.queue.add(game_id)

    async def shutdown(self) -> None:
        """Stop reading jobs, let workers finish the action in hand (bounded), flush the outbox,
        hand the lease back, close everything."""
        log.info("shutting down")
        if self.events is not None:
            self.events.stop()
        self.intake.stop()
        self.queue.shut_down()
        workers = [t for t in self.tasks if t.get_name().startswith("worker-")]
        if workers:
            # A replica that lost its term has nothing left to finish: stop at once.
            drain = SHUTDOWN_DRAIN if self.fence.valid_locally else 0
            _, pending = await asyncio.wait(workers, timeout=drain) if drain else (set(), set(workers))
            for t in pending:
                t.cancel()
        if self.fence.valid_locally:
            try:
                await asyncio.wait_for(self.relay.flush(), 5)
            except Exception as exc:  # the outbox keeps them; the next leader publishes them
                log.warning("results left in the outbox: %s", exc)
        self.lease_done.set()
        if self.fence.valid_locally:
            try:
                await asyncio.wait_for(self.lease.release(), 2)
            except Exception as exc:
                log.warning("could not release the lease (it expires by itself): %s", exc)
        self.metrics.leader.set(0)
        self.relay.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.stop()
        await self.probe.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()
        self.docker.close()
        log.info("stopped", extra={"exit_code": self.exit_code})

    # ------------------------------------------------------------- triggers
    async def resync_once(self) -> int:
        """List Docker (one call) and live records (one query); queue every game not converged."""
        containers = await self.docker.list_managed()
        records = await self.store.list_live()
        by_game = {}
        for c in containers:
            if c.game_id and c.name == container_name(c.game_id):
                by_game[c.game_id] = c
            else:
                self.queue.add(c.game_id or c.name)  # odd container: let sync look at it
        self.reconciler.refill_dispose_budget()
        queued = 0
        for rec in records:
            action, _ = self.reconciler.plan_for(rec, by_game.pop(rec.game_id, None))
            if action.kind is not ActionKind.NOOP:
                self.queue.add(rec.game_id)
                queued += 1
        for game_id in by_game:  # containers without a live record: orphans, or removed records
            self.queue.add(game_id)
            queued += 1
        for status, count in (await self.store.count_by_status()).items():
            self.metrics.records.labels(status).set(count)
        self.metrics.outbox_pending.set(await self.store.unpublished_count())
        return queued

    async def resync_loop(self) -> None:
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            if self.settings.retention_days and loop.time() - last_prune > PRUNE_EVERY:
                try:
                    results, ops = await self.store.prune(self.settings.retention_days)
                    last_prune = loop.time()
                    if results or ops:
                        log.info("retention: removed %d results and %d operations older than %g days",
                                 results, ops, self.settings.retention_days)
                except Exception as exc:  # noqa: BLE001 - retried next round
                    log.warning("retention failed: %s", exc)
            try:
                queued = await self.resync_once()
                self.metrics.resyncs.labels("ok").inc()
                # Docker and Postgres just answered; with Redis, that is readiness (kept current
                # without a /readyz caller, and without extra Docker calls).
                try:
                    await asyncio.wait_for(self.redis.ping(), 2)
                    self.metrics.ready.set(1)
                except Exception:  # noqa: BLE001 - any failure means not ready
                    self.metrics.ready.set(0)
                if queued:
                    log.info("resync queued %d games", queued)
            except Exception as exc:  # Docker or Postgres away: try again next interval
                self.metrics.resyncs.labels("error").inc()
                self.metrics.ready.set(0)
                log.warning("resync failed: %s", exc)
            await self._wait_any(self.stopping, self.resync_now, timeout=self.settings.resync_interval)
            self.resync_now.clear()

    @staticmethod
    async def _wait_any(*events: asyncio.Event, timeout: float | None) -> None:
        waiters = [asyncio.create_task(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def health_loop(self) -> None:
        """Probe running engines; write the health field only when it changes."""
        sem = asyncio.Semaphore(16)
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.settings.health_interval)
                return
            except asyncio.TimeoutError:
                pass
            try:
                records = await self.store.list_by_status(Status.RUNNING)
                if not records:
                    continue
                ips = {c.id: c.ip_address for c in await self.docker.list_managed() if c.running}

                async def probe(rec, ips=ips) -> None:
                    async with sem:
                        await self.reconciler.probe_health(rec, ips.get(rec.current_container_id or ""))

                await asyncio.gather(*(probe(r) for r in records))
            except Exception as exc:  # Postgres or Docker away: next interval
                log.warning("health round failed: %s", exc)

    async def listen_loop(self) -> None:
        """NOTIFY from other processes (REST on another replica, operators' tools) -> queue."""
        delay = 0.5
        while not self.stopping.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self.settings.database_url)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *args: self.queue.add(args[3]))
                delay = 0.5
                while not self.stopping.is_set() and not conn.is_closed():
                    # asyncpg does not notice a dead listener by itself: ping it.
                    await conn.execute("SELECT 1", timeout=5)
                    try:
                        await asyncio.wait_for(self.stopping.wait(), 5)
                    except asyncio.TimeoutError:
                        pass
            except Exception as exc:  # noqa: BLE001 - best effort: the resync is the fallback
                log.warning("listener lost Postgres, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()

    # ------------------------------------------------------------ readiness
    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}

        async def check(name: str, coro) -> None:
            try:
                await asyncio.wait_for(coro, 2)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"error: {exc.__class__.__name__}"

        await asyncio.gather(check("postgres", self.pool.fetchval("SELECT 1")),
                             check("redis", self.redis.ping()),
                             check("docker", self.docker.ping()))
        self.metrics.ready.set(1 if all(v == "ok" for v in checks.values()) else 0)
        return checks


STARTUP_WAIT = 60.0


async def _no_session_state(conn: asyncpg.Connection) -> None:
    return None


async def _startup_migrate(settings: Settings) -> None:
    """Wait (bounded) for Postgres to accept connections, then apply pending migrations."""
    from desired.migrate import migrate

    async for attempt in AsyncRetrying(retry=retry_if_exception_type(PG_UNAVAILABLE),
                                       stop=stop_after_delay(STARTUP_WAIT),
                                       wait=wait_exponential(multiplier=0.2, max=5), reraise=True,
                                       before_sleep=lambda rs: log.warning("waiting for Postgres: %s",
                                                                           rs.outcome.exception())):
        with attempt:
            conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        if settings.auto_migrate:
            applied = await migrate(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        else:
            version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
            log.info("schema version %s", version)
        owner = await conn.fetchval(
            "WITH claimed AS (INSERT INTO controller_identity (instance) VALUES ($1)"
            " ON CONFLICT (singleton) DO NOTHING RETURNING instance)"
            " SELECT instance FROM claimed UNION ALL SELECT instance FROM controller_identity LIMIT 1",
            settings.instance)
        if owner != settings.instance:
            raise WrongInstance(f"RTMANAGER_INSTANCE: the database at {redact_url(settings.database_url)} "
                                f"belongs to instance {owner!r}, not {settings.instance!r}")
    finally:
        await conn.close()


class WrongInstance(RuntimeError):
    pass


async def run(settings: Settings) -> int:
    controller = Controller(settings)
    try:
        await _startup_migrate(settings)
    except WrongInstance as exc:
        log.error("%s", exc)
        return 2
    except PG_UNAVAILABLE as exc:
        log.error("cannot reach Postgres at %s: %s", redact_url(settings.database_url), exc)
        return 1
    except asyncpg.UndefinedTableError:
        log.error("the database has no rtmanager schema: run `rtmanager migrate` (or set RTMANAGER_AUTO_MIGRATE=1)")
        return 1
    try:
        await controller.start()
    except PG_UNAVAILABLE as exc:
        log.error("cannot reach Postgres at %s: %s", redact_url(settings.database_url), exc)
        return 1
    return await controller.run_until_stopped()
