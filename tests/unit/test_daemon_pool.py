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


class _Mute(_Handler):
    """Takes a POST and hangs up without an answer: the daemon may have carried it out."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.server.posts.append(self.path)  # type: ignore[attr-defined]
        self.close_connection = True


@pytest.mark.parametrize("socket", ["missing", "not listening"])
async def test_a_stop_the_daemon_never_got_says_so(tmp_path: Path, socket: str) -> None:
    """Stop 46: a stop whose connection dockerd refused (its socket gone or not listening: a daemon
    restarting) raised the same error as a stop whose answer was lost, so the reconciler kept a stop mark
    for a SIGTERM that never went out (the pass-through closed, the next signal held back a grace)."""
    import socket as sockets

    from observed.docker import DockerBackend
    from observed.errors import NotSent

    path = tmp_path / "docker.sock"
    if socket == "not listening":
        s = sockets.socket(sockets.AF_UNIX)
        s.bind(str(path))
        s.close()
    backend = DockerBackend(instance="i", network="n", pool_size=1, timeout=5)
    backend._base_url = f"unix://{path}"
    try:
        with pytest.raises(NotSent):
            await backend.stop("c" * 64, 10)
    finally:
        backend.close()


async def test_a_stop_whose_answer_was_lost_is_not_taken_for_one_never_sent(tmp_path: Path) -> None:
    from observed.docker import DockerBackend
    from observed.errors import NotSent

    path = tmp_path / "docker.sock"
    server = _Daemon(str(path), _Mute)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = DockerBackend(instance="i", network="n", pool_size=1, timeout=5)
    backend._base_url = f"unix://{path}"
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await backend.stop("c" * 64, 10)
        assert not isinstance(raised.value, NotSent), raised.value
        assert any(p.endswith("/stop?t=10") for p in server.posts), server.posts  # it did reach the daemon
    finally:
        backend.close()
        server.shutdown()
        server.server_close()


async def test_a_removal_after_its_stop_went_out_is_not_one_never_sent(tmp_path: Path) -> None:
    """The stop's SIGTERM went out, then the daemon went away before the removal: no call of the removal's
    may say that nothing was sent (the stop mark would be cleared while the engine may be saving)."""
    from observed.docker import DockerBackend
    from observed.errors import NotSent
    from observed.swarm import SwarmBackend

    docker_backend = DockerBackend(instance="i", network="n", pool_size=1, timeout=5)
    docker_backend._base_url = f"unix://{tmp_path / 'gone.sock'}"

    async def stopped(unit_id: str, grace: float) -> None:
        return None

    docker_backend.stop = stopped  # type: ignore[method-assign]
    swarm = SwarmBackend(instance="i", network="n", pool_size=1, timeout=5, base_url=f"unix://{tmp_path / 'gone.sock'}")
    service = {"ID": "s" * 25, "Spec": {"Name": "galaxy-game-g1", "Mode": {"Replicas": {"Replicas": 1}},
                                        "Labels": {}, "TaskTemplate": {"ContainerSpec": {}}}}

    async def read(unit_id: str):
        return service, []

    async def updated(unit_id: str, change) -> None:
        return None

    swarm._read = read  # type: ignore[method-assign]
    swarm._update = updated  # type: ignore[method-assign]
    try:
        for call in (docker_backend.remove("c" * 64, 10), swarm.stop("s" * 25, 10), swarm.remove("s" * 25, 10)):
            with pytest.raises(BackendUnavailable) as raised:
                await call
            assert not isinstance(raised.value, NotSent), raised.value

        async def refused(unit_id: str, change) -> None:  # the scale-down itself never reached the manager
            raise NotSent("swarm update: connection refused")

        swarm._update = refused  # type: ignore[method-assign]
        with pytest.raises(NotSent):
            await swarm.stop("s" * 25, 10)
    finally:
        docker_backend.close()
        swarm.close()
