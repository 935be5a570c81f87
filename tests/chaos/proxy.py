"""A unix-socket proxy in front of a dockerd: the controllers' DOCKER_HOST, so that the harness can
cut their Docker event streams (as a daemon restart or a network hiccup would) without touching
the daemon. Byte for byte otherwise: every client connection gets its own upstream connection,
and when the daemon goes away (a restart) its clients see the connection end, as they would
without the proxy."""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import threading
from pathlib import Path

EVENTS_REQUEST = re.compile(rb"(?:^|\r\n)(?:GET|POST) /(?:v[0-9.]+/)?events(?:[?\s])")


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.events = False

    def cut(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class DockerSocketProxy:
    def __init__(self, upstream: str | Path, path: str | Path) -> None:
        self.upstream = str(upstream)
        self.path = Path(path)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: socket.socket | None = None
        self.cuts = 0

    @property
    def host(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> DockerSocketProxy:
        self.path.unlink(missing_ok=True)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(128)
        threading.Thread(target=self._accept, name="docker-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.cut()
        self.path.unlink(missing_ok=True)

    def cut_events(self) -> int:
        """End every open event stream; returns how many were cut."""
        with self._lock:
            victims = [c for c in self._conns if c.events]
        for c in victims:
            c.cut()
        self.cuts += len(victims)
        return len(victims)

    def open_event_streams(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.events)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:  # the daemon is away: the client sees its connection end at once
            upstream.close()
            client.close()
            return
        conn = _Conn(client, upstream)
        with self._lock:
            self._conns.add(conn)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    if src is client and not conn.events and EVENTS_REQUEST.search(data):
                        conn.events = True
                    try:
                        key.data.sendall(data)
                    except OSError:
                        return
        finally:
            sel.close()
            with self._lock:
                self._conns.discard(conn)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
