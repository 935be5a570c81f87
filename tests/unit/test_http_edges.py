"""Odd requests a red-team reading sent the REST API: each gets a 4xx with a JSON error, never a 5xx,
and an idle or half-sent connection is not held for an hour."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from controller import http as http_module
from controller.admission import Admission
from controller.config import HttpSettings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.jobs import ImageAllowlist
from tests.fakes import FakeStore, defaults

ADMIN, READER = "a" * 32, "r" * 32
H = {"Authorization": f"Bearer {ADMIN}"}
LONG = "0" * 4301 + "1"  # the number 1, in more digits than Python's int() takes from a string


class NoWatch:
    """A stand-in the handlers must not reach: the request is refused before."""


async def _ready() -> dict[str, str]:
    return {}


def server(tmp_path: Path) -> HttpServer:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"boss admin {ADMIN}\nreader read {READER}\n")
    store = FakeStore()
    return HttpServer(HttpDeps(
        http=HttpSettings(http_port=0, http_host="127.0.0.1", api_token="", api_tokens_file=str(tokens)),
        allowlist=ImageAllowlist("galaxy/engine:*"), store=store,  # type: ignore[arg-type]
        admission=Admission(store, defaults(), wake=lambda g: None), metrics=Metrics(),
        is_leader=lambda: True, readiness=_ready, results_changed=asyncio.Event,
        watch=NoWatch(), rollouts=NoWatch()))  # type: ignore[arg-type]


@pytest.fixture
async def client(tmp_path: Path):
    c = TestClient(TestServer(server(tmp_path).app))
    await c.start_server()
    yield c
    await c.close()


async def json_error(resp, status: int) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json", await resp.text()
    return (await resp.json())["error"]


async def test_a_number_in_more_digits_than_int_takes_is_a_bad_parameter(client):
    assert "since" in await json_error(await client.get(f"/api/v1/events?since={LONG}", headers=H), 400)
    assert "since" in await json_error(await client.get("/api/v1/events", headers={**H, "Last-Event-ID": LONG}), 400)
    assert "limit" in await json_error(await client.get(f"/api/v1/runtimes?limit={LONG}", headers=H), 400)
    assert await json_error(await client.get(f"/api/v1/rollouts/{LONG}", headers=H), 400)
    assert await json_error(await client.post(f"/api/v1/rollouts/{LONG}/pause", headers=H), 400)


@pytest.mark.parametrize("bad", [[], {}, ["rollback"], 1, None])
async def test_a_rollouts_on_failure_of_the_wrong_type_is_named(client, bad):
    resp = await client.post("/api/v1/rollouts", headers=H,
                             json={"target_version": "v2", "source_version": "v1", "on_failure": bad})
    assert "on_failure" in await json_error(resp, 400)


async def test_the_bearer_scheme_is_case_insensitive(client):
    for scheme in ("bearer", "BEARER", "Bearer"):
        resp = await client.get("/api/v1/whoami", headers={"Authorization": f"{scheme} {READER}"})
        assert resp.status == 200, scheme
    assert (await client.get("/api/v1/whoami", headers={"Authorization": f"Basic {READER}"})).status == 401


async def test_the_frameworks_own_errors_are_json_too(client):
    assert await json_error(await client.get("/api/v1/nothing", headers=H), 404)
    assert await json_error(await client.delete("/api/v1/runtimes", headers=H), 405)
    big = io.BytesIO(b"x" * (1024 * 1024 + 1))
    assert await json_error(await client.post("/api/v1/rollouts", headers=H, data=big), 413)


async def test_head_of_the_event_stream_is_not_served(client):
    """A HEAD answered with the stream's body would be read by the client as its next response."""
    resp = await client.head("/api/v1/events?since=0&follow=0", headers=H)
    assert resp.status == 405
    assert await resp.read() == b""


async def test_an_idle_or_half_sent_connection_is_closed(tmp_path, monkeypatch):
    """aiohttp's own default keeps a connection that never completes a request for an hour, before any
    token is looked at: enough of them and the controller's own sockets fail for lack of descriptors."""
    monkeypatch.setattr(http_module, "IDLE_TIMEOUT", 0.5)
    s = server(tmp_path)
    await s.start()
    try:
        port = s._runner.addresses[0][1]
        idle = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"GET /api/v1/runtimes HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        for reader, _ in (idle, half):
            await asyncio.wait_for(reader.read(), 10)  # returns at the server's close (TimeoutError: held)
            assert reader.at_eof()
        for _, writer in (idle, half):
            writer.close()
    finally:
        await s.stop()


def test_run_raises_the_soft_open_files_limit_to_the_hard_one():
    import resource

    from controller.cli.commands import raise_open_files_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        raise_open_files_limit()
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert now == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_game_locked_by_another_session_is_not_told_as_the_database_away(tmp_path):
    """A job whose game another session holds locked past the admission's wait (StoreBusy) is that game's: the
    answer says so, and that it may be sent again, instead of "the database is not reachable"."""
    from desired.errors import StoreBusy

    srv = server(tmp_path)
    srv.deps.store.fail_submit = StoreBusy("postgres: LockNotAvailableError: canceling statement due to lock timeout")
    c = TestClient(TestServer(srv.app))
    await c.start_server()
    try:
        resp = await c.post("/api/v1/runtimes/g1/stop?wait=0", headers=H, json={})
        error = await json_error(resp, 503)
        assert resp.headers.get("Retry-After")
        assert "not reachable" not in error
        assert "g1" in error and "lock" in error
    finally:
        await c.close()


