"""The engine client's kept-alive probe connections (observed/engine.py): reused, bounded, and never
the reason a probe fails when a fresh connection would have succeeded."""

from __future__ import annotations

import asyncio

import pytest

from observed.engine import EngineClient
from observed.errors import EngineUnreachable

OK = b'{"turn": 1, "phase": "idle", "last_generation": null}'


class Engine(asyncio.Protocol):
    """A minimal HTTP/1.1 engine on 127.0.0.1; ``mode`` decides each answer."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = b""

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.t = transport
        self.server.accepted += 1
        self.server.conns.append(transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.server.requests += 1
            mode = self.server.mode
            if mode == "silent":
                return
            body = b"<html>garbage" if mode == "garbage" else self.server.body
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            if mode == "close_after":  # answers, then closes its idle end (a half-close the client sees later)
                self.t.close()


class Server:
    def __init__(self, body: bytes = OK) -> None:
        self.body, self.mode = body, "ok"
        self.accepted = self.requests = 0
        self.conns: list[asyncio.BaseTransport] = []

    async def start(self, port: int = 0) -> int:
        self.srv = await asyncio.get_running_loop().create_server(lambda: Engine(self), "127.0.0.1", port)
        return self.srv.sockets[0].getsockname()[1]

    async def stop(self, *, abort: bool = True) -> None:
        """The engine goes away: its listener and every connection (reset, as a killed process's)."""
        self.srv.close()
        for t in self.conns:
            t.abort() if abort else t.close()  # type: ignore[attr-defined]
        await self.srv.wait_closed()


@pytest.fixture
async def client():
    c = EngineClient(port=0, path="/healthz", attempt_timeout=0.5, admin_timeout=0.5)
    yield c
    await c.close()


async def test_probes_of_one_engine_reuse_one_connection(client):
    s = Server()
    host = f"127.0.0.1:{await s.start()}"
    try:
        for _ in range(5):
            assert (await client.check(host))[0]
            assert (await client.status(host)).turn == 1
        assert s.requests == 10 and s.accepted == 1
    finally:
        await s.stop()


@pytest.mark.parametrize("abort", [True, False])
async def test_an_engine_replaced_at_the_same_address_is_probed_as_itself(client, abort):
    old = Server(b'{"turn": 1, "phase": "idle"}')
    port = await old.start()
    host = f"127.0.0.1:{port}"
    assert (await client.status(host)).turn == 1
    await old.stop(abort=abort)
    new = Server(b'{"turn": 7, "phase": "idle"}')
    await new.start(port)
    try:
        assert (await client.status(host)).turn == 7  # not an error: the dead connection is not the engine
        assert (await client.check(host))[0]
    finally:
        await new.stop()


async def test_an_engine_that_closes_idle_connections_still_answers_every_probe(client):
    s = Server()
    s.mode = "close_after"
    host = f"127.0.0.1:{await s.start()}"
    try:
        for _ in range(4):
            assert (await client.status(host)).turn == 1
            await asyncio.sleep(0)
        assert s.accepted == 4
    finally:
        await s.stop()


async def test_a_gone_engine_still_fails_the_probe(client):
    s = Server()
    host = f"127.0.0.1:{await s.start()}"
    assert (await client.check(host))[0]
    await s.stop()
    ok, detail = await client.check(host)
    assert not ok and detail
    with pytest.raises(EngineUnreachable):
        await client.status(host)


async def test_a_timed_out_or_garbled_answer_fails_that_probe_only(client):
    s = Server()
    host = f"127.0.0.1:{await s.start()}"
    try:
        s.mode = "silent"
        assert not (await client.check(host))[0]
        s.mode = "garbage"
        with pytest.raises(EngineUnreachable):
            await client.status(host)
        s.mode = "ok"
        assert (await client.status(host)).turn == 1  # the silent connection was not reused for an answer
    finally:
        await s.stop()


async def test_the_idle_pool_is_bounded_in_engines():
    c = EngineClient(port=0, path="/healthz", max_idle=2)
    servers = [Server() for _ in range(5)]
    hosts = [f"127.0.0.1:{await s.start()}" for s in servers]
    try:
        for _ in range(2):
            for h in hosts:
                assert (await c.check(h))[0]
        connector = c._http().connector
        assert len(connector._conns) == 2  # type: ignore[union-attr]  # aiohttp's idle pool: the override works
        assert [s.accepted for s in servers] == [1, 1, 2, 2, 2]  # beyond the bound: a fresh connection each
    finally:
        await c.close()
        for s in servers:
            await s.stop()


async def test_a_turn_goes_on_a_fresh_connection(client):
    s = Server(b"")
    host = f"127.0.0.1:{await s.start()}"
    try:
        for _ in range(2):
            assert await client.request_turn(host, 0) is False  # 200: a repeat
        assert s.accepted == 2
    finally:
        await s.stop()
