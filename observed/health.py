"""The engine health probe: ``GET {health_path}`` until a 2xx or the deadline.

The probe goes to the container's IP on the game network when it has one (the
controller may run outside that network, where the hostname does not resolve);
the endpoint reported to Lobby stays the hostname form.
"""

from __future__ import annotations

import asyncio

import aiohttp


class HealthProbe:
    def __init__(self, *, port: int, path: str, attempt_timeout: float = 2.0) -> None:
        self.port = port
        self.path = path
        self._attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: each probe is a fresh connection, as a new client would make.
            self._session = aiohttp.ClientSession(
                timeout=self._attempt_timeout,
                connector=aiohttp.TCPConnector(force_close=True, limit=64))
        return self._session

    async def check(self, host: str) -> tuple[bool, str]:
        """One attempt: (healthy, detail)."""
        url = f"http://{host}:{self.port}{self.path}"
        try:
            async with self._http().get(url, allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return False, f"{exc.__class__.__name__}: {exc}".strip(": ")

    async def wait_healthy(self, host: str, timeout: float, still_worth_it=None) -> tuple[bool, str]:
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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