class GrowingWatch:
    """The watch store: the snapshots the test appends."""

    def __init__(self) -> None:
        self.events: list = []

    async def unsequenced(self) -> bool:
        return False

    async def sequence(self) -> int:
        return 0

    async def watch_head(self) -> tuple[int, int]:
        return len(self.events), 0

    async def watch_read(self, after, flt, limit=200):
        from desired.watch import WatchPage
        head = len(self.events)
        return WatchPage(after=after, scanned=head, head=head,
                         events=[e for e in self.events if e.position > after][:limit])


@pytest.mark.parametrize("change", ["removed", "its role changed"])
async def test_a_token_taken_out_of_the_file_ends_the_watch_stream_it_opened(tmp_path, change):
    """Red-team, stop 44: a token removed from RTMANAGER_API_TOKENS_FILE was 401 for new requests, but a watch
    stream it had opened went on receiving every snapshot for as long as it kept the connection. The stream
    ends at its next wake once the token it was opened with is no longer in force as it was."""
    import dataclasses as dc

    from desired.watch import WatchEvent

    srv = server(tmp_path)
    watch = GrowingWatch()
    srv.watch.store = watch
    changed = asyncio.Event()
    srv.watch.changed = lambda: changed
    srv.watch.poll = 0.05
    c = TestClient(TestServer(srv.app))
    await c.start_server()
    try:
        resp = await c.get("/api/v1/events", headers={"Authorization": f"Bearer {READER}"})
        assert resp.status == 200
        assert b"event: ready" in await resp.content.readuntil(b"\n\n")
        kept = f"boss admin {ADMIN}\n" + (f"reader admin {READER}\n" if change == "its role changed" else "")
        (tmp_path / "tokens").write_text(kept)
        assert srv.tokens.reload()
        watch.events.append(WatchEvent(position=1, game_id="g1", fields={"game_id": "g1", "status": "running"}))
        changed.set()
        rest = await asyncio.wait_for(resp.content.read(), 3)  # the stream ends
        assert b"snapshot" not in rest
        resp.close()
        # a stream of a token still in force is not ended
        resp = await c.get("/api/v1/events", headers={"Authorization": f"Bearer {ADMIN}"})
        assert b"event: ready" in await resp.content.readuntil(b"\n\n")
        watch.events.append(dc.replace(watch.events[0], position=2))
        changed.set()
        assert b"snapshot" in await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        resp.close()
    finally:
        await c.close()


async def test_a_large_page_of_runtimes_lets_the_loop_run_while_it_is_written(tmp_path, monkeypatch):
    """Red-team, stop 44: a page of 10,000 records (the default for a client that does not page) was turned
    into JSON in one go on the event loop: about a second each, and a few at once held the loop past the
    lease's TTL (the leader stepped down). The page is written in slices, the loop running between them."""
    from datetime import UTC, datetime

    from desired.model import DesiredStatus, RuntimeRecord, Status

    srv = server(tmp_path)
    now = datetime.now(UTC)
    for i in range(2000):
        g = f"game-{i:05d}"
        srv.deps.store.records[g] = RuntimeRecord(
            game_id=g, status=Status.RUNNING, current_container_id="c" * 64, current_image_ref="galaxy/engine:1",
            engine_endpoint=f"http://galaxy-game-{g}:8080", state_path=f"/srv/games/{g}", docker_network="net",
            started_at=now, stopped_at=None, removed_at=None, last_op_at=now, created_at=now,
            desired_status=DesiredStatus.RUNNING, desired_image_ref="galaxy/engine:1", generation=1,
            observed_generation=1)
    ticks, seen = [0], []
    real = http_module.record_json

    def counted(record):
        seen.append(ticks[0])
        return real(record)

    monkeypatch.setattr(http_module, "record_json", counted)

    async def ticker():
        while True:
            await asyncio.sleep(0)
            ticks[0] += 1

    c = TestClient(TestServer(srv.app))
    await c.start_server()
    t = asyncio.create_task(ticker())
    try:
        resp = await c.get("/api/v1/runtimes", headers=H)
        body = await resp.json()
        assert resp.status == 200 and len(body["runtimes"]) == 2000 and body["next"] is None
        assert body["runtimes"][0]["game_id"] == "game-00000"
        assert len(set(seen)) >= 2000 // http_module.JSON_SLICE  # the loop ran between the slices
    finally:
        t.cancel()
        await c.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_compressed_or_garbled_body_is_a_400_not_a_500(client, encoding: str):
    """Red-team 130: aiohttp decompressed request bodies itself, and a body that said gzip and was not raised an
    error no handler caught: a 500 with a traceback on every JSON route. Bodies must come uncompressed."""
    import gzip

    for body in (b"{}", gzip.compress(b"{}")):
        for path in ("/api/v1/rollouts", "/api/v1/admin/engine-versions", "/api/v1/runtimes/g1/start"):
            resp = await client.post(path, data=body, headers={**H, "Content-Encoding": encoding,
                                                               "Content-Type": "application/json"})
            await json_error(resp, 400)


async def test_a_malformed_authorization_line_is_not_written_to_the_log(client, caplog):
    """Red-team 130: aiohttp logged a request it could not parse at ERROR with the parser's error, which quotes
    the line: a token with a stray byte after it went to the log."""
    import logging

    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(f"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\x01\r\n\r\n".encode())
        status = (await reader.readline()).split()[1]
        writer.close()
    assert status == b"400"
    assert ADMIN[:12] not in caplog.text, caplog.text
    assert "not valid HTTP" in caplog.text and not any(r.levelno >= logging.ERROR for r in caplog.records)
