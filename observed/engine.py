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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp

from observed.errors import EngineConflict, EngineRefused, EngineUnreachable, EngineUnsupported
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


class EngineClient:
    def __init__(self, *, port: int, path: str, admin_path: str = "/admin/v1", attempt_timeout: float = 2.0,
                 admin_timeout: float = 5.0) -> None:
        self.port = port
        self.path = path
        self.admin_path = admin_path.rstrip("/")
        self._attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._admin_timeout = aiohttp.ClientTimeout(total=admin_timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: each probe is a fresh connection, as a new client would make.
            self._session = aiohttp.ClientSession(
                timeout=self._attempt_timeout, read_bufsize=HEALTH_BODY_LIMIT,
                connector=aiohttp.TCPConnector(force_close=True, limit=64))
        return self._session

    def _netloc(self, address: str) -> str:
        """``host`` (the engine port) or ``host:port`` (a port published on a node)."""
        return address if ":" in address else f"{address}:{self.port}"

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
            async with self._http().request(method, url, json=body, allow_redirects=False, headers=headers,
                                            timeout=self._admin_timeout) as resp:
                raw = await resp.content.read(ADMIN_BODY_LIMIT + 1)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise EngineUnreachable(f"engine {what}: {exc.__class__.__name__}: {exc}") from exc
        if len(raw) > ADMIN_BODY_LIMIT:
            raise EngineUnreachable(f"engine {what}: answer larger than {ADMIN_BODY_LIMIT} bytes")
        if status == 404:
            raise EngineUnsupported(f"the engine has no admin API (404 on {self.admin_path}/{what})")
        if status in (401, 403):
            raise EngineRefused(f"the engine refused rtmanager's admin {what} call (HTTP {status}): it does not take "
                                f"the admin token recorded for it ({'one was sent' if token else 'none was sent'})")
        try:
            data = json.loads(raw) if raw.strip() else None
        except ValueError:
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
        if self._session is not None:
            await self._session.close()


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
