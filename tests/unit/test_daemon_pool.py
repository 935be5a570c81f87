"""Reads reach the daemon's socket through one pool of kept-alive connections, whatever the path; a call
that changes something goes out on a connection of its own.

docker-py keys its connection pools by the whole request URL: every container has paths of its own,
so each first call about a container opened a new connection, and past 25 paths the oldest pool's
was closed. A small HTTP server on a Unix socket counts the connections it accepts, and can stop
listening while it still answers the connections it has, as a stopping dockerd does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from observed.daemon import DaemonClient
from observed.errors import BackendUnavailable


class _Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    connections = 0

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.posts: list[str] = []

    def stop_listening(self) -> None:
        """As a stopping dockerd: no new connection, the accepted ones still answered."""
        self.shutdown()
        self.socket.close()
        os.unlink(self.server_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as dockerd

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.endswith("/version"):
            body = json.dumps({"ApiVersion": "1.41", "Version": "20.10.24"}).encode()
            self.send_response(200)
        else:
            body = json.dumps({"message": f"No such container: {self.path}"}).encode()
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.posts.append(self.path)  # type: ignore[attr-defined]
        body = json.dumps({"Id": "c" * 64, "Warnings": []}).encode() if "/containers/create" in self.path else b""
        self.send_response(201 if body else 204)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # asked for (Connection: close): said back and done, as Go's server does
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass

    def address_string(self) -> str:  # a Unix socket's peer has no host
        return "unix"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[_Daemon, str]]:
    path = tmp_path / "docker.sock"
    server = _Daemon(str(path), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"unix://{path}"
    finally:
        if path.exists():
            server.shutdown()
            server.server_close()


def test_calls_about_many_containers_share_the_pooled_connections(daemon: tuple[_Daemon, str]) -> None:
    server, url = daemon
    client = DaemonClient(pool_size=4, timeout=5, observer=None, guard=None, base_url=url)
    api = client._docker().api
    before = server.connections
    for i in range(60):  # one by one, as a reconciler's looks at 60 games: one connection serves them all
        with pytest.raises(Exception, match="No such container"):
            api.inspect_container(f"rtm-game-{i}")
    assert server.connections - before <= 1, f"{server.connections - before} connections for 60 calls"
    client.close()


def test_closing_the_client_closes_the_pool(daemon: tuple[_Daemon, str]) -> None:
    server, url = daemon
    client = DaemonClient(pool_size=2, timeout=5, observer=None, guard=None, base_url=url)
    api = client._docker().api
    with pytest.raises(Exception, match="No such container"):
        api.inspect_container("rtm-game-x")
    adapter = api.get_adapter("http+docker://localhost/v1.41/containers/x/json")
    assert adapter.pools, "the call went through the adapter's pool"
    client.close()
    assert not adapter.pools, "the client's close empties the pool it used"


@pytest.mark.parametrize("again", [False, True], ids=["new paths", "paths called before"])
async def test_a_stopping_daemon_is_sent_no_create_or_start_on_a_connection_it_had(daemon: tuple[_Daemon, str],
                                                                                  again: bool) -> None:
    """A stopping dockerd refuses new connections and still carries out requests on those it has: a create
    or a start sent on a kept-alive connection would make a half-started container that cannot be started
    after the restart. Reads may ride the pool; a call that changes something opens a new connection, also
    on a path it called before (a second start of the same container)."""
    import docker.errors

    server, url = daemon
    client = DaemonClient(pool_size=4, timeout=5, observer=None, guard=None, base_url=url)
    api = client._docker().api
    await client._call("start", api.start, "c1")
    await client._call("create", api.create_container, "galaxy/engine-stub:1.0", name="galaxy-game-g1")
    for i in range(30):  # reads about other containers in between
        with pytest.raises(docker.errors.NotFound):
            await client._call("inspect", api.inspect_container, f"rtm-game-{i}")
    posted = list(server.posts)
    server.stop_listening()
    with pytest.raises(docker.errors.NotFound):  # a read still answered on the pooled connection
        await client._call("inspect", api.inspect_container, "rtm-game-x")
    container, game = ("c1", "galaxy-game-g1") if again else ("c2", "galaxy-game-g2")
    with pytest.raises(BackendUnavailable):
        await client._call("start", api.start, container)
    with pytest.raises(BackendUnavailable):
        await client._call("create", api.create_container, "galaxy/engine-stub:1.0", name=game)
    assert server.posts == posted  # nothing that changes something reached the stopping daemon
    client.close()


async def test_a_mutating_call_that_waited_for_a_thread_past_the_term_is_not_made() -> None:
    """Red-team, stop 44: the fence's guard ran when a call was handed to the daemon's threads, not when a
    thread took it. A stop queued behind busy threads (stops in their grace, a pull) reached the daemon
    after the term lapsed, while the next leader had answered the game's jobs. The guard runs again in the
    thread, just before the call."""
    import threading
    import time

    from desired.leader import Fence, Fenced
    from observed.daemon import DaemonClient

    fence = Fence(instance="i", holder="a", ttl=5.0, epoch=1, deadline=time.monotonic() + 5.0)

    def guard() -> None:
        if not fence.valid_locally:
            raise Fenced("the term lapsed")

    client = DaemonClient(pool_size=1, timeout=5, observer=None, guard=guard)
    busy, ran = threading.Event(), []
    try:
        holding = asyncio.ensure_future(client._call("list", lambda: busy.wait(5)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(client._call("stop", lambda: ran.append("stop")))  # the term is valid
        await asyncio.sleep(0.05)
        fence.deadline = time.monotonic() - 0.01  # the term lapses while the stop waits for a thread
        busy.set()
        await holding
        with pytest.raises(Fenced):
            await queued
        assert ran == []
    finally:
        client.close()
