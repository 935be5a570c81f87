"""HTTP surface in the controller's own event loop: probes, metrics and the internal REST API.

``/healthz`` says the process is alive; ``/readyz`` that Postgres, Redis and
Docker answer; ``/metrics`` is the Prometheus text format. Everything under
``/api/v1/`` needs ``Authorization: Bearer <token>``, one of the named tokens of
controller/tokens.py (compared in constant time; 401 without one), whose role the
route allows (controller/access.py; 403 otherwise); with no token configured the
REST API answers 503. What a token does is logged under its name ("token:NAME").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hmac
import ipaddress
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.access import ROUTE_ROLES, allows, required_role
from controller.admission import Admission
from controller.bodies import json_body
from controller.config import ConfigError, HttpSettings
from controller.config_values import OFF_GAME_NETWORK
from controller.console_http import ConsoleRoutes
from controller.drains_api import DrainApi
from controller.engine_proxy import EngineRoutes, ProxySettings
from controller.metrics import Metrics
from controller.openapi import ACTOR_PATTERN, FORCEABLE, LOG_OPS, MAX_ACTOR, REST_JOBS, openapi_document
from controller.rollouts_http import RolloutRoutes
from controller.tokens import InvalidTokens, Role, Token, TokenSource
from controller.triggers import wait_any
from controller.watch_http import WatchRoutes
from desired.errors import NotFound, RtmError, StoreBusy, StoreUnavailable, UniqueViolation
from desired.jobs import (
    IMAGE_REF_PATTERN,
    MAX_IMAGE_REF,
    ImageAllowlist,
    InvalidJob,
    KeyReused,
    parse_control,
    parse_idempotency_key,
    parse_job,
    parse_requested_by,
    parse_turn_interval,
)
from desired.leader import Fenced
from desired.model import (
    BOOKKEEPING_FIELDS,
    CONTROL_OPS,
    GAME_ID_PATTERN,
    SECRET_FIELDS,
    ErrorCode,
    JobKind,
    JobResult,
    OpSource,
    Outcome,
    RuntimeRecord,
)
from desired.paging import InvalidPage, encode_cursor, parse_page
from desired.ports import DrainStore, RolloutAdminStore, SurfaceStore, WatchStore
from desired.values import VersionInUse
from desired.versions import MAX_NOTES, MAX_STOP_GRACE, VERSION_PATTERN, EngineVersion, VersionStatus, valid_stop_grace
from observed.engine import EngineClient

log = logging.getLogger("rtmanager.http")

DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
MAX_WAITERS = 1000  # REST requests waiting for their job's result at once, per replica; more are answered 202
MAX_WAITERS_EACH = 100  # of those, per token: one client cannot take every other client's waits
WAITERS_POLL = 5.0  # seconds: the waiters look again even without a commit's signal (a standby's own jobs)
TOKENS_POLL = 1.0  # seconds between looks at RTMANAGER_API_TOKENS_FILE
MAX_LOG_PAGE = 500
JSON_SLICE = 250  # records written to JSON between two turns of the event loop (a page of runtimes)
TOKEN_NAME = web.RequestKey("token_name", str)  # the name of the request's API token (the auth middleware's)
TOKEN_ROLE = web.RequestKey("token_role", Role)  # its role
TOKEN = web.RequestKey("token", Token)  # the token itself (name, role, digest): is it still in force?



def _json_value(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, datetime):
        return v.isoformat()
    return v


# Seconds a connection may stay without a request in progress (from its opening: a head sent halfway
# counts as none): aiohttp's own default holds such connections for an hour, before any token is looked
# at, and each holds a file descriptor the controller's own sockets need.
IDLE_TIMEOUT = 75.0


def local_ipv4_addresses() -> list[str]:
    """The IPv4 address of each network interface of this host or container (Linux)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue  # an interface without an IPv4 address
            found.append(socket.inet_ntoa(packed[20:24]))
    return found


