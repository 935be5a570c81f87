"""The engine proxy (controller/engine_proxy.py) in process: the path normalisation table, the role
table of the gateway, and the pass-through against a small engine of aiohttp's on 127.0.0.1 (headers,
streamed bodies, the body limits, the time limit, a game that is not running)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from controller.access import ROUTE_ROLES, allows
from controller.admission import Admission
from controller.config import HttpSettings
from controller.engine_proxy import PROXY_ROUTE, STATUS_ROUTE, PathRefused, ProxySettings, engine_path
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from controller.tokens import Role
from desired.jobs import ImageAllowlist
from desired.model import DesiredStatus, RuntimeRecord, Status
from observed.engine import EngineClient
from tests.fakes import FakeStore, defaults
from tests.support import eventually

ADMIN_PATH = "/admin/v1"
GATEWAY = "g" * 16 + "-gateway-secret"
READER = "r" * 16 + "-reader-secret"
ADMIN = "a" * 16 + "-admin-secret"
ENGINE_TOKEN = "e" * 32
LIMIT = 100_000
MODE = web.AppKey("mode", dict)


# ------------------------------------------------------------------ the path table

@pytest.mark.parametrize(("tail", "forwarded"), [
    ("", "/"),
    ("games/1/map", "/games/1/map"),
    ("a//b/./c/", "/a/b/c"),
    ("a%20b", None),                       # a space: refused below
    ("caf%C3%A9", "/caf%C3%A9"),
    ("x;v=1", "/x;v=1"),
    ("admin", "/admin"),                   # not the admin path: a sibling
    ("admin/v10", "/admin/v10"),
    ("administrator/v1", "/administrator/v1"),
])
def test_a_plain_path_goes_through_as_checked(tail: str, forwarded: str | None) -> None:
    if forwarded is None:
        with pytest.raises(PathRefused):
            engine_path(tail, ADMIN_PATH)
    else:
        assert engine_path(tail, ADMIN_PATH) == forwarded


ESCAPES = [
    ("admin/v1/status", 403), ("admin/v1", 403), ("admin/v1/", 403), ("ADMIN/V1/turns", 403),
    ("Admin/v1/status", 403), ("/admin/v1/status", 403), ("admin//v1/status", 403), ("./admin/v1/status", 403),
    ("admin/./v1/status", 403), ("%61dmin/v1/status", 403), ("admin%2Fv1/status", 400), ("admin%2fv1/status", 400),
    ("admin%5Cv1/status", 400), ("admin\\v1/status", 400), ("x/../admin/v1/status", 400), ("x/%2E%2E/admin/v1", 400),
    ("%2e%2e/admin/v1", 400), ("x/..;/admin/v1", 400), ("admin;x=1/v1/status", 403), ("admin/v1;x/status", 403),
    ("%2561dmin/v1/status", 400), ("admin%252Fv1/status", 400), ("admin%00/v1/status", 400), ("..", 400),
    ("admin/v1%09/status", 400), ("admin/v1%20/status", 400), ("...", 400),
    # red-team 130: case folded as an engine comparing like Java's equalsIgnoreCase would (a dotless i, a long s
    # where the admin path has them), compatibility forms (full-width letters) folded
    ("adm%C4%B1n/v1/turns", 403), ("%EF%BD%81dmin/v1/status", 403), ("admin/v1/%C5%BFtatus", 403),
    ("adm%C4%B0n/v1/turns", 403),  # a dotted capital I (review 133)
]


@pytest.mark.parametrize(("tail", "status"), ESCAPES)
def test_no_path_reaches_the_admin_api(tail: str, status: int) -> None:
    with pytest.raises(PathRefused) as refused:
        engine_path(tail, ADMIN_PATH)
    assert refused.value.status == status


def test_the_admin_path_is_compared_with_case_folded_as_engines_may() -> None:
    for tail in ("adm\u0131n/v1/turns", "\uff41dmin/v1/status", "admin/v1/\u017ftatus", "adm\u0130n/v1"):
        with pytest.raises(PathRefused):
            engine_path(tail, ADMIN_PATH)
    with pytest.raises(PathRefused):
        engine_path("sys/x", "/\u017fys")  # the admin path's own letters are folded the same way


def test_a_nested_admin_path_is_compared_by_segments() -> None:
    with pytest.raises(PathRefused):
        engine_path("CGI-BIN/admin/v1/turns", "/cgi-bin/admin/v1")
    assert engine_path("cgi-bin/admin/v2/turns", "/cgi-bin/admin/v1") == "/cgi-bin/admin/v2/turns"


# ------------------------------------------------------------------ the roles

def test_the_gateway_reaches_the_pass_through_and_nothing_else() -> None:
    for (method, path), needed in ROUTE_ROLES.items():
        through = path == PROXY_ROUTE.replace("{game_id}", "{game_id}")
        assert allows(Role.GATEWAY, needed) is through, (method, path)
        for role in (Role.READ, Role.OPERATE, Role.ADMIN):
            assert allows(role, needed) is (not through and role >= needed), (role, method, path)
    assert ROUTE_ROLES[("GET", STATUS_ROUTE)] is Role.READ


# ------------------------------------------------------------------ in process

def engine_app(seen: list[dict[str, Any]]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append({"method": request.method, "path": request.raw_path, "headers": dict(request.headers),
                     "body": body})
        return web.json_response({"method": request.method, "path": request.raw_path, "length": len(body)},
                                 headers={"Connection": "close, X-Hop", "X-Hop": "1", "X-Engine": "yes",
                                          "Keep-Alive": "timeout=5"})

    async def status(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {ENGINE_TOKEN}":
            return web.json_response({"error": "no"}, status=401)
        mode = request.app[MODE]["status"]
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "garbage":
            return web.json_response({"turn": -1, "phase": "idle"})
        if mode == "none":
            return web.json_response({"error": "no admin API"}, status=404)
        return web.json_response({"turn": 4, "phase": "idle", "last_generation": {"turn": 4, "ok": True,
                                                                                   "error": ""}})

    async def big(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        for _ in range(LIMIT // 10_000 + 5):
            await out.write(b"x" * 10_000)
        await out.write_eof()
        return out

    async def announced(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * (LIMIT + 1))

    async def slow(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError

    async def stalls(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        await out.write(b"begun")
        await asyncio.Event().wait()
        raise AssertionError

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Engine": "yes"})

    app = web.Application()
    app[MODE] = {"status": "ok"}
    app.router.add_route("DELETE", "/empty", empty)
    app.router.add_get(ADMIN_PATH + "/status", status)
    app.router.add_get("/big", big)
    app.router.add_get("/announced", announced)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stalls", stalls)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class Proxy:
    def __init__(self, tmp_path: Path, engine_port: int) -> None:
        tokens = tmp_path / "tokens"
        tokens.write_text(f"gw gateway {GATEWAY}\nreader read {READER}\nboss admin {ADMIN}\n")
        self.store = FakeStore()
        self.engine_port = engine_port
        self.engine = EngineClient(port=engine_port, path="/healthz", admin_path=ADMIN_PATH, admin_timeout=1.0)
        http = HttpSettings(http_port=0, http_host="127.0.0.1", api_token="", api_tokens_file=str(tokens))

        async def ready() -> dict[str, str]:
            return {}

        self.server = HttpServer(HttpDeps(
            http=http, allowlist=ImageAllowlist("galaxy/engine:*"), store=self.store,  # type: ignore[arg-type]
            admission=Admission(self.store, defaults(), wake=lambda g: None), metrics=Metrics(),
            is_leader=lambda: True, readiness=ready, results_changed=asyncio.Event, engine=self.engine,
            engine_proxy=ProxySettings(admin_path=ADMIN_PATH, max_body=LIMIT, timeout=0.5),
            locate_engine=self.locate))
        self.client = TestClient(TestServer(self.server.app))

    async def locate(self, record: RuntimeRecord) -> str | None:
        return f"127.0.0.1:{self.engine_port}" if record.current_container_id else None

    def game(self, game_id: str, status: Status) -> None:
        now = datetime.now(UTC)
        self.store.records[game_id] = RuntimeRecord(
            game_id=game_id, status=status, current_container_id="c1" if status.is_up else None,
            current_image_ref="galaxy/engine:1", engine_endpoint=f"http://galaxy-game-{game_id}:8080",
            state_path=f"/srv/games/{game_id}", docker_network="galaxy-games", started_at=now, stopped_at=None,
            removed_at=None, last_op_at=now, created_at=now, desired_status=DesiredStatus.RUNNING,
            desired_image_ref="galaxy/engine:1", generation=1, observed_generation=1, admin_token=ENGINE_TOKEN)

    async def raw(self, target: str, token: str = GATEWAY) -> int:
        """The status of a GET of this request target sent byte for byte (no client normalises it)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.client.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        line = await reader.readline()
        writer.close()
        return int(line.split()[1])

    async def call(self, method: str, path: str, token: str = GATEWAY, **kw: Any) -> tuple[int, bytes, Any]:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        async with self.client.request(method, path, headers=headers, skip_auto_headers=["Accept-Encoding"],
                                       **kw) as resp:
            return resp.status, await resp.read(), resp.headers


