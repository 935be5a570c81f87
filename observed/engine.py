"""The engine client: the health probe and the engine's admin API, over aiohttp.

Engines are untrusted: an answer is read only up to a small bound (an engine
streaming an endless body must not grow the controller), every request has a
timeout, and the answer is validated before it is believed. Errors come out
translated once (``observed.errors``): no answer or a garbled one is
``EngineUnreachable``, 404 on the status path is ``EngineUnsupported`` (an engine
without the admin API), 409 on a turn is ``EngineConflict``, 401 or 403 is ``EngineRefused``
(the engine does not take our admin token).

Every admin call carries ``Authorization: Bearer <token>``, the token rtmanager gave the unit in
``ENGINE_ADMIN_TOKEN`` (none when the unit has no token). The token is a secret: it is never
part of an error message, a log line or a repr.

Admin API (paths under the configured admin path, default ``/admin/v1``)::

    GET  status -> 200 {"turn": int, "phase": "idle"|"generating"|"finished",
                        "last_generation": {"turn": int, "ok": bool, "error": str} | null}
    POST turns {"expected_turn": N} -> 202 generation of N+1 started
                                    -> 200 already at N+1 or later (a repeat)
                                    -> 409 not at turn N, or generating

The compare-and-swap on ``expected_turn`` is what keeps a crash or a redelivery
from advancing a game twice.

The probe goes to the container's IP on the game network when it has one (the
controller may run outside that network, where the hostname does not resolve);
the endpoint reported to Lobby stays the hostname form.

Connections: the GETs (health and status, the health round's probes) reuse a kept-alive connection
per engine, so a round costs about one HTTP round-trip per engine instead of a TCP handshake, a
socket and a teardown each. Why that is safe:

* an engine replaced at the same address (or one that closed its idle end, half-closed): a closed
  connection is dropped from the pool when its EOF arrives; a request that still meets a dead
  connection (reset, or closed before the answer) is retried once on a new connection by aiohttp
  (only for idempotent methods, RFC 9112 section 9.3.1), so a probe fails only when a fresh
  connection fails too, as before;
* a probe that times out closes its connection (aiohttp never returns an unfinished one to the pool);
* per engine: probes of one engine are sequential, so it holds one idle connection from us;
* bounded for thousands of engines: at most ``max_idle`` engines keep an idle connection (the
  rest get a fresh one per probe, the old behaviour), and an idle connection is closed after
  ``keepalive_timeout`` (longer than the health interval, or it would never be reused).

The POST (a turn) always goes on a fresh connection: it is not retried, and a reused connection
that the engine closes at the wrong moment must not turn a started turn into an error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp

from observed.errors import EngineAnswerLost, EngineConflict, EngineRefused, EngineUnreachable, EngineUnsupported
from observed.text import safe_text

HEALTH_BODY_LIMIT = 4096      # bytes of a health answer ever read
ADMIN_BODY_LIMIT = 64 * 1024  # bytes of an admin answer ever read
PHASES = ("idle", "generating", "finished")
MAX_TURN = 2**31 - 1          # the contract: a turn is a 32-bit signed integer, never negative


@dataclass(frozen=True, kw_only=True)
class LastGeneration:
    turn: int
    ok: bool
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class EngineStatus:
    turn: int
    phase: str
    last_generation: LastGeneration | None = None


class BoundedIdleConnector(aiohttp.TCPConnector):
    """A TCPConnector whose idle pool holds connections to at most ``max_idle_hosts`` engines.

    aiohttp's ``limit`` bounds connections in use, not idle ones: with thousands of engines every one
    would keep a socket. Overrides aiohttp's private ``_release`` (checked by
    tests/unit/test_engine_keepalive.py, which fails if an aiohttp upgrade changes it)."""

    def __init__(self, *, max_idle_hosts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_idle_hosts = max_idle_hosts

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        if key not in self._conns and len(self._conns) >= self.max_idle_hosts:
            should_close = True
        super()._release(key, protocol, should_close=should_close)


async def read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes: ``read(n)`` returns what has arrived so far, not n bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# Connections the HTTP surface's own engine client holds at once (an operator's engine status): a few, and never
# the health probes' (controller/app.py gives the surface a client of its own).
OPERATOR_LIMIT = 8


class EngineClient:
    def __init__(self, *, port: int, path: str, admin_path: str = "/admin/v1", attempt_timeout: float = 2.0,
                 admin_timeout: float = 5.0, probe_keepalive: bool = True, max_idle: int = 1024,
                 keepalive_timeout: float = 60.0, limit: int = 64) -> None:
        self.port = port
        self._limit = limit  # connections at once, per session
        self.path = path
        self.admin_path = admin_path.rstrip("/")
        self._attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        # A connect that times out is its own error (ConnectionTimeoutError): the request never left.
        self._admin_timeout = aiohttp.ClientTimeout(total=admin_timeout, sock_connect=min(attempt_timeout,
                                                                                          admin_timeout))
        self._keepalive = probe_keepalive
        self._max_idle = max_idle
        self._keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None   # GETs: kept-alive connections (see above)
        self._fresh: aiohttp.ClientSession | None = None     # the POST: a fresh connection each time

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (BoundedIdleConnector(max_idle_hosts=self._max_idle, limit=self._limit,
                                              keepalive_timeout=self._keepalive_timeout)
                         if self._keepalive else aiohttp.TCPConnector(force_close=True, limit=self._limit))
            self._session = aiohttp.ClientSession(timeout=self._attempt_timeout, read_bufsize=HEALTH_BODY_LIMIT,
                                                  connector=connector)
        return self._session

    def _http_fresh(self) -> aiohttp.ClientSession:
        if self._fresh is None or self._fresh.closed:
            self._fresh = aiohttp.ClientSession(timeout=self._attempt_timeout, read_bufsize=HEALTH_BODY_LIMIT,
                                                connector=aiohttp.TCPConnector(force_close=True, limit=self._limit))
        return self._fresh

    def _netloc(self, address: str) -> str:
        """``host`` (the engine port) or ``host:port`` (a port published on a node)."""
        return address if ":" in address else f"{address}:{self.port}"

    def netloc(self, address: str) -> str:
        """Where an engine at ``address`` (a probe address) answers: ``host:port`` (the engine proxy's)."""
        return self._netloc(address)

    # ------------------------------------------------------------------ health
    async def check(self, host: str) -> tuple[bool, str]:
        """One health attempt: (healthy, detail). The body is never read past a few KiB."""
        url = f"http://{self._netloc(host)}{self.path}"
        try:
            async with self._http().get(url, allow_redirects=False) as resp:
                await resp.content.read(HEALTH_BODY_LIMIT)
                return 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            return False, safe_text(f"{exc.__class__.__name__}: {exc}".strip(": "), 300)

    async def wait_healthy(self, host: str, timeout: float,
                           still_worth_it: Callable[[], Awaitable[bool]] | None = None) -> tuple[bool, str]:
        """Poll until healthy or ``timeout``; ``still_worth_it()`` returning False stops early."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        detail = "no attempt"
        while True:
            ok, detail = await self.check(host)
            if ok:
                return True, detail
            if still_worth_it is not None and not await still_worth_it():
                return False, detail
            left = deadline - loop.time()
            if left <= 0:
                return False, detail
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)

    # --------------------------------------------------------------- admin API
    async def _admin(self, method: str, host: str, what: str, body: dict[str, Any] | None = None, *,
                     token: str = "") -> tuple[int, Any]:
        url = f"http://{self._netloc(host)}{self.admin_path}/{what}"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            http = self._http() if method == "GET" else self._http_fresh()
            async with http.request(method, url, json=body, allow_redirects=False, headers=headers,
                                            timeout=self._admin_timeout) as resp:
                raw = await read_at_most(resp.content, ADMIN_BODY_LIMIT + 1)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            error = f"engine {what}: {exc.__class__.__name__}: {exc}"
            if method != "GET" and _may_have_arrived(exc):
                raise EngineAnswerLost(f"{error} (the engine may have taken the request)") from exc
            raise EngineUnreachable(error) from exc
        if len(raw) > ADMIN_BODY_LIMIT:
            raise EngineUnreachable(f"engine {what}: answer larger than {ADMIN_BODY_LIMIT} bytes")
        if status == 404:
            raise EngineUnsupported(f"the engine has no admin API (404 on {self.admin_path}/{what})")
        if status in (401, 403):
            raise EngineRefused(f"the engine refused rtmanager's admin {what} call (HTTP {status}): it does not take "
                                f"the admin token recorded for it ({'one was sent' if token else 'none was sent'})")
        try:
            data = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):  # not JSON, or nested past the decoder's depth: a bad answer
            data = None
        return status, data

    async def status(self, host: str, *, token: str = "") -> EngineStatus:
        status, data = await self._admin("GET", host, "status", token=token)
        if status != 200:
            raise EngineUnreachable(f"engine status: HTTP {status}")
        return parse_status(data)

    async def request_turn(self, host: str, expected_turn: int, *, token: str = "") -> bool:
        """Ask for turn ``expected_turn + 1``: True when generation started, False when the engine
        was already past it (a repeat). EngineConflict when it is not at that turn or is busy."""
        status, data = await self._admin("POST", host, "turns", {"expected_turn": expected_turn}, token=token)
        if status == 202:
            return True
        if status == 200:
            return False
        if status == 409:
            detail = data.get("error", "") if isinstance(data, dict) else ""
            raise EngineConflict(f"engine refused turn {expected_turn + 1}: {detail or 'conflict'}")
        raise EngineUnreachable(f"engine turns: HTTP {status}")

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()


def _may_have_arrived(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` may have reached the engine: anything but a connection
    that was never made (refused, unreachable, its connect timed out) or a request that could not be
    built."""
    return not isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
                          | aiohttp.InvalidURL | ValueError)


def parse_status(data: Any) -> EngineStatus:
    """Believe an engine's status only when it has the documented shape."""
    def bad(why: str) -> EngineUnreachable:
        return EngineUnreachable(f"engine status: {why}")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    turn, phase = data.get("turn"), data.get("phase")
    if not _is_turn(turn):
        raise bad(f"turn must be an integer from 0 to {MAX_TURN}")
    if phase not in PHASES:
        raise bad(f"phase must be one of {', '.join(PHASES)}")
    last = data.get("last_generation")
    last_gen = None
    if last is not None:
        if not isinstance(last, dict) or not _is_turn(last.get("turn")) or not isinstance(last.get("ok"), bool):
            raise bad("last_generation must be null or {turn, ok, error}")
        last_gen = LastGeneration(turn=last["turn"], ok=last["ok"], error=safe_text(str(last.get("error") or ""), 500))
    return EngineStatus(turn=turn, phase=phase, last_generation=last_gen)


def _is_turn(value: Any) -> TypeGuard[int]:
    """A turn number a record can hold (a 32-bit signed integer, not negative): anything else,
    floats and booleans included, is a garbage answer."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TURN
