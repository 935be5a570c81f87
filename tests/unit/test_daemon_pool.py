"""The daemon's socket is reached through one pool of kept-alive connections, whatever the path.

docker-py keys its connection pools by the whole request URL: every container has paths of its own,
so each first call about a container opened a new connection, and past 25 paths the oldest pool's
was closed. A small HTTP server on a Unix socket counts the connections it accepts.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from observed.daemon import DaemonClient


class _Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    connections = 0


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
