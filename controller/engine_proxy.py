"""The engine proxy endpoints: one game's engine, reached through rtmanager.

* ``GET /api/v1/runtimes/{game_id}/engine/status`` (role ``read``): what the engine's admin API says
  of itself right now (turn, phase, last generation), asked by rtmanager with the game's admin token,
  which never leaves rtmanager. The answer is validated as the health probe validates it.
* ``/api/v1/runtimes/{game_id}/engine/proxy/{path}`` (GET, HEAD, POST, PUT, PATCH, DELETE; role
  ``gateway`` only): the platform gateway's pass-through to the engine's own (player-facing) endpoints.

The pass-through treats both sides as untrusted:

* the path is normalised from the raw request target before anything is decided: percent-encoded
  slashes and backslashes, NUL and control characters, double encoding and ``..`` segments are
  refused (400); empty and ``.`` segments are dropped; the result is compared with
  RTMANAGER_ENGINE_ADMIN_PATH without regard to case or ``;parameters``, and anything at or under it
  is refused (403). The engine gets exactly the path that was checked;
* headers are forwarded both ways except ``Authorization`` (the gateway's rtmanager token: the
  engine never sees it, nor sends one back), ``Host``, and the hop-by-hop headers (``Connection`` and
  the headers it names, ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``,
  ``Proxy-*``, ``Expect``); ``Content-Length`` is set from the body itself;
* bodies are streamed both ways, never buffered whole; each is bounded by
  RTMANAGER_ENGINE_PROXY_MAX_BODY: a request body over it is refused (413; by its Content-Length
  before the engine is called, or while it streams), an answer announced larger is a 502, an answer
  that grows past it while streaming is cut off (the connection is closed, so the reader sees a
  truncated answer, never a complete-looking one);
* the whole exchange is bounded by RTMANAGER_ENGINE_PROXY_TIMEOUT: no answer's head by then is a
  504; an answer still streaming then is cut off;
* only a game whose engine runs is reached: an unknown game is a 404, a game in any other status a
  409 whose body names the status. The engine is reached as the health probe reaches it (its unit's
  address, or the container's name).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from desired.errors import NotFound
from desired.model import GAME_ID_PATTERN, UP, RuntimeRecord, Status
from desired.ports import SurfaceStore
from desired.transitions import mark_ahead, stop_mark_of
from observed.engine import EngineClient
from observed.errors import EngineError, EngineRefused, EngineUnsupported

log = logging.getLogger("rtmanager.http")

STATUS_ROUTE = "/api/v1/runtimes/{game_id}/engine/status"
PROXY_PREFIX = "/api/v1/runtimes/{game_id}/engine/proxy/"
PROXY_ROUTE = PROXY_PREFIX + "{path}"  # the canonical form (controller/access.py)
PROXY_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# A game whose engine the gateway may reach: up, and not known to be unreachable.
PROXIED: frozenset[Status] = UP - {Status.ENGINE_UNREACHABLE}
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect"})
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "host", "content-length"}
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_SAFE_SEGMENT = "-._~!$&'()*+,;=:@"  # RFC 3986 pchar, less the percent sign


STALE_STOP = timedelta(seconds=3600 + 300)  # the longest stop grace, and room: a mark older is no stop under way


def closed(record: RuntimeRecord, now: datetime | None = None) -> str | None:
    """Why the gateway may not reach the game's engine now, or None: it is not up (or known unreachable), or
    a stop of it is under way (it saves its state on its way out: a request now could be acknowledged and
    lost, or change the state in the middle of the save)."""
    if record.status not in PROXIED:
        return f"game {record.game_id} is {record.status.value}, its engine is not reachable now"
    if stop_under_way(record, datetime.now(UTC) if now is None else now):
        return f"game {record.game_id}: its engine is stopping (saving its state); it takes no more requests"
    return None


def stop_under_way(record: RuntimeRecord, now: datetime) -> bool:
    """The record's mark of a stop of its engine under way, unless it is stale: older than the engine's start
    (a replica of an older version, during a rolling upgrade, started it again without clearing the mark),
    or older than any stop grace (at most an hour) could be, or dated ahead of now by more than clocks part
    (a clock that went back since it was written). ``now`` is the database's clock (``desired/clock.py``),
    as the mark is: this host's wall clock, behind the database's, took every fresh mark for one ahead."""
    since = stop_mark_of(record, record.current_container_id)  # a mark of another unit: not this engine's
    if since is None or (record.started_at is not None and since < record.started_at) or mark_ahead(since, now):
        return False
    return now - since <= STALE_STOP


class PathRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _TooLarge(Exception):
    pass


def _loose(segment: str) -> str:
    # Python's full case mapping turns a dotted capital "İ" into "i" and a combining dot above, where Java's
    # one-character mapping gives "i": the dot is dropped (a path that only differs by it is refused too).
    return unicodedata.normalize("NFKC", segment).upper().lower().replace("\u0307", "")


def engine_path(raw_tail: str, admin_path: str) -> str:
    """The engine path (percent-encoded, starting with ``/``) a raw pass-through tail names, or
    ``PathRefused``: 400 for a path that could mean two things, 403 for one at or under the admin path."""
    if _ENCODED_SEPARATOR.search(raw_tail):
        raise PathRefused(400, "the path must not hold an encoded slash, backslash or NUL")
    if "\\" in raw_tail:
        raise PathRefused(400, "the path must not hold a backslash")
    try:
        decoded = unquote_to_bytes(raw_tail).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRefused(400, "the path must be UTF-8") from None
    if _PERCENT_ESCAPE.search(decoded):
        raise PathRefused(400, "the path must not be percent-encoded twice")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in decoded):
        raise PathRefused(400, "the path must not hold spaces or control characters")
    segments = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue  # a double slash, or "here"
        if segment.split(";", 1)[0] in ("..", ".") or segment.startswith(".."):
            raise PathRefused(400, "the path must not climb with ..")
        segments.append(segment)
    # Compared as a server that ignores case and ;parameters (a Tomcat, a Windows host) would see it, and
    # loosely: compatibility forms folded (a full-width "ａｄｍｉｎ"), case folded as Java's equalsIgnoreCase
    # does (upper, then lower: a dotless "ı" or a long "ſ" meets "i" and "s"), on both sides.
    bare = [_loose(s.split(";", 1)[0]) for s in segments]
    admin = [_loose(s) for s in admin_path.split("/") if s]
    if bare[:len(admin)] == admin:
        raise PathRefused(403, "the engine's admin API is not reachable through the pass-through")
    return "/" + "/".join(quote(s, safe=_SAFE_SEGMENT) for s in segments)


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    admin_path: str      # RTMANAGER_ENGINE_ADMIN_PATH
    max_body: int        # RTMANAGER_ENGINE_PROXY_MAX_BODY: bytes of a request body, and of an answer
    timeout: float       # RTMANAGER_ENGINE_PROXY_TIMEOUT: seconds of a whole exchange


# Requests one game's engine is sent at once through the pass-through: more are answered 503 at once. One game's
# players (or one hung engine) cannot hold the connections every other game's requests need (the total is 256).
PER_GAME_IN_FLIGHT = 32
TOTAL_IN_FLIGHT = 256  # the pass-through's connections (its connector's limit)
RESERVE = 32  # the last connections: only for games with fewer than MIN_SHARE requests under way
MIN_SHARE = 2


def refusal(mine: int, total: int) -> str | None:
    """Why a game with ``mine`` requests under way, ``total`` in all, may not send another now (None: it may).
    Bounded only under contention: while the pool has room a game may have PER_GAME_IN_FLIGHT; its last
    RESERVE connections go to games with fewer than MIN_SHARE, so a few slow games (or hung engines) never
    leave the others nothing."""
    if total >= TOTAL_IN_FLIGHT:
        return f"all {TOTAL_IN_FLIGHT} connections of the pass-through are in use"
    if mine >= PER_GAME_IN_FLIGHT:
        return f"{mine} requests to its engine are under way already"
    if total >= TOTAL_IN_FLIGHT - RESERVE and mine >= MIN_SHARE:
        return (f"{mine} requests to its engine are under way and the pass-through is nearly full "
                f"({total} of {TOTAL_IN_FLIGHT})")
    return None


class EngineRoutes:
    """The two engine routes. ``locate`` is the engine's address for a record (None: its unit is not
    running); without an engine client (a server built for tests of other routes) they answer 503."""

    def __init__(self, store: SurfaceStore, engine: EngineClient | None, settings: ProxySettings | None,
                 locate: Callable[[RuntimeRecord], Awaitable[str | None]] | None) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.locate = locate
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, int] = {}  # game -> pass-through requests under way (PER_GAME_IN_FLIGHT)

    def add(self, app: web.Application) -> None:
        app.router.add_get(STATUS_ROUTE, self.status, allow_head=False)
        route = PROXY_PREFIX + r"{path:[\s\S]*}"  # any path, a newline in it too (refused below)
        app.router.add_get(route, self.pass_through)  # and HEAD
        for method in PROXY_METHODS:
            if method not in ("GET", "HEAD"):
                app.router.add_route(method, route, self.pass_through)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A fresh connection per exchange: nothing is retried, and an engine replaced at the same
            # address never gets another's connection. auto_decompress off: the bytes go through as sent.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True,
                                                                                 limit=TOTAL_IN_FLIGHT),
                                                  auto_decompress=False, read_bufsize=CHUNK,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept",
                                                                     "Content-Type"))
        return self._session

    async def _running(self, request: web.Request,
                       allowed: frozenset[Status]) -> tuple[RuntimeRecord, str] | web.Response:
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        if self.engine is None or self.settings is None or self.locate is None:
            return _error(503, "the engine proxy is not available on this server")
        try:
            record = await self.store.get(game_id)
        except NotFound:
            return _error(404, f"no runtime for game {game_id}")
        if record.status not in allowed:
            return web.json_response({"error": f"game {game_id} is {record.status.value}, its engine is not "
                                               "reachable now", "status": record.status.value}, status=409)
        host = await self.locate(record)
        if host is None:
            return web.json_response({"error": f"game {game_id}: its engine's unit does not run",
                                      "status": record.status.value}, status=409)
        return record, host

    # ------------------------------------------------------------------ admin
    async def status(self, request: web.Request) -> web.Response:
        found = await self._running(request, UP)
        if isinstance(found, web.Response):
            return found
        record, host = found
        assert self.engine is not None
        try:
            st = await self.engine.status(host, token=record.admin_token)
        except EngineUnsupported as exc:
            return _error(501, exc.message)
        except EngineRefused as exc:
            return _error(502, exc.message)
        except EngineError as exc:
            timed_out = isinstance(exc.__cause__, TimeoutError)
            return _error(504 if timed_out else 502, exc.message)
        last = st.last_generation
        return web.json_response({
            "game_id": record.game_id, "turn": st.turn, "phase": st.phase,
            "last_generation": None if last is None else {"turn": last.turn, "ok": last.ok, "error": last.error}})

    # ------------------------------------------------------------ pass-through
    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        if s is None:
            return _error(503, "the engine proxy is not available on this server")
        # The path and the declared size first: a refusal costs neither a database read nor the engine.
        raw_path, _, query = request.raw_path.partition("?")
        marker = "/engine/proxy/"
        at = raw_path.find(marker)  # a game id holds no slash: the first one is ours
        try:
            path = engine_path(raw_path[at + len(marker):] if at >= 0 else "", s.admin_path)
        except PathRefused as exc:
            return _error(exc.status, exc.message)
        size = request.content_length
        if size is not None and size > s.max_body:
            return _error(413, f"the body is larger than {s.max_body} bytes")
        found = await self._running(request, PROXIED)
        if isinstance(found, web.Response):
            return found
        record, host = found
        game = record.game_id
        why = closed(record, self.store.clock.now())  # marks are the database's time: so is now
        if why is not None:
            return web.json_response({"error": why, "status": record.status.value}, status=409)
        why = refusal(self._in_flight.get(game, 0), sum(self._in_flight.values()))
        if why is not None:
            return web.json_response({"error": f"game {game}: {why}; send this again later"}, status=503,
                                     headers={"Retry-After": "1"})
        self._in_flight[game] = self._in_flight.get(game, 0) + 1
        try:
            return await self._exchange(request, s, path, query, size, host)
        finally:
            left = self._in_flight.pop(game) - 1
            if left:
                self._in_flight[game] = left

    async def _exchange(self, request: web.Request, s: ProxySettings, path: str, query: str, size: int | None,
                        host: str) -> web.StreamResponse:
        assert self.engine is not None
        headers = _forwarded(request.headers)
        if size is not None:
            headers["Content-Length"] = str(size)
        over = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal over
            total = 0
            async for chunk in request.content.iter_chunked(CHUNK):
                total += len(chunk)
                if total > s.max_body:
                    over = True
                    raise _TooLarge
                yield chunk

        url = f"http://{self.engine.netloc(host)}{path}" + (f"?{query}" if query else "")
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + s.timeout
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self._http().request(
                    request.method, URL(url, encoded=True), headers=headers, allow_redirects=False,
                    data=body() if request.body_exists else None)
        except TimeoutError:
            return _error(413 if over else 504, f"the body is larger than {s.max_body} bytes" if over
                          else f"the engine did not answer within {s.timeout:g}s")
        except (aiohttp.ClientError, OSError, ValueError, _TooLarge) as exc:
            if over:
                return _error(413, f"the body is larger than {s.max_body} bytes")
            return _error(502, f"the engine could not be reached: {exc.__class__.__name__}")
        try:
            return await self._relay(request, upstream, deadline)
        finally:
            upstream.close()
            log.debug("engine pass-through %s %s: %s in %.3fs", request.method, path, upstream.status,
                      time.monotonic() - started, extra={"game_id": request.match_info["game_id"]})

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     deadline: float) -> web.StreamResponse:
        s = self.settings
        assert s is not None
        if not 200 <= upstream.status <= 599:  # a 1xx (an upgrade, say) or a status no client knows
            return _error(502, f"the engine answered with status {upstream.status}, not a final one")
        length = upstream.content_length
        if length is not None and length > s.max_body:
            return _error(502, f"the engine's answer is larger than {s.max_body} bytes")
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        out.headers.extend(_forwarded(upstream.headers))
        if length is not None:
            out.content_length = length
        await out.prepare(request)
        total = 0
        try:
            async with asyncio.timeout_at(deadline):
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    total += len(chunk)
                    if total > s.max_body:
                        raise _TooLarge
                    await out.write(chunk)
        except (TimeoutError, _TooLarge, aiohttp.ClientError, OSError) as exc:
            # Headers are out: the only honest signal left is a cut connection.
            log.info("engine pass-through cut off after %d bytes: %s", total,
                     "the answer is too large" if isinstance(exc, _TooLarge) else
                     "the time ran out" if isinstance(exc, TimeoutError) else exc.__class__.__name__,
                     extra={"game_id": request.match_info["game_id"]})
            if request.transport is not None:
                request.transport.abort()
            return out
        await out.write_eof()
        return out


def _named_by_connection(headers: Any) -> frozenset[str]:
    return frozenset(t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip())


def _forwarded(headers: Any) -> CIMultiDict[str]:
    named = _named_by_connection(headers)
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in NOT_FORWARDED and name.lower() not in named)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
