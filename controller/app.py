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
from desired.store import NOTIFY_CHANNEL, PG_UNAVAILABLE, Store
from observed.docker import DockerAdapter
from observed.events import EventWatcher
from observed.health import HealthProbe
from controller.logs import redact_url

log = logging.getLogger("rtmanager")

SHUTDOWN_DRAIN = 15.0


class Controller:
    """Everything that runs in ``rtmanager run``, wired together."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self.docker = DockerAdapter(instance=settings.instance, network=settings.docker_network,
                                    pool_size=max(4, settings.concurrency + 2),
                                    observer=self.metrics.docker_observer)
        self.probe = HealthProbe(port=settings.engine_port, path=settings.health_path)
        self.queue = WorkQueue(on_change=self._queue_changed)
        self._last_adds = 0
        self.resync_now = asyncio.Event()
        self.events: EventWatcher | None = None

    def _queue_changed(self, q: WorkQueue) -> None:
        self.metrics.queue_depth.set(len(q))
        if q.adds != self._last_adds:
            self.metrics.queue_adds.inc(q.adds - self._last_adds)
            self._last_adds = q.adds

    async def start(self) -> None:
        s = self.settings
        log.info("starting", extra={"instance": s.instance, "database": redact_url(s.database_url),
                                    "redis": redact_url(s.redis_url), "network": s.docker_network,
                                    "concurrency": s.concurrency})
        self.pool = await asyncpg.create_pool(s.database_url, min_size=1, max_size=max(4, s.concurrency + 4),
                                              command_timeout=30)
        self.redis = aioredis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                             health_check_interval=15)
        self.store = Store(self.pool)
        self.relay = Relay(s, self.redis, self.store, self.metrics)
        self.intake = Intake(s, self.redis, self.store, self.metrics, desired_changed=self.queue.add,
                             results_written=self.relay.poke)
        self.reconciler = Reconciler(s, self.store, self.docker, self.probe, self.metrics, self.queue,
                                     results_written=self.relay.poke)
        self.http = HttpServer(self)
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
        if s.http_port:
            await self.http.start()

    def _spawn(self, name: str, coro) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def run_until_stopped(self, handle_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        stop_waiter = asyncio.create_task(self.stopping.wait(), name="stop-signal")
        done, _ = await asyncio.wait([stop_waiter, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is stop_waiter:
                continue
            exc = task.exception() if not task.cancelled() else None
            if exc is None and self.stopping.is_set():
                continue  # a loop that saw the stop first
            log.critical("task %s ended unexpectedly: %r", task.get_name(), exc, exc_info=exc)
            code = 1
        await self.shutdown()
        stop_waiter.cancel()
        return code

    def _on_docker_event(self, game_id: str, action: str) -> None:
        log.debug("docker event %s", action, extra={"game_id": game_id})
        self.queue.add(game_id)

    async def shutdown(self) -> None:
        log.info("shutting down")
        if self.events is not None:
            self.events.stop()
        self.intake.stop()
        self.queue.shut_down()
        workers = [t for t in self.tasks if t.get_name().startswith("worker-")]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=SHUTDOWN_DRAIN)
            for t in pending:
                t.cancel()
        try:
            await asyncio.wait_for(self.relay.flush(), 5)
        except Exception as exc:  # the outbox keeps them; the next start publishes them
            log.warning("results left in the outbox: %s", exc)
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
        log.info("stopped")

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
        return queued

    async def resync_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                queued = await self.resync_once()
                self.metrics.resyncs.labels("ok").inc()
                if queued:
                    log.info("resync queued %d games", queued)
            except (Exception,) as exc:  # Docker or Postgres away: try again next interval
                self.metrics.resyncs.labels("error").inc()
                log.warning("resync failed: %s", exc)
            await self._wait_any(self.stopping, self.resync_now, timeout=self.settings.resync_interval)
            self.resync_now.clear()

    @staticmethod
    async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
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

                async def probe(rec) -> None:
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
            except PG_UNAVAILABLE as exc:
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
    finally:
        await conn.close()


async def run(settings: Settings) -> int:
    controller = Controller(settings)
    try:
        await _startup_migrate(settings)
        await controller.start()
    except PG_UNAVAILABLE as exc:
        log.error("cannot reach Postgres at %s: %s", redact_url(settings.database_url), exc)
        return 1
    except asyncpg.UndefinedTableError:
        log.error("the database has no rtmanager schema: run `rtmanager migrate` (or set RTMANAGER_AUTO_MIGRATE=1)")
        return 1
    return await controller.run_until_stopped()
