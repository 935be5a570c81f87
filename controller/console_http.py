"""The console: ``/ui``, a page of plain HTML, CSS and JavaScript shipped in the package
(controller/console/), served by every replica.

The files themselves are public (they hold no data); everything the page shows comes from the REST
API with the token the operator types in (kept in the tab's sessionStorage, sent as a Bearer header,
never in a URL). Every answer under ``/ui`` carries a strict Content-Security-Policy: scripts, styles
and connections only from this origin, no inline script or style, no frames, no forms posted away.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent / "console"
FILES = {  # name -> content type: nothing else under /ui is served
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class ConsoleRoutes:
    def __init__(self, root: Path = ROOT) -> None:
        # Read once: a handful of small files, the same for the life of the process.
        self.files = {name: (root / name).read_bytes() for name in FILES}

    def add(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.index)
        app.router.add_get("/ui/", self.index)
        app.router.add_get("/ui/{name}", self.asset)

    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES:
            return web.Response(status=404, text="not found", headers=HEADERS)
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(body=self.files[name], headers={**HEADERS, "Content-Type": FILES[name]})