@pytest.fixture
async def proxy(tmp_path: Path) -> Any:
    seen: list[dict[str, Any]] = []
    engine = TestServer(engine_app(seen), host="127.0.0.1")
    await engine.start_server()
    p = Proxy(tmp_path, engine.port or 0)
    p.seen = seen  # type: ignore[attr-defined]
    p.mode = engine.app[MODE]  # type: ignore[attr-defined]
    p.game("g1", Status.RUNNING)
    await p.client.start_server()
    yield p
    await p.client.close()
    await p.engine.close()
    await engine.close()


async def test_a_get_and_a_post_reach_the_engine_without_the_callers_token(proxy: Proxy) -> None:
    status, body, headers = await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/games/1//map?x=1&y=a%26b",
                                             headers={"Connection": "X-Secret", "X-Secret": "s", "X-Keep": "k",
                                                      "Proxy-Authorization": "p", "TE": "trailers"})
    assert status == 200, body
    assert json.loads(body) == {"method": "GET", "path": "/games/1/map?x=1&y=a%26b", "length": 0}
    assert headers["X-Engine"] == "yes" and "X-Hop" not in headers and "Keep-Alive" not in headers
    sent = proxy.seen[-1]["headers"]  # type: ignore[attr-defined]
    assert sent["X-Keep"] == "k"
    for gone in ("Authorization", "X-Secret", "Proxy-Authorization", "TE"):
        assert gone not in sent, gone
    payload = b"z" * (LIMIT - 1)
    status, body, _ = await proxy.call("POST", "/api/v1/runtimes/g1/engine/proxy/orders", data=payload,
                                       headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(body) == {"method": "POST", "path": "/orders", "length": LIMIT - 1}
    assert proxy.seen[-1]["body"] == payload  # type: ignore[attr-defined]


async def test_the_status_is_the_engines_asked_with_the_games_token(proxy: Proxy) -> None:
    status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g1/engine/status", token=READER)
    assert status == 200, body
    assert json.loads(body) == {"game_id": "g1", "turn": 4, "phase": "idle",
                                "last_generation": {"turn": 4, "ok": True, "error": ""}}
    assert ENGINE_TOKEN.encode() not in body


async def test_the_admin_path_is_refused_before_the_engine_is_asked(proxy: Proxy) -> None:
    for tail, want in ESCAPES:
        assert await proxy.raw(f"/api/v1/runtimes/g1/engine/proxy/{tail}") == want, tail
    # climbing out of the pass-through: refused, or another route, which the gateway may not call
    assert await proxy.raw("/api/v1/runtimes/g1/engine/proxy/../status") in (400, 403)
    assert await proxy.raw("/api/v1/runtimes/g1/engine/proxy/%2E%2E/status") in (400, 403)
    assert not proxy.seen  # type: ignore[attr-defined]


async def test_bodies_over_the_limit_are_refused_or_cut(proxy: Proxy) -> None:
    status, _, _ = await proxy.call("POST", "/api/v1/runtimes/g1/engine/proxy/orders", data=b"z" * (LIMIT + 1))
    assert status == 413

    async def chunks():  # no Content-Length: counted while it streams
        for _ in range(LIMIT // 10_000 + 2):
            yield b"z" * 10_000

    status, _, _ = await proxy.call("POST", "/api/v1/runtimes/g1/engine/proxy/orders", data=chunks())
    assert status == 413
    status, _, _ = await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/announced")
    assert status == 502
    with pytest.raises(aiohttp.ClientPayloadError):  # cut off: never a complete-looking answer
        await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/big")


async def test_a_slow_engine_is_a_504_and_a_stalled_answer_is_cut(proxy: Proxy) -> None:
    status, _, _ = await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/slow")
    assert status == 504
    with pytest.raises(aiohttp.ClientPayloadError):
        await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/stalls")


async def test_only_a_running_game_is_reached(proxy: Proxy) -> None:
    assert (await proxy.call("GET", "/api/v1/runtimes/nope/engine/proxy/x"))[0] == 404
    assert (await proxy.call("GET", "/api/v1/runtimes/nope/engine/status", token=READER))[0] == 404
    for st in (Status.STOPPED, Status.STARTING, Status.ENGINE_UNREACHABLE):
        proxy.game("g2", st)
        status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g2/engine/proxy/x")
        assert status == 409 and json.loads(body)["status"] == st.value, body
    proxy.game("g3", Status.STOPPED)
    status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g3/engine/status", token=READER)
    assert status == 409 and json.loads(body)["status"] == "stopped"


async def test_the_roles_are_enforced_on_the_wire(proxy: Proxy) -> None:
    for token in (READER, ADMIN):
        assert (await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/x", token=token))[0] == 403
        assert (await proxy.call("POST", "/api/v1/runtimes/g1/engine/proxy/x", token=token))[0] == 403
    for method, path in (("GET", "/api/v1/runtimes"), ("GET", "/api/v1/runtimes/g1"),
                         ("GET", "/api/v1/runtimes/g1/engine/status"), ("POST", "/api/v1/runtimes/g1/stop"),
                         ("GET", "/api/v1/events"), ("GET", "/api/v1/openapi.json")):
        assert (await proxy.call(method, path))[0] == 403, (method, path)
    assert not proxy.seen  # type: ignore[attr-defined]


async def test_a_control_character_anywhere_is_refused_not_unrouted(proxy: Proxy) -> None:
    for tail in ("%0A", "a%0Ab", "%0D%0Aadmin/v1/status", "x%7F"):
        status, body, headers = await proxy.call("GET", f"/api/v1/runtimes/g1/engine/proxy/{tail}")
        assert status == 400 and headers["Content-Type"].startswith("application/json"), (tail, status, body)


async def test_a_head_and_an_empty_answer_go_through(proxy: Proxy) -> None:
    status, body, headers = await proxy.call("HEAD", "/api/v1/runtimes/g1/engine/proxy/games/1")
    assert status == 200 and body == b"" and headers["X-Engine"] == "yes", (status, body)
    assert proxy.seen[-1]["method"] == "HEAD"  # type: ignore[attr-defined]
    status, body, headers = await proxy.call("DELETE", "/api/v1/runtimes/g1/engine/proxy/empty")
    assert status == 204 and body == b"" and headers["X-Engine"] == "yes", (status, body)


async def test_what_the_status_says_of_an_engine_that_does_not_answer_well(proxy: Proxy) -> None:
    for mode, want in (("none", 501), ("garbage", 502), ("hang", 504)):
        proxy.mode["status"] = mode  # type: ignore[attr-defined]
        status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g1/engine/status", token=READER)
        assert status == want and "error" in json.loads(body), (mode, status, body)
    proxy.game("g4", Status.RUNNING)
    proxy.store.records["g4"] = dataclasses.replace(proxy.store.records["g4"], admin_token="wrong" * 4)
    proxy.mode["status"] = "ok"  # type: ignore[attr-defined]
    status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g4/engine/status", token=READER)
    assert status == 502 and "refused" in json.loads(body)["error"], body


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
])
async def test_an_engine_status_outside_the_final_ones_is_a_502(tmp_path: Path, answer: bytes) -> None:
    """Red-team, stop 43: the pass-through relayed an engine's 101 (its Upgrade header dropped) and 999 to
    the gateway; a gateway holding a kept-alive connection may take a 101 as an upgraded one. Only a final
    status an HTTP client expects (200-599) goes through."""
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    p = Proxy(tmp_path, server.sockets[0].getsockname()[1])
    p.game("g1", Status.RUNNING)
    await p.client.start_server()
    try:
        status, body, _ = await p.call("GET", "/api/v1/runtimes/g1/engine/proxy/x")
        assert status == 502 and "error" in json.loads(body), (status, body)
    finally:
        await p.client.close()
        await p.engine.close()
        server.close()


async def test_one_games_requests_in_flight_do_not_starve_the_other_games(proxy: Proxy) -> None:
    """Red-team, stop 44: the pass-through had one pool of 256 connections for every engine. One game's
    players (or one hung engine) holding 256 requests on a slow endpoint made every other game's requests
    queue until their deadline: a 504 for a 1 ms answer. A game has at most PER_GAME_IN_FLIGHT requests
    in flight; more are answered 503 with Retry-After at once, and the other games are not held."""
    from controller import engine_proxy

    other = TestServer(engine_app([]), host="127.0.0.1")
    await other.start_server()
    real_locate = proxy.locate

    async def locate(record: RuntimeRecord) -> str | None:  # each game's engine at its own address
        return f"127.0.0.1:{other.port}" if record.game_id == "other" else await real_locate(record)

    routes = proxy.server.engine_routes  # type: ignore[attr-defined]
    routes.locate = locate
    routes.settings = dataclasses.replace(routes.settings, timeout=5.0)
    proxy.game("other", Status.RUNNING)
    try:
        flood = [asyncio.create_task(proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/slow")) for _ in range(300)]
        await asyncio.sleep(0.3)  # every request of the flood is in flight or refused
        status, body, _ = await asyncio.wait_for(proxy.call("GET", "/api/v1/runtimes/other/engine/proxy/games/1"), 2.0)
        assert status == 200, body
        refused = [t.result() for t in flood if t.done()]
        assert len(refused) >= 300 - engine_proxy.PER_GAME_IN_FLIGHT
        assert {s for s, _, _ in refused} == {503}
        assert refused[0][2].get("Retry-After")
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    finally:
        await other.close()


async def test_a_few_slow_games_together_do_not_starve_the_other_games(proxy: Proxy) -> None:
    """Review, stop 44: with a cap of 32 a game, eight slow games still took all 256 connections, and a ninth
    game's 1 ms request waited until its deadline. A game's share shrinks with the number of games that have
    requests under way, so some connections are always left for a game that has none."""
    other = TestServer(engine_app([]), host="127.0.0.1")
    await other.start_server()
    real_locate = proxy.locate

    async def locate(record: RuntimeRecord) -> str | None:
        return f"127.0.0.1:{other.port}" if record.game_id == "other" else await real_locate(record)

    routes = proxy.server.engine_routes  # type: ignore[attr-defined]
    routes.locate = locate
    routes.settings = dataclasses.replace(routes.settings, timeout=5.0)
    from controller import engine_proxy

    slow = [f"s{i}" for i in range(8)]
    for g in [*slow, "other"]:
        proxy.game(g, Status.RUNNING)
    players = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # the players: no pool of their own

    async def ask(game: str) -> int:
        async with players.get(f"http://127.0.0.1:{proxy.client.port}/api/v1/runtimes/{game}/engine/proxy/slow",
                               headers={"Authorization": f"Bearer {GATEWAY}"}) as resp:
            return resp.status

    try:
        flood = [asyncio.create_task(ask(g)) for g in slow for _ in range(40)]
        # every request of the flood under way or refused (in whatever order the games' requests came)
        await eventually(lambda: sum(routes._in_flight.values()) + sum(t.done() for t in flood) >= len(flood), 10.0,
                         interval=0.01)
        status, body, _ = await asyncio.wait_for(proxy.call("GET", "/api/v1/runtimes/other/engine/proxy/games/1"), 2.0)
        assert status == 200, body
        assert sum(routes._in_flight.values()) < engine_proxy.TOTAL_IN_FLIGHT
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    finally:
        await players.close()
        await other.close()


@pytest.mark.parametrize("case", ["many games with one request each", "nine slow games one after another"])
async def test_the_pass_throughs_bounds_hold_under_contention_only(proxy: Proxy, case: str) -> None:
    """Review, stop 44: the share shrank with the number of busy games, not the connections in use: with 127
    games at one request each (129 of 256 in use) a game's third request was refused; and nine slow games
    reached one after another still took all 256, the tenth game refused at once. Each game may have 32
    under way while the pool has room; the last RESERVE connections are for games with fewer than two."""
    from controller import engine_proxy

    routes = proxy.server.engine_routes  # type: ignore[attr-defined]
    routes.settings = dataclasses.replace(routes.settings, timeout=30.0)
    players = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def ask(game: str, path: str = "slow") -> int:
        async with players.get(f"http://127.0.0.1:{proxy.client.port}/api/v1/runtimes/{game}/engine/proxy/{path}",
                               headers={"Authorization": f"Bearer {GATEWAY}"}) as resp:
            return resp.status

    flood: list[asyncio.Task] = []
    try:
        if case == "many games with one request each":
            for i in range(127):
                proxy.game(f"b{i}", Status.RUNNING)
                flood.append(asyncio.create_task(ask(f"b{i}")))
            await eventually(lambda: sum(routes._in_flight.values()) >= 127, 10.0, interval=0.01)
            proxy.game("hot", Status.RUNNING)
            hot = [asyncio.create_task(ask("hot")) for _ in range(3)]
            flood.extend(hot)
            await eventually(lambda: routes._in_flight.get("hot", 0) == 3, 5.0, interval=0.01)  # none refused
        else:
            for i in range(9):
                proxy.game(f"s{i}", Status.RUNNING)
                batch = [asyncio.create_task(ask(f"s{i}")) for _ in range(40)]
                flood.extend(batch)
                await eventually(lambda b=batch, g=f"s{i}": routes._in_flight.get(g, 0) + sum(t.done() for t in b)
                                 >= len(b), 10.0, interval=0.01)
            assert sum(routes._in_flight.values()) <= engine_proxy.TOTAL_IN_FLIGHT - engine_proxy.MIN_SHARE
            proxy.game("other", Status.RUNNING)
            assert await asyncio.wait_for(ask("other", "games/1"), 5.0) == 200
    finally:
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await players.close()


async def test_a_compressed_body_reaches_the_engine_as_it_was_sent(tmp_path: Path) -> None:
    """Red-team 130: the server decompressed request bodies, so the engine got the plain bytes cut to the
    compressed Content-Length, still labelled gzip (or a 502 blaming the engine for a garbled one). Bytes go
    through as they came."""
    import gzip

    got: dict[str, bytes] = {}

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        got["head"], got["body"] = head, await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(engine, "127.0.0.1", 0)
    p = Proxy(tmp_path, srv.sockets[0].getsockname()[1])
    p.game("g1", Status.RUNNING)
    await p.client.start_server()
    try:
        packed = gzip.compress(b'{"orders": [' + b"1," * 5000 + b"1]}")
        status, _, _ = await p.call("POST", "/api/v1/runtimes/g1/engine/proxy/orders", data=packed,
                                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert status == 200 and got["body"] == packed, (status, len(got.get("body", b"")), len(packed))
        assert b"content-encoding: gzip" in got["head"].lower()
    finally:
        await p.client.close()
        await p.engine.close()
        srv.close()


async def test_a_stop_mark_is_read_against_the_databases_clock(proxy: Proxy) -> None:
    """Review 133: the pass-through compared the mark (the database's time) with this host's wall clock; on a
    replica whose clock is behind the database's by more than MARK_AHEAD, every fresh mark read as one from a
    clock gone back, and the pass-through was open during every save."""
    from datetime import timedelta

    from desired.clock import ManualClock

    proxy.store.clock = ManualClock(datetime.now(UTC) + timedelta(seconds=150))  # the database, ahead of us
    rec = proxy.store.records["g1"]
    proxy.store.records["g1"] = rec.replace(stopping_since=proxy.store.clock.now())  # marked just now
    status, body, _ = await proxy.call("GET", "/api/v1/runtimes/g1/engine/proxy/orders")
    assert status == 409 and b"stopping" in body, (status, body)
