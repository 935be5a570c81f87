"""The REST commands of the CLI (controller/cli/runtimes.py) against servers on 127.0.0.1.

Reads go to the real HTTP surface (controller/http.py) over the in-memory store, so the pages and
filters are the server's own; jobs go to a fake server that records what it was asked and answers
what each case needs (success, failure, 202, 400, 503). No services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.admission import Admission
from controller.cli.commands import build_parser
from controller.cli.runtimes import PENDING, rest_command
from controller.config import HttpSettings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.jobs import ImageAllowlist, RecordDefaults
from desired.model import DesiredStatus, Status
from desired.paging import MAX_PAGE, InvalidPage, decode_cursor, encode_cursor, parse_page
from tests.fakes import FakeStore
from tests.support.planning import record

TOKEN = "t" * 32


async def _ready() -> dict[str, str]:
    return {}


class SurfaceFake(FakeStore):
    async def state_usage(self, game_id: str) -> tuple[None, None]:
        return None, None


def _store(n: int) -> FakeStore:
    store = SurfaceFake()
    for i in range(n):
        game = f"g{i:03d}"
        status = Status.RUNNING if i % 3 else Status.STOPPED
        desired = DesiredStatus.RUNNING if i % 3 else DesiredStatus.STOPPED
        store.records[game] = dataclasses.replace(
            record(status, desired), game_id=game, state_path=f"/var/lib/rtmanager/games/{game}",
            engine_version="1.1" if i % 2 else "1.0", node_id="n1" if i < n // 2 else "n2")
    return store


@pytest.fixture
async def reads():
    store = _store(25)
    deps = HttpDeps(http=HttpSettings(http_port=0, http_host="127.0.0.1", api_token=TOKEN),
                    allowlist=ImageAllowlist("galaxy/*"), store=store,
                    admission=Admission(store, RecordDefaults(docker_network="n", state_root="/s", engine_port=8080),
                                        wake=lambda game: None),
                    metrics=Metrics(), is_leader=lambda: True, readiness=_ready, results_changed=asyncio.Event)
    server = TestServer(HttpServer(deps).app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), store
    finally:
        await server.close()


class Canned:
    """A fake REST API: records each request, answers ``(status, body)`` from ``answers`` by path."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answers: dict[str, tuple[int, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                          "body": body, "auth": request.headers.get("Authorization")})
        status, answer = self.answers.get(request.path, (404, {"error": "no such game"}))
        return web.json_response(answer, status=status)


@pytest.fixture
async def canned():
    fake = Canned()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), fake
    finally:
        await server.close()


