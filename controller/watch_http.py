"""The watch API: ``GET /api/v1/events``, every snapshot of every game as Server-Sent Events, in
commit order, resumable, behind the API token like everything under ``/api/v1/`` (controller/http.py
checks it before the handler here runs).

    GET /api/v1/events[?since=P][&game_id=G ...][&status=S ...][&follow=0]
        Last-Event-ID: P    (what a browser's EventSource sends when it reconnects; wins over since)

The stream opens with ``event: ready`` (its ``id`` the position it starts after), then one
``event: snapshot`` per snapshot (``id`` its position, ``data`` the snapshot as on the snapshot
stream), and a ``: keepalive`` comment every ``heartbeat`` seconds (with the position scanned so far
as its ``id`` when a filter skipped snapshots, so that a filtered reader resumes past them).
Without ``since`` the stream starts at the newest position (live only); ``since=0`` replays what
retention kept. A position older than retention kept (RTMANAGER_RETENTION_DAYS of published
snapshots), or one this database never gave, is answered by ``event: reset`` (``id`` where the
stream goes on from): what lay between is gone, re-read ``GET /api/v1/runtimes``. ``follow=0``
sends what is there and ends (for scripts and the schema tests).

Positions are stored in Postgres (desired/db/watch.py), so every replica serves the same stream,
the standby as the leader: a reader resumes on whichever replica it reaches after a failover. The
leader hears its own commits at once (the outbox signal); a standby looks every ``poll`` seconds.

Bounded: at most ``max_clients`` readers per replica (more are answered 503); a reader's data waits
in a small socket and transport buffer, and a write that cannot go out for ``write_timeout``
seconds (a reader that stopped reading) cuts the reader off. Nothing is queued per reader beyond
one page of rows read from Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from controller.metrics import Metrics
from controller.triggers import wait_any
from controller.watch_openapi import MAX_FILTER
from desired.errors import StoreUnavailable
from desired.model import GAME_ID_PATTERN, Status
from desired.ports import WatchStore
from desired.watch import MAX_POSITION, WatchFilter, sse

log = logging.getLogger("rtmanager.watch")

MAX_CLIENTS = 64
PAGE = 200
POLL = 1.0
HEARTBEAT = 15.0
WRITE_TIMEOUT = 10.0
BUFFER = 64 * 1024  # bytes: the transport's high-water mark and the socket's send buffer
# Readers catching up (reading history page after page, a filtered one window after window with nothing to
# send) read one page at a time each and at most this many at once: they share the pool the reconciler and
# the relay use, and a reader from position 0 over a long history would otherwise hold a connection without
# a pause, 64 readers 64 of them.
CATCH_UP_READS = 2


class WatchRoutes:
    def __init__(self, store: WatchStore | None, changed: Callable[[], asyncio.Event], metrics: Metrics, *,
                 in_force: Callable[[web.Request], bool] = lambda request: True) -> None:
        self.store = store
        self.in_force = in_force  # the token a stream was opened with is still in force (checked at every wake)
        self.changed = changed
        self.metrics = metrics
        self.max_clients = MAX_CLIENTS
        self.poll = POLL
        self.heartbeat = HEARTBEAT
        self.write_timeout = WRITE_TIMEOUT
        self.buffer = BUFFER
        self.clients = 0
        self.peak_buffered = 0  # the most bytes one reader's transport held (the tests' bound)
        self._sequencing = asyncio.Lock()  # one sequencing pass at a time in this process
        self._catching_up = asyncio.Semaphore(CATCH_UP_READS)
        self._closing = asyncio.Event()  # the server stops: every stream ends now
        metrics.watch_clients.set_function(lambda: self.clients)

    def add(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/events", self.events, allow_head=False)  # a HEAD would get the stream's body
        app.on_shutdown.append(self._shutdown)  # before the server waits for its handlers to finish

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self.store is None:
            return _error(503, "the watch API is not available on this server")
        parsed = _parse(request)
        if isinstance(parsed, web.Response):
            return parsed
        since, flt, follow = parsed
        if self.clients >= self.max_clients:
            self.metrics.watch_closed.labels("full").inc()
            return _error(503, f"{self.max_clients} readers are watching this replica already", retry_after=True)
        self.clients += 1
        try:
            return await self._stream(request, since, flt, follow)
        finally:
            self.clients -= 1

    async def _sequence(self) -> None:
        """Give committed snapshots their positions (one pass per process at a time, across replicas
        the database's lock)."""
        assert self.store is not None
        if not await self.store.unsequenced():
            return
        async with self._sequencing:
            if await self.store.unsequenced():
                await self.store.sequence()

    async def _stream(self, request: web.Request, since: int | None, flt: WatchFilter,
                      follow: bool) -> web.StreamResponse:
        assert self.store is not None
        await self._sequence()
        head, _ = await self.store.watch_head()
        after = head if since is None else since
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        transport = request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=self.buffer)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.buffer)
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        try:
            await self._send(request, resp, sse("ready", _json({"position": after, "head": head}), after))
            sent = after  # the last id the reader was given
            beat = loop.time() + self.heartbeat
            behind = after < head  # short of the head (at first, or after the last page): catching up
            while True:
                if not self.in_force(request):
                    log.warning("watch stream ended: the token it was opened with is no longer in force")
                    break
                changed = self.changed()  # taken before reading: a commit after the read sets it
                await self._sequence()
                async with self._catching_up if behind else contextlib.nullcontext():
                    page = await self.store.watch_read(after, flt, PAGE)
                if page.reset:
                    log.info("watch reader reset", extra={"since": after, "reason": page.reset})
                    await self._send(request, resp, sse("reset", _json({
                        "reason": page.reset, "since": after, "position": page.scanned, "oldest": page.oldest}),
                        page.scanned))
                    after = sent = page.scanned
                    continue
                for event in page.events:
                    await self._send(request, resp, sse("snapshot", _json(event.fields), event.position))
                    sent = event.position
                after = page.scanned
                behind = page.scanned < page.head
                if behind:
                    if not page.events and after > sent:
                        # Nothing matched in that window: the reader is told how far the scan got (its resume
                        # position), which also makes a reader that does not read wait, as events do.
                        await self._send(request, resp, sse(None, None, after, comment="keepalive"))
                        sent = after
                    continue  # more to read now
                if not follow:
                    break
                if loop.time() >= beat:
                    await self._send(request, resp, sse(None, None, after if after > sent else None,
                                                        comment="keepalive"))
                    sent = max(sent, after)
                    beat = loop.time() + self.heartbeat
                await self._wait(changed, max(0.0, min(self.poll, beat - loop.time())))
                if self._closing.is_set() or transport is None or transport.is_closing():
                    break
        except _CutOff:
            pass
        except (ConnectionResetError, ConnectionError):
            pass  # the reader left
        except StoreUnavailable as exc:  # the headers are sent: end the stream; the reader resumes later
            log.warning("watch stream ended, Postgres is away: %s", exc)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _wait(self, changed: asyncio.Event, timeout: float) -> None:
        """Until a commit, the server's shutdown, or ``timeout``."""
        await wait_any(changed, self._closing, timeout=timeout)

    async def _send(self, request: web.Request, resp: web.StreamResponse, chunk: bytes) -> None:
        try:
            await asyncio.wait_for(resp.write(chunk), self.write_timeout)
        except TimeoutError:
            self.metrics.watch_closed.labels("slow").inc()
            log.warning("watch reader cut off: it has not read for %.0fs", self.write_timeout,
                        extra={"peer": str(request.remote)})
            if request.transport is not None:
                request.transport.abort()
            raise _CutOff from None
        if request.transport is not None:
            self.peak_buffered = max(self.peak_buffered, request.transport.get_write_buffer_size())


class _CutOff(Exception):
    pass


def _parse(request: web.Request) -> tuple[int | None, WatchFilter, bool] | web.Response:
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("since")
    since: int | None = None
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or len(raw) > 20 or int(raw) > MAX_POSITION:
            return _error(400, "since (or Last-Event-ID) must be a position: a whole number from 0")
        since = int(raw)
    games = request.query.getall("game_id", [])
    statuses = request.query.getall("status", [])
    if len(games) > MAX_FILTER or len(statuses) > MAX_FILTER:
        return _error(400, f"at most {MAX_FILTER} game_id and {MAX_FILTER} status values")
    bad = [g for g in games if not GAME_ID_PATTERN.fullmatch(g)]
    if bad:
        return _error(400, "game_id does not match the pattern")
    known = {s.value for s in Status}
    if any(s not in known for s in statuses):
        return _error(400, f"status must be one of {', '.join(sorted(known))}")
    follow = request.query.get("follow", "1")
    if follow not in ("0", "1"):
        return _error(400, "follow must be 0 or 1")
    return since, WatchFilter(game_ids=frozenset(games), statuses=frozenset(statuses)), follow == "1"


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _error(status: int, message: str, retry_after: bool = False) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"Retry-After": "2"} if retry_after else None)
