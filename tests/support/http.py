"""A look at an ``rtmanager run`` process over HTTP: a plain GET, and the count of its full resyncs
(``rtmanager_resync_total``), the counter a test waits on to say "after N chances to act"."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

from aiohttp import web


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def resyncs(base: str) -> float:
    _, text = get(f"{base}/metrics")
    m = re.search(r'^rtmanager_resync_total\{result="ok"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def serve_local(path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> tuple[web.AppRunner, int]:
    """``handler`` at GET ``path`` on 127.0.0.1, on a free port: the runner (clean it up) and the port."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