def addresses_off(subnets: list[str], local: list[str] | None = None) -> list[str]:
    """The local IPv4 addresses (``local``, else this host's now) outside ``subnets`` (loopback included)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in subnets]
    return sorted({a for a in (local_ipv4_addresses() if local is None else local)
                   if not any(ipaddress.ip_address(a) in n for n in nets if n.version == 4)})


def record_json(record: RuntimeRecord) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in dataclasses.asdict(record).items()
            if k not in SECRET_FIELDS and k not in BOOKKEEPING_FIELDS}


@dataclass(frozen=True, kw_only=True)
class HttpDeps:
    """What the HTTP surface needs from the controller, and nothing more."""

    http: HttpSettings
    allowlist: ImageAllowlist  # RTMANAGER_IMAGE_ALLOWLIST
    store: SurfaceStore
    admission: Admission
    metrics: Metrics
    is_leader: Callable[[], bool]
    readiness: Callable[[], Awaitable[dict[str, str]]]
    results_changed: Callable[[], asyncio.Event]  # the event set when the next results are committed
    unowned: Callable[[], int] = lambda: 0  # units of this instance with no record (left for an operator)
    image_present: Callable[[str], Awaitable[bool | None]] = lambda image: _unknown()
    pull_image: Callable[[str], Awaitable[None]] = lambda image: _unknown()
    drains: DrainStore | None = None  # drains (controller/drains_http.py)
    backend: str = "docker"           # RTMANAGER_BACKEND: a host drain or node drains
    state_shared: bool = False        # RTMANAGER_STATE_SHARED
    drains_changed: Callable[[], None] = lambda: None  # wakes the leader's drain loop
    drain_nodes: Callable[[], Awaitable[Mapping[str, str]]] | None = None  # Swarm: its nodes, id -> hostname
    rollouts: RolloutAdminStore | None = None  # /api/v1/rollouts (controller/rollouts_http.py)
    rollout_wake: Callable[[], None] = lambda: None  # the leader's rollout loop looks at once
    version_registry: bool = False  # RTMANAGER_VERSION_POLICY=registry
    watch: WatchStore | None = None  # GET /api/v1/events (controller/watch_http.py), on every replica
    tokens: TokenSource | None = None  # None: read from RTMANAGER_API_TOKENS_FILE and RTMANAGER_API_TOKEN
    # The engine proxy (controller/engine_proxy.py): the engine client, its limits, and where a game's
    # engine answers (None: its unit does not run). Without them the engine routes answer 503.
    engine: EngineClient | None = None
    engine_proxy: ProxySettings | None = None
    locate_engine: Callable[[RuntimeRecord], Awaitable[str | None]] | None = None


def actor(request: web.Request) -> str:
    """Who asks: ``token:NAME`` of the request's API token (set by the auth middleware)."""
    return f"token:{request[TOKEN_NAME]}"


