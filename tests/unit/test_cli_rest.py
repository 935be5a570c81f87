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
from controller.cli.admin_rest import admin_command
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
    deps = HttpDeps(http=HttpSettings(http_port=0, http_host="127.0.0.1", api_token=TOKEN, api_tokens_file=""),
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
        status, answer = self.answers.get(f"{request.method} {request.path}",
                                          self.answers.get(request.path, (404, {"error": "no such game"})))
        if status == 204:
            return web.Response(status=204)
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


# ------------------------------------------------------------------ --api: versions, drains, rollouts
async def admin(capsys, url: str, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    args = build_parser().parse_args([*argv, "--api", "--url", url])
    code = await admin_command(args)
    out, err = capsys.readouterr()
    return code, out, err


VERSION = {"id": 1, "version": "1.1", "image_ref": "galaxy/engine:1.1", "status": "active", "notes": "new\nmore",
           "stop_grace": None, "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00",
           "image_present": True}


async def test_versions_through_the_api(canned, capsys):
    url, fake = canned
    path = "/api/v1/admin/engine-versions"
    fake.answers[f"GET {path}"] = (200, {"engine_versions": [VERSION]})
    code, out, err = await admin(capsys, url, "versions", "list", "--status", "active")
    assert code == 0 and out.split("\n")[1].split() == ["1.1", "active", "galaxy/engine:1.1", "default", "yes", "new"]
    assert fake.seen[-1]["query"] == {"status": "active"} and fake.seen[-1]["auth"] == f"Bearer {TOKEN}"
    code, out, _ = await admin(capsys, url, "versions", "list", "--json")
    assert json.loads(out) == {"engine_versions": [VERSION]}
    fake.answers[f"POST {path}"] = (201, VERSION)
    code, out, err = await admin(capsys, url, "versions", "add", "1.1", "galaxy/engine:1.1", "--pull",
                                 "--stop-grace", "30", "--notes", "new")
    assert code == 0 and out == "1.1: galaxy/engine:1.1 (active)\n"
    assert fake.seen[-1]["query"] == {"pull": "1"} and fake.seen[-1]["body"] == {
        "version": "1.1", "image_ref": "galaxy/engine:1.1", "notes": "new", "stop_grace": 30}
    fake.answers[f"PATCH {path}/1.1"] = (200, {**VERSION, "status": "deprecated"})
    code, out, _ = await admin(capsys, url, "versions", "deprecate", "1.1")
    assert (code, out, fake.seen[-1]["body"]) == (0, "1.1: deprecated\n", {"status": "deprecated"})
    fake.answers[f"PATCH {path}/1.1"] = (200, VERSION)
    code, out, _ = await admin(capsys, url, "versions", "stop-grace", "1.1", "default")
    assert (code, out, fake.seen[-1]["body"]) == (0, "1.1: stop grace RTMANAGER_STOP_GRACE\n", {"stop_grace": None})
    fake.answers[f"DELETE {path}/1.1"] = (204, None)
    code, out, _ = await admin(capsys, url, "versions", "remove", "1.1")
    assert (code, out, fake.seen[-1]["method"]) == (0, "1.1: removed\n", "DELETE")
    fake.answers[f"DELETE {path}/1.1"] = (409, {"error": "games use it: g1"})
    code, _, err = await admin(capsys, url, "versions", "remove", "1.1")
    assert code == 1 and err == "rtmanager versions: games use it: g1 (HTTP 409)\n"
    fake.answers[f"PATCH {path}/1.1"] = (400, {"error": "field stop_grace must be whole seconds"})
    code, _, err = await admin(capsys, url, "versions", "stop-grace", "1.1", "-1")
    assert code == 2 and "stop_grace" in err


DRAIN = {"id": 5, "node": None, "target": "host", "status": "draining", "max_parallel": 2,
         "deadline_at": "2026-01-01T01:00:00+00:00", "created_at": "2026-01-01T00:00:00+00:00"}


async def test_drains_through_the_api(canned, capsys):
    url, fake = canned
    fake.answers["POST /api/v1/drains"] = (201, DRAIN)
    code, out, err = await admin(capsys, url, "drain", "--host", "--max-parallel", "2")
    assert code == 0 and out.startswith("drain 5: host draining, 2 at a time") and fake.seen[-1]["body"] == {
        "host": True, "max_parallel": 2}
    fake.answers["GET /api/v1/drains"] = (200, {"drains": [{**DRAIN, "id": 4, "status": "undrained"}, DRAIN]})
    fake.answers["POST /api/v1/drains/5/undrain"] = (200, {**DRAIN, "status": "undraining"})
    code, out, err = await admin(capsys, url, "undrain", "--host")
    assert code == 0 and out == "drain 5: host undraining\n" and fake.seen[-1]["path"] == "/api/v1/drains/5/undrain"
    code, out, err = await admin(capsys, url, "undrain", "node-7")
    assert code == 1 and err == "rtmanager undrain: node node-7 has no active drain\n"
    code, out, _ = await admin(capsys, url, "drains", "--json")
    assert [d["id"] for d in json.loads(out)["drains"]] == [4, 5]
    fake.answers["GET /api/v1/drains/5"] = (200, {**DRAIN, "counts": {"waiting": 1}, "games": [
        {"game_id": "g1", "action": "stop", "state": "waiting", "from_node": None, "to_node": None, "note": ""}]})
    code, out, _ = await admin(capsys, url, "drains", "5")
    assert code == 0 and out.splitlines()[2].split() == ["g1", "stop", "waiting", "-", "-"]


ROLLOUT = {"id": 3, "source_version": "1.0", "target_version": "1.1", "target_image_ref": "galaxy/engine:1.1",
           "state": "running", "state_reason": "", "max_parallel": 2, "canary": 1, "canary_hold": 60.0,
           "failure_budget": 1, "on_failure": "rollback", "games_by_state": {"pending": 1, "done": 1},
           "games": [{"game_id": "g1", "state": "done", "canary": True, "reason": ""},
                     {"game_id": "g2", "state": "pending", "canary": False, "reason": ""}]}


async def test_rollouts_through_the_api(canned, capsys):
    url, fake = canned
    fake.answers["POST /api/v1/rollouts"] = (201, ROLLOUT)
    code, out, err = await admin(capsys, url, "rollout", "start", "--to", "1.1", "--from", "1.0", "--canary", "1",
                                 "--max-parallel", "2")
    assert code == 0, err
    assert out.startswith("rollout 3: from 1.0 to 1.1 (galaxy/engine:1.1) running") and "g2" in out
    assert fake.seen[-1]["body"] == {"target_version": "1.1", "source_version": "1.0", "max_parallel": 2,
                                     "canary": 1, "canary_hold": 60.0, "failure_budget": 1, "on_failure": "rollback",
                                     "force": False}
    fake.answers["GET /api/v1/rollouts"] = (200, {"rollouts": [ROLLOUT]})
    code, out, _ = await admin(capsys, url, "rollout", "status", "--state", "running")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["3", "running", "1.1", "1.0"]
    fake.answers["POST /api/v1/rollouts/3/pause"] = (200, {**ROLLOUT, "state": "paused"})
    code, out, _ = await admin(capsys, url, "rollout", "pause", "3", "--json")
    assert code == 0 and json.loads(out)["state"] == "paused"
    fake.answers["POST /api/v1/rollouts/3/resume"] = (409, {"error": "rollout 3 is running"})
    code, _, err = await admin(capsys, url, "rollout", "resume", "3")
    assert code == 1 and err == "rtmanager rollout: rollout 3 is running (HTTP 409)\n"


@pytest.mark.parametrize("argv", [["restart", "g1"], ["runtimes"], ["versions", "list", "--api"],
                                  ["rollout", "status", "--api"], ["drains", "--api"]])
def test_the_rest_commands_read_no_controller_configuration(argv, monkeypatch, capsys):
    """Through the real entry point: a configuration the controller would refuse (exit 2) is not read."""
    from controller.cli import main
    monkeypatch.setenv("RTMANAGER_HTTP_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith(f"rtmanager {argv[0]}: cannot reach http://127.0.0.1:9"), err


@pytest.mark.parametrize("argv", [
    ["stop", "../rollouts/1/abort?"], ["runtime", "x/../../admin/engine-versions/v1"], ["operations", "G1"],
    ["schedule", "a%2Fb", "10"], ["resync", "../x"], ["patch", "g1/..", "galaxy/engine:2"],
])
def test_a_game_argument_that_is_no_game_id_stops_the_command_before_any_request(argv, capsys):
    """Red-team finding: the REST commands put GAME into the request's path as it was typed, so
    ``rtmanager stop '../rollouts/1/abort?'`` reached ``POST /api/v1/rollouts/1/abort``."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "game_id must match" in capsys.readouterr().err


def test_a_game_id_argument_is_taken_as_it_is():
    assert build_parser().parse_args(["stop", "g-1"]).game_id == "g-1"


async def test_undrain_of_a_number_that_is_also_a_drained_nodes_name_is_refused_as_ambiguous(canned, capsys):
    """Red-team, stop 44: node names may be all digits; `rtmanager undrain 123` read any number as a drain id,
    so the operator who meant node 123 ended drain 123 instead (its games started again, its node used
    again). A number that is also an active drain's node is refused, naming both; --node says which."""
    url, fake = canned
    # the node's hostname is 123; the drain stores its id (the list names the hostname beside it)
    node_drain = {**DRAIN, "id": 7, "node": "k3x9abc", "target": "k3x9abc", "node_name": "123"}
    fake.answers["GET /api/v1/drains"] = (200, {"drains": [node_drain, {**DRAIN, "id": 123}]})
    code, out, err = await admin(capsys, url, "undrain", "123")
    assert code == 2 and "ambiguous" in err and "--node" in err
    assert not any(s["method"] == "POST" for s in fake.seen)
    fake.answers["POST /api/v1/drains/7/undrain"] = (200, {**node_drain, "status": "undraining"})
    code, out, err = await admin(capsys, url, "undrain", "--node", "123")
    assert code == 0 and fake.seen[-1]["path"] == "/api/v1/drains/7/undrain"
    fake.answers["GET /api/v1/drains"] = (200, {"drains": [{**DRAIN, "id": 123}]})
    fake.answers["POST /api/v1/drains/123/undrain"] = (200, {**DRAIN, "id": 123, "status": "undraining"})
    code, out, err = await admin(capsys, url, "undrain", "123")  # no node of that name: the id
    assert code == 0 and fake.seen[-1]["path"] == "/api/v1/drains/123/undrain"
    # review: the Swarm did not name its nodes this time: a number is refused, not taken for an id
    posts = len([s for s in fake.seen if s["method"] == "POST"])
    nameless = {k: v for k, v in node_drain.items() if k != "node_name"}
    fake.answers["GET /api/v1/drains"] = (200, {"drains": [nameless, {**DRAIN, "id": 123}]})
    code, out, err = await admin(capsys, url, "undrain", "123")
    assert code == 2 and "ambiguous" in err and len([s for s in fake.seen if s["method"] == "POST"]) == posts
    code, out, err = await admin(capsys, url, "undrain", "--id", "123")  # the operator says it is an id
    assert code == 0 and fake.seen[-1]["path"] == "/api/v1/drains/123/undrain"
    code, out, err = await admin(capsys, url, "undrain", "worker1")  # a hostname the Swarm does not name now
    assert code == 1 and "does not name" in err and "--id" in err and "7" in err
    # two drained nodes of one hostname: refused, not one of them at random
    twins = [{**node_drain, "id": 7}, {**node_drain, "id": 9, "target": "z9", "node": "z9"}]
    fake.answers["GET /api/v1/drains"] = (200, {"drains": twins})
    code, out, err = await admin(capsys, url, "undrain", "--node", "123")
    assert code == 1 and "more than one" in err
    # --host is the host's drain, never a node whose hostname is "host"
    fake.answers["GET /api/v1/drains"] = (200, {"drains": [{**node_drain, "node_name": "host"}, DRAIN]})
    fake.answers["POST /api/v1/drains/5/undrain"] = (200, {**DRAIN, "status": "undraining"})
    code, out, err = await admin(capsys, url, "undrain", "--host")
    assert code == 0 and fake.seen[-1]["path"] == "/api/v1/drains/5/undrain"


async def test_a_job_whose_answer_is_lost_after_it_was_sent_is_not_told_as_unreached(capsys, monkeypatch):
    """Red-team, stop 44: a REST job the server had received but whose answer did not come back (a proxy's
    timeout, a stall) read "cannot reach" and exit 1: the operator ran it again, and a force-next-turn asked
    for a second turn. A request that may have been applied exits 3 and says where to look; one that never
    left (nothing listening) is still "cannot reach", exit 1."""
    import argparse
    import os

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from controller.cli import api as api_module
    from controller.cli import runtimes
    from controller.cli.api import with_api
    from tests.support.net import free_port

    got, keys = [], []

    async def job(request: web.Request) -> web.Response:
        got.append(request.path)  # admitted here; the answer is late
        keys.append(request.headers.get("Idempotency-Key"))
        await asyncio.sleep(5)
        return web.json_response({"outcome": "success"})

    app = web.Application()
    app.router.add_post("/api/v1/runtimes/{g}/force-next-turn", job)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    monkeypatch.setattr(api_module, "SLACK", 0.3)
    monkeypatch.setitem(os.environ, "RTMANAGER_API_TOKEN", "t" * 32)
    try:
        for url, want in ((f"http://127.0.0.1:{srv.port}", 3), (f"http://127.0.0.1:{free_port()}", 1)):
            args = argparse.Namespace(command="force-next-turn", game_id="g1", wait=0, json=False, url=url,
                                      token_file=None, idempotency_key=None)
            code = await with_api(args, lambda c, a=args: runtimes._job(c, a))
            err = capsys.readouterr().err
            assert code == want, err
            if want == 3:
                assert "may have been" in err and "rtmanager operations g1" in err and got
                # stop 45: it says how to send it again safely, with the key the server got
                assert keys[-1] and f"--idempotency-key {keys[-1]}" in err, (keys, err)
            else:
                assert "cannot reach" in err
        # sent again with that key: the same key goes out
        args = argparse.Namespace(command="force-next-turn", game_id="g1", wait=0, json=False,
                                  url=f"http://127.0.0.1:{srv.port}", token_file=None, idempotency_key=keys[-1])
        assert await with_api(args, lambda c: runtimes._job(c, args)) == 3
        assert len(keys) == 2 and keys[1] == keys[0], keys
        capsys.readouterr()
    finally:
        await srv.close()


async def test_doctor_does_not_say_the_api_is_disabled_when_a_tokens_file_is_set(monkeypatch, capsys, tmp_path):
    """Red-team, stop 44: doctor looked at RTMANAGER_API_TOKEN alone and said the REST API answers 503 when
    only RTMANAGER_API_TOKENS_FILE was set."""
    from controller.cli import local
    from controller.config import Settings

    for name in ("open_store", "open_streams", "open_backend"):  # every service check fails at once: the note
        monkeypatch.setattr(local, name, None)
    tokens = tmp_path / "tokens"
    tokens.write_text("boss admin " + "a" * 32 + "\n")
    (tmp_path / "empty").write_text("# no token yet\n")
    for env, says in (({"RTMANAGER_API_TOKENS_FILE": str(tokens)}, False), ({}, True),
                      ({"RTMANAGER_API_TOKENS_FILE": str(tmp_path / "empty")}, True)):
        await local.doctor(Settings.from_env({"RTMANAGER_STATE_ROOT": str(tmp_path / "games"), **env}))
        out = capsys.readouterr().out
        assert ("answers 503" in out) is says, out


async def test_a_proxys_error_page_after_a_change_was_forwarded_exits_3_and_a_hung_lookup_is_unreached(
        capsys, monkeypatch):
    """Review, stop 44: a reverse proxy that times out after forwarding a job answers 504 (or 502) with its own
    page: that read as a refusal, exit 1, and the operator sent the job again. And a name lookup that never
    answered ran into the call's whole timeout, read as "sent and its answer lost". A change answered 502 or
    504 (or an error page that is not the API's JSON) may have been applied: exit 3; a lookup or connect
    that does not end is "cannot reach", exit 1."""
    import argparse
    import os

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from controller.cli import api as api_module
    from controller.cli import runtimes
    from controller.cli.api import with_api

    seen = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(request.method)
        if len(seen) > 1:  # review: an empty error page too
            return web.Response(status=500)
        return web.Response(status=504, text="<html><h1>504 Gateway Time-out</h1></html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    monkeypatch.setitem(os.environ, "RTMANAGER_API_TOKEN", "t" * 32)

    def job(url: str):
        args = argparse.Namespace(command="force-next-turn", game_id="g1", wait=0, json=False, url=url,
                                  token_file=None, idempotency_key=None)
        return with_api(args, lambda c: runtimes._job(c, args))

    try:
        assert await job(f"http://127.0.0.1:{srv.port}") == 3 and seen == ["POST"]
        assert "may have been applied" in capsys.readouterr().err
        assert await job(f"http://127.0.0.1:{srv.port}") == 3 and seen == ["POST", "POST"]
        assert "may have been applied" in capsys.readouterr().err
    finally:
        await srv.close()

    async def hang(self, *a, **k):
        await asyncio.sleep(3600)

    monkeypatch.setattr(aiohttp.TCPConnector, "_resolve_host", hang)
    monkeypatch.setattr(api_module, "SLACK", 0.5)
    assert await job("http://rtmanager.example:8090") == 1
    assert "cannot reach" in capsys.readouterr().err