async def cli(capsys, url: str, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    args = build_parser().parse_args([argv[0], "--url", url, *argv[1:]])
    code = await rest_command(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("RTMANAGER_API_TOKEN", TOKEN)


# ------------------------------------------------------------------ pages: the pure part
def test_a_cursor_round_trips_and_only_this_servers_cursors_are_taken():
    assert decode_cursor(encode_cursor("game-7")) == "game-7"
    for bad in ("", "!!!", encode_cursor("game-7")[:-2] + "zz", "Zzox", "Z2FtZS03"):  # the last: no prefix
        with pytest.raises(InvalidPage, match="cursor"):
            decode_cursor(bad)


def test_the_page_parameters_are_checked_and_default_to_the_largest_page():
    assert parse_page({}).limit == MAX_PAGE and parse_page({}).after is None
    page = parse_page({"status": "running", "engine_version": "1.1", "node": "n1", "limit": "5",
                       "cursor": encode_cursor("g1")})
    assert (page.filter.status, page.filter.engine_version, page.filter.node, page.limit, page.after) == (
        Status.RUNNING, "1.1", "n1", 5, "g1")
    for query, name in (({"limit": "0"}, "limit"), ({"limit": str(MAX_PAGE + 1)}, "limit"), ({"limit": "x"}, "limit"),
                        ({"limit": "٣"}, "limit"), ({"status": "bogus"}, "status"), ({"engine_version": "a b"},
                        "engine_version"), ({"node": ""}, "node"), ({"node": "x" * 129}, "node")):
        with pytest.raises(InvalidPage, match=name):
            parse_page(query)


# ------------------------------------------------------------------ reads through the real surface
async def test_runtimes_walks_every_page_and_prints_a_table(reads, capsys):
    url, store = reads
    code, out, err = await cli(capsys, url, "runtimes", "--page-size", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["GAME", "STATUS", "DESIRED"]
    assert [line.split()[0] for line in lines[1:]] == sorted(store.records)


async def test_runtimes_json_keeps_the_answers_shape_and_says_where_to_continue(reads, capsys):
    url, store = reads
    code, out, err = await cli(capsys, url, "runtimes", "--limit", "7", "--page-size", "3", "--json")
    assert code == 0, err
    body = json.loads(out)
    assert [r["game_id"] for r in body["runtimes"]] == sorted(store.records)[:7]
    assert decode_cursor(body["next"]) == sorted(store.records)[6]
    code, out, err = await cli(capsys, url, "runtimes", "--cursor", body["next"], "--json")
    assert [r["game_id"] for r in json.loads(out)["runtimes"]] == sorted(store.records)[7:]
    assert json.loads(out)["next"] is None
    code, out, err = await cli(capsys, url, "runtimes", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3 and "rtmanager runtimes --cursor " in err


async def test_runtimes_filters_by_status_engine_version_and_node(reads, capsys):
    url, store = reads
    code, out, err = await cli(capsys, url, "runtimes", "--status", "running", "--engine-version", "1.1",
                               "--node", "n2", "--page-size", "2", "--json")
    assert code == 0, err
    want = sorted(g for g, r in store.records.items()
                  if r.status is Status.RUNNING and r.engine_version == "1.1" and r.node_id == "n2")
    assert want and [r["game_id"] for r in json.loads(out)["runtimes"]] == want


async def test_bad_list_parameters_exit_2_with_one_line(reads, capsys):
    url, _ = reads
    for argv in (("runtimes", "--status", "bogus"), ("runtimes", "--cursor", "nonsense"),
                 ("runtimes", "--page-size", "0")):
        code, out, err = await cli(capsys, url, *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("rtmanager runtimes: "), err


async def test_runtime_and_operations_show_one_game_and_an_unknown_one_exits_1(reads, capsys):
    url, _ = reads
    code, out, err = await cli(capsys, url, "runtime", "g001")
    assert code == 0 and out.splitlines()[0] == "g001" and "  status: running" in out
    code, out, _ = await cli(capsys, url, "runtime", "g001", "--json")
    assert json.loads(out)["game_id"] == "g001"
    code, out, err = await cli(capsys, url, "runtime", "nope")
    assert code == 1 and err == "rtmanager runtime: no runtime for game nope (HTTP 404)\n"
    code, out, err = await cli(capsys, url, "operations", "g001", "--json")
    assert code == 0 and json.loads(out) == {"operations": []}
    code, out, err = await cli(capsys, url, "operations", "g001")
    assert code == 0 and out.split()[:3] == ["ID", "OP", "SOURCE"]


async def test_a_wrong_token_or_no_server_is_one_line_and_exit_1(reads, capsys, monkeypatch, tmp_path):
    url, _ = reads
    monkeypatch.setenv("RTMANAGER_API_TOKEN", "w" * 32)
    code, _, err = await cli(capsys, url, "runtimes")
    assert code == 1 and err == "rtmanager runtimes: missing or wrong bearer token (HTTP 401)\n"
    (tmp_path / "token").write_text(TOKEN + "\n")
    code, _, err = await cli(capsys, url, "runtimes", "--token-file", str(tmp_path / "token"))
    assert code == 0, err
    monkeypatch.delenv("RTMANAGER_API_TOKEN")
    code, _, err = await cli(capsys, url, "runtimes")
    assert code == 2 and "RTMANAGER_API_TOKEN" in err
    monkeypatch.setenv("RTMANAGER_API_TOKEN", TOKEN)
    code, _, err = await cli(capsys, "http://127.0.0.1:9", "restart", "g1")
    assert code == 1 and err.startswith("rtmanager restart: cannot reach http://127.0.0.1:9") and err.count("\n") == 1


# ------------------------------------------------------------------ jobs and writes against a fake
SUCCESS = {"result_id": "r1", "game_id": "g1", "outcome": "success", "job": "restart", "container_id": "c" * 64,
           "engine_endpoint": "http://galaxy-game-g1:8080", "error_code": "", "error_message": "", "operation_id": 7}


@pytest.mark.parametrize(("argv", "path", "body"), [
    (("start", "g1", "galaxy/engine:1", "--turn-interval", "60"), "start",
     {"image_ref": "galaxy/engine:1", "turn_interval": 60}),
    (("stop", "g1", "--reason", "cancelled", "--force"), "stop", {"reason": "cancelled", "force": True}),
    (("restart", "g1"), "restart", {}),
    (("patch", "g1", "galaxy/engine:2", "--force"), "patch", {"image_ref": "galaxy/engine:2", "force": True}),
    (("cleanup", "g1"), "cleanup", {}),
    (("pause", "g1"), "pause", {}),
    (("resume", "g1"), "resume", {}),
    (("force-next-turn", "g1"), "force-next-turn", {}),
    (("reconcile", "g1"), "reconcile", {}),
])
async def test_every_job_posts_its_body_with_the_token_and_prints_the_result(canned, capsys, argv, path, body):
    url, fake = canned
    fake.answers[f"/api/v1/runtimes/g1/{path}"] = (200, {**SUCCESS, "job": path})
    code, out, err = await cli(capsys, url, *argv, "--wait", "5")
    assert code == 0, err
    assert fake.seen == [{"method": "POST", "path": f"/api/v1/runtimes/g1/{path}", "query": {"wait": "5"},
                          "body": body, "auth": f"Bearer {TOKEN}"}]
    assert out == f"g1 {path}: success  container={'c' * 12}  endpoint=http://galaxy-game-g1:8080  operation=7\n"


async def test_job_answers_map_to_exit_codes(canned, capsys):
    url, fake = canned
    path = "/api/v1/runtimes/g1/restart"
    fake.answers[path] = (200, {**SUCCESS, "outcome": "failure", "error_code": "engine_unreachable",
                                "error_message": "no answer"})
    code, out, err = await cli(capsys, url, "restart", "g1")
    assert code == 1 and out == "" and "error_code=engine_unreachable" in err and err.count("\n") == 1
    fake.answers[path] = (202, {"operation_id": 8, "status": "pending", "game_id": "g1", "job": "restart"})
    code, out, err = await cli(capsys, url, "restart", "g1", "--wait", "0")
    assert code == PENDING and "operation 8" in out and "results stream" in out
    fake.answers[path] = (400, {**SUCCESS, "outcome": "failure", "error_code": "invalid_request",
                                "error_message": "field force must be a boolean", "result_id": ""})
    code, out, err = await cli(capsys, url, "restart", "g1")
    assert code == 2 and err == "rtmanager restart: g1: field force must be a boolean (HTTP 400)\n"
    fake.answers[path] = (503, {"error": "this replica is a standby; send jobs to the leader"})
    code, out, err = await cli(capsys, url, "restart", "g1", "--json")
    assert code == 1 and json.loads(out)["error"].startswith("this replica") and "standby" in err
    fake.answers[path] = (200, SUCCESS)
    code, out, _ = await cli(capsys, url, "restart", "g1", "--json")
    assert code == 0 and json.loads(out) == SUCCESS


async def test_schedule_and_resync(canned, capsys):
    url, fake = canned
    fake.answers["/api/v1/runtimes/g1/schedule"] = (200, {"game_id": "g1", "turn_interval": 90})
    code, out, err = await cli(capsys, url, "schedule", "g1", "90")
    assert code == 0 and out == "g1: turn interval 90s\n"
    assert fake.seen[-1]["method"] == "PUT" and fake.seen[-1]["body"] == {"turn_interval": 90}
    fake.answers["/api/v1/snapshots/resync"] = (200, {"snapshots": 3})
    code, out, err = await cli(capsys, url, "resync", "g1")
    assert code == 0 and out == "3 snapshots published\n" and fake.seen[-1]["query"] == {"game_id": "g1"}
    code, out, err = await cli(capsys, url, "resync", "--json")
    assert json.loads(out) == {"snapshots": 3} and fake.seen[-1]["query"] == {}
    fake.answers["/api/v1/runtimes/g1/schedule"] = (409, {"error": "game g1 is removed"})
    code, out, err = await cli(capsys, url, "schedule", "g1", "90")
    assert code == 1 and err == "rtmanager schedule: game g1 is removed (HTTP 409)\n"