class JobWaiters:
    """The REST requests waiting for their job's result (``?wait=``), looked up together: one query for all
    of them at each commit of results, not one each (every commit in the fleet woke every waiter, each of
    which asked Postgres, so N requests made every commit cost N queries). At most MAX_WAITERS at once."""

    def __init__(self, store: Any, changed: Callable[[], asyncio.Event], limit: int = MAX_WAITERS,
                 each: int = MAX_WAITERS_EACH) -> None:
        self.store = store
        self.changed = changed
        self.limit = limit
        self.each = each
        self._by: dict[str, int] = {}  # waiters per token
        self._waiting: dict[int, list[asyncio.Future[dict[str, str]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._joined = asyncio.Event()  # a new waiter: looked up at once (its result may have come meanwhile)

    def __len__(self) -> int:
        return sum(len(f) for f in self._waiting.values())

    async def wait(self, op_id: int, timeout: float, who: str = "") -> dict[str, str] | None:
        """The operation's result within ``timeout`` seconds, or None (none yet, or too many waiting: in all,
        or for the token ``who``)."""
        if timeout <= 0 or len(self) >= self.limit or self._by.get(who, 0) >= self.each:
            return None
        self._by[who] = self._by.get(who, 0) + 1
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(op_id, []).append(future)
        self._joined.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._look())
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            futures = self._waiting.get(op_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(op_id, None)
            self._by[who] -= 1
            if not self._by[who]:
                del self._by[who]

    async def _look(self) -> None:
        """While anyone waits: at each commit of results, one query for every waiting operation."""
        while self._waiting:
            changed = self.changed()  # taken before the read: a commit after it sets it
            self._joined.clear()
            try:
                found = await self.store.results_of(list(self._waiting))
            except Exception as exc:  # noqa: BLE001 - Postgres away: the waiters time out and answer 202 or 503
                log.warning("could not look up the results REST requests wait for: %s", exc)
                found = {}
            for op_id, result in found.items():
                for future in self._waiting.pop(op_id, []):
                    if not future.done():
                        future.set_result(result)
            if not self._waiting:
                break
            await wait_any(changed, self._joined, timeout=WAITERS_POLL)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _ParseErrorsWithoutText(logging.Filter):
    """aiohttp logs a request it could not parse at ERROR with the parser's error, which quotes the line it
    choked on: an ``Authorization`` header with a stray byte put the token in the log. Such a record is a
    warning without that text (the client still gets its 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            status = getattr(record.exc_info[1], "code", 400)
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = f"refused a request that is not valid HTTP ({status})", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_PARSE_ERRORS = _ParseErrorsWithoutText()


class HttpServer:
    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps
        self._runner: web.AppRunner | None = None
        self._poller: asyncio.Task[None] | None = None
        try:
            self.tokens = deps.tokens or TokenSource(deps.http.api_tokens_file, deps.http.api_token)
        except InvalidTokens as exc:
            raise ConfigError(f"RTMANAGER_API_TOKENS_FILE: {exc}") from None
        logging.getLogger("aiohttp.server").addFilter(_PARSE_ERRORS)  # once: filters are a set by identity
        # Bodies as they came: the pass-through forwards the bytes it was given (a compressed body is not
        # decompressed under a Content-Length that still counts the compressed bytes), and a JSON route
        # refuses a compressed body with a 400 (bodies.py) rather than fail on a garbled one with a 500.
        app = web.Application(middlewares=[_json_errors, self._outages, self._auth],
                              handler_args={"auto_decompress": False})
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/runtimes", self.list_runtimes)
        app.router.add_get("/api/v1/runtimes/{game_id}", self.get_runtime)
        app.router.add_get("/api/v1/runtimes/{game_id}/operations", self.get_operations)
        app.router.add_get("/api/v1/operations", self.operation_log)
        app.router.add_get("/api/v1/openapi.json", self.openapi)
        app.router.add_get("/api/v1/whoami", self.whoami)
        app.router.add_post("/api/v1/snapshots/resync", self.resync_snapshots)
        for path, kind in REST_JOBS.items():
            app.router.add_post(f"/api/v1/runtimes/{{game_id}}/{path}", self._job_handler(kind))
        app.router.add_put("/api/v1/runtimes/{game_id}/schedule", self.put_schedule)
        versions_path = "/api/v1/admin/engine-versions"
        app.router.add_get(versions_path, self.list_versions)
        app.router.add_post(versions_path, self.create_version)
        app.router.add_get(versions_path + "/{version}", self.get_version)
        app.router.add_patch(versions_path + "/{version}", self.update_version)
        app.router.add_delete(versions_path + "/{version}", self.delete_version)
        app.router.add_get("/api/v1/drains", self.list_drains)
        app.router.add_post("/api/v1/drains", self.create_drain)
        app.router.add_get("/api/v1/drains/{drain_id}", self.get_drain)
        app.router.add_post("/api/v1/drains/{drain_id}/undrain", self.undrain)
        self.drains = DrainApi(deps.drains, backend=deps.backend, state_shared=deps.state_shared,
                               wake=deps.drains_changed, nodes=deps.drain_nodes) if deps.drains is not None else None
        self.watch = WatchRoutes(deps.watch, deps.results_changed, deps.metrics, in_force=self._token_in_force)
        self.waiters = JobWaiters(deps.store, deps.results_changed)
        self.watch.add(app)
        RolloutRoutes(deps, actor).add(app.router)
        self.engine_routes = EngineRoutes(deps.store, deps.engine, deps.engine_proxy, deps.locate_engine)
        self.engine_routes.add(app)
        ConsoleRoutes().add(app)  # /ui: public static files; the data comes from /api/ with a token
        self.app = app

    async def start(self, game_subnets: list[str] | None = None) -> None:
        """Serve on RTMANAGER_HTTP_HOST; with ``off-game-network``, on every IPv4 address of this host
        (or container) outside ``game_subnets``, so that no engine reaches the API."""
        h = self.deps.http
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=IDLE_TIMEOUT)
        await self._runner.setup()
        hosts = [h.http_host] if h.http_host != OFF_GAME_NETWORK else addresses_off(game_subnets or [])
        for host in hosts:
            try:
                await web.TCPSite(self._runner, host, h.http_port).start()
            except OSError as exc:  # taken, no such address here, a name that does not resolve
                await self._runner.cleanup()
                raise ConfigError(f"RTMANAGER_HTTP_HOST, RTMANAGER_HTTP_PORT: cannot listen on {host} port "
                                  f"{h.http_port}: {exc.strerror or exc}") from None
        log.info("http listening on %s port %d", ", ".join(hosts), h.http_port)
        if self.tokens.path is not None:
            self._poller = asyncio.create_task(self._poll_tokens(), name="api-tokens")

    async def _poll_tokens(self) -> None:
        """RTMANAGER_API_TOKENS_FILE read again when it changes (SIGHUP reads it at once: controller/app.py)."""
        while True:
            await asyncio.sleep(TOKENS_POLL)
            try:
                self.tokens.poll()
            except Exception:  # noqa: BLE001 - never end the poll; the tokens in force stay
                log.exception("RTMANAGER_API_TOKENS_FILE: the look at the file failed")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.waiters.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _outages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Postgres away is 503 (retry later), not a 500."""
        try:
            return await handler(request)
        except StoreBusy:  # the database answered: another session holds this game's rows past the admission's wait
            game = request.match_info.get("game_id")
            which = f"game {game}'s record" if game else "a record this request needs"
            return _error(503, f"{which} is locked by another database session; send it again", retry_after=True)
        except StoreUnavailable:
            return _error(503, "the database is not reachable right now", retry_after=True)
        except Fenced:
            return _error(503, "this replica just lost its leadership; send this to the leader", retry_after=True)

    def _token_in_force(self, request: web.Request) -> bool:
        """The request's token is still in force as it was when the request came (a long stream's: the tokens
        file may have been read again since, without it, or with another role for it)."""
        token = request.get(TOKEN)
        return token is None or token in self.tokens.current.tokens

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            tokens = self.tokens.current
            if not tokens:
                return _error(503, "the REST API is disabled: set RTMANAGER_API_TOKEN or RTMANAGER_API_TOKENS_FILE")
            given = request.headers.get("Authorization", "")
            scheme, _, secret = given.partition(" ")
            # Header bytes that are not UTF-8 arrive as surrogates: compare bytes, never fail. Every token is
            # compared whatever the scheme, so the time says nothing of the secret.
            token = tokens.find(secret.encode("utf-8", "surrogateescape"))
            # The scheme is case-insensitive (RFC 9110, 11.1).
            if token is None or not hmac.compare_digest(scheme.lower().encode("utf-8", "surrogateescape"), b"bearer"):
                return _error(401, "missing or wrong bearer token")
            request[TOKEN_NAME] = token.name
            request[TOKEN_ROLE] = token.role
            request[TOKEN] = token
            if request.match_info.http_exception is None:  # a route of ours (else its 404 or 405 follows)
                canonical = request.match_info.route.resource.canonical if request.match_info.route.resource \
                    else request.path
                needed = required_role(request.method, canonical)
                if needed is None or not allows(token.role, needed):
                    what = needed.label if needed is not None else "a role no token has"
                    return _error(403, f"token {token.name} has the role {token.role.label}; "
                                       f"{request.method} {canonical} needs {what}")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.deps.readiness()
        ok = all(v == "ok" for v in checks.values())
        return web.json_response({"ready": ok, "leader": self.deps.is_leader(), "checks": checks,
                                  "unowned": self.deps.unowned()}, status=200 if ok else 503)

    async def whoami(self, request: web.Request) -> web.Response:
        """The request's token: its name and role, and which calls that role may make (the console shows
        an action only to a token allowed to take it; the server checks every call anyway)."""
        role = request[TOKEN_ROLE]
        allowed = [{"method": method, "path": path} for (method, path), needed in ROUTE_ROLES.items()
                   if allows(role, needed)]
        return web.json_response({"name": request[TOKEN_NAME], "role": role.label,
                                  "operate": role >= Role.OPERATE, "admin": role >= Role.ADMIN, "allowed": allowed})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    def _job_handler(self, kind: JobKind) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return await self.submit_job(request, kind)
        handler.__name__ = f"post_{kind.value}"
        return handler

    async def submit_job(self, request: web.Request, kind: JobKind) -> web.Response:
        """Change desired state exactly as a stream job would, then wait (bounded) for its result."""
        game_id = request.match_info["game_id"]
        try:
            wait = float(request.query.get("wait", DEFAULT_WAIT))
            if not 0 <= wait <= MAX_WAIT:
                raise ValueError
        except ValueError:
            return _error(400, f"wait must be seconds between 0 and {MAX_WAIT:g}")
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await json_body(request)
            except (ValueError, UnicodeDecodeError):
                return _error(400, "the body must be a JSON object")
            if not isinstance(body, dict):
                return _error(400, "the body must be a JSON object")
        # The path names the game; a game_id in the body must not redirect the job.
        fields = {**{k: v for k, v in body.items() if isinstance(k, str)}, "game_id": game_id}
        bad = [k for k in ("image_ref", "reason", "requested_by") if k in fields and not isinstance(fields[k], str)]
        if bad:
            return _invalid(game_id, kind, f"field {bad[0]} must be a string")
        if "turn_interval" in fields:
            interval = fields["turn_interval"]
            if isinstance(interval, bool) or not isinstance(interval, int):
                return _invalid(game_id, kind, "field turn_interval must be whole seconds")
            fields["turn_interval"] = str(interval)
        force = fields.pop("force", False)
        if not isinstance(force, bool):
            return _invalid(game_id, kind, "field force must be a boolean")
        if force and kind not in FORCEABLE:
            return _invalid(game_id, kind, f"field force does not apply to {kind.value}")
        if kind is JobKind.STOP and "reason" not in fields:
            fields["reason"] = "admin_request"
        try:
            if kind in CONTROL_OPS:
                job = parse_control({"game_id": game_id, "op": kind.value}, source=OpSource.ADMIN)
            else:
                # the fields it reads are strings by now; any other field is ignored
                job = parse_job(kind, {k: v for k, v in fields.items() if isinstance(v, str)}, self.deps.allowlist,
                                source=OpSource.ADMIN)
            requested_by = parse_requested_by({k: v for k, v in fields.items() if k == "requested_by"}, game_id)
        except InvalidJob as exc:
            return _invalid(exc.game_id or game_id, kind, exc.message, exc.code)
        try:
            key = parse_idempotency_key(request.headers.get("Idempotency-Key"))
        except ValueError as exc:
            return _invalid(game_id, kind, str(exc))
        job = dataclasses.replace(job, force=force, actor=actor(request), requested_by=requested_by,
                                  idempotency_key=key)
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send jobs to the leader", retry_after=True)
        try:
            outcome = await self.deps.admission.submit(job)
        except InvalidJob as exc:
            return _invalid(game_id, kind, exc.message, exc.code)
        except KeyReused as exc:
            return _error(422, str(exc))
        # The same key again (a retry after a lost answer): the first request's operation, its result or status.
        replayed = {"Idempotent-Replayed": "true"} if outcome.duplicate else None
        op_id = outcome.operation_id
        result = await self.deps.store.result_for(op_id) or await self.waiters.wait(op_id, wait, actor(request))
        if result is not None:
            return web.json_response({**result, "operation_id": op_id}, headers=replayed)
        op = await self.deps.store.operation(op_id)
        return web.json_response({"operation_id": op_id, "status": op.status.value,
                                  "game_id": job.game_id, "job": kind.value}, status=202, headers=replayed)

    async def put_schedule(self, request: web.Request) -> web.Response:
        """The turn clock's interval of a game (``{"turn_interval": seconds}``, 0: no schedule)."""
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        try:
            body = await json_body(request)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict) or "turn_interval" not in body:
            return _error(400, "field turn_interval is missing")
        raw = body["turn_interval"]
        if isinstance(raw, bool) or not isinstance(raw, int):
            return _error(400, "field turn_interval must be whole seconds")
        try:
            interval = parse_turn_interval(raw, game_id)
        except InvalidJob as exc:
            return _error(400, exc.message)
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        try:
            record = await self.deps.store.set_schedule(game_id, interval, OpSource.ADMIN, actor=actor(request))
        except NotFound:
            return _error(404, f"no runtime for game {game_id}")
        except InvalidJob as exc:
            return _error(409, exc.message)
        return web.json_response(record_json(record))  # the store woke the turn clock at commit

    # ------------------------------------------------------- engine versions
    async def _version_json(self, entry: EngineVersion, live_games: int | None = None) -> dict[str, Any]:
        body = {k: _json_value(v) for k, v in dataclasses.asdict(entry).items()}
        body["image_present"] = await self.deps.image_present(entry.image_ref)
        if live_games is not None:
            body["live_games"] = live_games
        return body

    async def list_versions(self, request: web.Request) -> web.Response:
        raw = request.query.get("status")
        try:
            status = VersionStatus(raw) if raw is not None else None
        except ValueError:
            return _error(400, f"status must be one of {', '.join(s.value for s in VersionStatus)}")
        entries = await self.deps.store.list_versions(status)
        return web.json_response({"engine_versions": [await self._version_json(e) for e in entries]})

    async def get_version(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        if not VERSION_PATTERN.fullmatch(version):
            return _error(400, "version must be 1-64 characters of A-Z a-z 0-9 . _ -")
        try:
            entry, live = await self.deps.store.get_version(version)
        except NotFound:
            return _error(404, f"no engine version {version}")
        return web.json_response(await self._version_json(entry, live))

    async def _version_body(self, request: web.Request, allowed: set[str]) -> dict[str, Any] | web.Response:
        try:
            body = await json_body(request)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        for name in body:
            if name not in allowed:
                what = "is immutable" if name in ("image_ref", "version") else "is not a field of an engine version"
                return _error(400, f"field {name} {what}")
        for name in ("version", "image_ref", "status", "notes"):
            if name in body and not isinstance(body[name], str):
                return _error(400, f"field {name} must be a string")
        if "status" in body and body["status"] not in {s.value for s in VersionStatus}:
            return _error(400, f"field status must be one of {', '.join(s.value for s in VersionStatus)}")
        notes = body.get("notes", "")
        if len(notes) > MAX_NOTES:
            return _error(400, f"field notes is longer than {MAX_NOTES} characters")
        if any((ch < " " and ch not in "\n\t") or "\ud800" <= ch <= "\udfff" for ch in notes):
            return _error(400, "field notes must be text without control characters")
        if "stop_grace" in body and not valid_stop_grace(body["stop_grace"]):
            return _error(400, f"field stop_grace must be whole seconds from 0 to {MAX_STOP_GRACE}, or null "
                               "(RTMANAGER_STOP_GRACE)")
        return body

    async def create_version(self, request: web.Request) -> web.Response:
        body = await self._version_body(request, {"version", "image_ref", "status", "notes", "stop_grace"})
        if isinstance(body, web.Response):
            return body
        pull = request.query.get("pull", "0")
        if pull not in ("0", "1"):
            return _error(400, "pull must be 0 or 1")
        version, image = body.get("version"), body.get("image_ref")
        if not version or not VERSION_PATTERN.fullmatch(version):
            return _error(400, "field version must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if not image or len(image) > MAX_IMAGE_REF or not IMAGE_REF_PATTERN.fullmatch(image):
            return _error(400, "field image_ref is not a valid image reference")
        if not self.deps.allowlist.allows(image):
            return _error(400, f"field image_ref: {image!r} is not allowed by RTMANAGER_IMAGE_ALLOWLIST")
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        if pull == "1":
            try:
                await self.deps.pull_image(image)
            except RtmError as exc:
                return _error(409, f"field image_ref: the image could not be pulled: {exc.message}")
        try:
            entry = await self.deps.store.create_version(version, image, VersionStatus(body.get("status", "active")),
                                                       body.get("notes", ""), body.get("stop_grace"),
                                                       actor=actor(request))
        except UniqueViolation as exc:
            field = {"engine_versions_version_key": "version",
                     "engine_versions_image_ref_key": "image_ref"}.get(exc.constraint, exc.constraint)
            return _error(409, f"an engine version with this {field} exists (constraint {exc.constraint})")
        return web.json_response(await self._version_json(entry, 0), status=201)

    async def update_version(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        if not VERSION_PATTERN.fullmatch(version):
            return _error(400, "version must be 1-64 characters of A-Z a-z 0-9 . _ -")
        body = await self._version_body(request, {"status", "notes", "stop_grace"})
        if isinstance(body, web.Response):
            return body
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        try:
            entry = await self.deps.store.update_version(
                version, status=VersionStatus(body["status"]) if "status" in body else None, notes=body.get("notes"),
                **({"stop_grace": body["stop_grace"]} if "stop_grace" in body else {}), actor=actor(request))
        except NotFound:
            return _error(404, f"no engine version {version}")
        return web.json_response(await self._version_json(entry))

    async def delete_version(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        if not VERSION_PATTERN.fullmatch(version):
            return _error(400, "version must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        try:
            await self.deps.store.delete_version(version, actor=actor(request))
        except NotFound:
            return _error(404, f"no engine version {version}")
        except VersionInUse as exc:
            return _error(409, str(exc))
        return web.Response(status=204)

    # ------------------------------------------------------------------ drains
    async def list_drains(self, request: web.Request) -> web.Response:
        if self.drains is None:
            return _error(503, "drains are not available on this server")
        return _answer(await self.drains.list())

    async def get_drain(self, request: web.Request) -> web.Response:
        if self.drains is None:
            return _error(503, "drains are not available on this server")
        return _answer(await self.drains.get(request.match_info["drain_id"]))

    async def create_drain(self, request: web.Request) -> web.Response:
        if self.drains is None:
            return _error(503, "drains are not available on this server")
        try:
            body = await json_body(request)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        req = self.drains.parse(body)
        if isinstance(req, tuple):
            return _answer(req)
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        return _answer(await self.drains.create(req, actor=actor(request)))

    async def undrain(self, request: web.Request) -> web.Response:
        if self.drains is None:
            return _error(503, "drains are not available on this server")
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        return _answer(await self.drains.undrain(request.match_info["drain_id"], actor=actor(request)))

    async def resync_snapshots(self, request: web.Request) -> web.Response:
        """A snapshot of every live game (or of ``?game_id=``), for a Lobby that lost track."""
        game_id = request.query.get("game_id")
        if game_id is not None and not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        count = await self.deps.store.snapshot_resync(game_id)
        if game_id is not None and count == 0:
            return _error(404, f"no runtime for game {game_id}")
        return web.json_response({"snapshots": count})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.deps.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_runtimes(self, request: web.Request) -> web.Response:
        """A page of records by game_id (desired/paging.py): ``next`` continues it, null on the last page."""
        try:
            page = parse_page(dict(request.query))
        except InvalidPage as exc:
            return _error(400, str(exc))
        records, more = await self.deps.store.page(page)
        # Written JSON_SLICE records at a time, the loop running between: a page of 10,000 is about a second
        # of work, and a few at once in one go would hold the loop (the lease's renewals) past its TTL.
        parts = []
        for i in range(0, len(records), JSON_SLICE):
            if i:
                await asyncio.sleep(0)
            parts.append(json.dumps([record_json(r) for r in records[i:i + JSON_SLICE]])[1:-1])
        nxt = json.dumps(encode_cursor(records[-1].game_id) if more else None)
        return web.Response(text=f'{{"runtimes": [{", ".join(p for p in parts if p)}], "next": {nxt}}}',
                            content_type="application/json")

    async def get_runtime(self, request: web.Request) -> web.Response:
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        try:
            record = await self.deps.store.get(game_id)
        except NotFound:
            return _error(404, f"no runtime for game {game_id}")
        size, measured = await self.deps.store.state_usage(game_id)
        return web.json_response({**record_json(record), "state_bytes": size,
                                  "state_measured_at": _json_value(measured)})

    async def get_operations(self, request: web.Request) -> web.Response:
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        ops = await self.deps.store.operations(game_id)
        return web.json_response({"operations": [
            {k: _json_value(v) for k, v in dataclasses.asdict(op).items()} for op in ops]})

    async def operation_log(self, request: web.Request) -> web.Response:
        """The operation log of every game and of the version registry, newest first, with who asked:
        ``?before=ID`` pages on (``next`` is the value for the next page), ``game_id``, ``actor``, ``op``
        filter, ``limit`` (1-500, 100)."""
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            before = int(q["before"]) if "before" in q else None
        except ValueError:
            return _error(400, "limit and before must be whole numbers")
        if not 1 <= limit <= MAX_LOG_PAGE or (before is not None and not 0 < before < 2**63):
            return _error(400, f"limit must be 1-{MAX_LOG_PAGE} and before a positive operation id")
        game_id, who, op = q.get("game_id"), q.get("actor"), q.get("op")
        if game_id is not None and not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        if who is not None and not ACTOR_PATTERN.fullmatch(who):
            return _error(400, f"actor must be 1-{MAX_ACTOR} printable ASCII characters without spaces")
        if op is not None and op not in LOG_OPS:
            return _error(400, f"op must be one of {', '.join(LOG_OPS)}")
        entries = await self.deps.store.operation_log(before=before, limit=limit, game_id=game_id, actor=who,
                                                      op=op)
        body: dict[str, Any] = {"operations": [{k: _json_value(v) for k, v in e.items()} for e in entries]}
        body["next"] = entries[-1]["id"] if len(entries) == limit else None
        return web.json_response(body)


async def _unknown() -> None:
    return None


def _answer(answer: tuple[int, dict[str, Any]]) -> web.Response:
    return web.json_response(answer[1], status=answer[0])


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The framework's own refusals under /api/ (no such route, a method not allowed, a body too large)
    are JSON errors, as the API's are."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return web.json_response({"error": exc.reason.lower() if exc.reason else "refused"}, status=exc.status,
                                 headers=headers)


def _error(status: int, message: str, retry_after: bool = False) -> web.Response:
    headers = {"Retry-After": "2"} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _invalid(game_id: str, kind: JobKind, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> web.Response:
    """A job refused before it reached desired state: the job-result shape, HTTP 400."""
    body = JobResult(result_id="", game_id=game_id, outcome=Outcome.FAILURE, job=kind, error_code=code,
                     error_message=message).fields()
    return web.json_response(body, status=400)
