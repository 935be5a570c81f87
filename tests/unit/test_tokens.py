"""Named API tokens with a role (controller/tokens.py), the route table (controller/access.py) and who
asked in the operation log, against the HTTP surface in process with the store in memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from controller.access import ROUTE_ROLES, markdown
from controller.admission import Admission
from controller.config import ConfigError, HttpSettings, Settings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from controller.openapi import LOG_OPS
from controller.tokens import InvalidTokens, Role, TokenSource, load, parse_file
from desired.errors import NotFound
from desired.jobs import ImageAllowlist, InvalidJob, parse_job
from desired.model import JobKind
from desired.values import FLEET_OPS, Operation
from tests.fakes import FakeStore, defaults

READER = "r" * 16 + "-reader-secret"
OPERATOR = "o" * 16 + "-operator-secret"
ADMIN = "a" * 16 + "-admin-secret"
DEFAULT = "d" * 32
IMAGE = "galaxy/engine:1.0"


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # a rewrite within the file system's time resolution still changes the stamp
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


# ------------------------------------------------------------------ the file


def test_lines_and_json_and_hashes_give_the_same_tokens() -> None:
    lines = parse_file(f"# comment\n\nreader read {READER}\nops operate sha256:"
                       f"{hashlib.sha256(OPERATOR.encode()).hexdigest()}\n")
    as_json = parse_file(json.dumps([{"name": "reader", "role": "read", "token": READER},
                                     {"name": "ops", "role": "operate",
                                      "sha256": hashlib.sha256(OPERATOR.encode()).hexdigest()}]))
    assert lines == as_json
    assert [(t.name, t.role) for t in lines] == [("reader", Role.READ), ("ops", Role.OPERATE)]
    assert all(READER not in repr(t) for t in lines)  # only the digest is kept


@pytest.mark.parametrize(("text", "says"), [
    ("reader read\n", "line 1: expected NAME ROLE TOKEN"),
    ("reader root " + READER, "line 1: the role (the second column) is not one of"),
    ("reader READ " + READER, "the role (the second column)"),
    ("reader read short", "16 to 4096 printable"),
    ("bad/name read " + READER, "a token name"),
    ("x read sha256:abc", "64 lower-case hex"),
    (f"x read {READER}\nx admin {ADMIN}", "tokens 1 and 2 have the same name"),
    (f"x read {READER}\ny admin {READER}", "tokens 1 and 2 have the same secret"),
    # the columns swapped: the secret is where the name or the role should be (red-team 130)
    (f"{READER} admin ci-bot", "line 1: the token must be"),
    (f"ci-bot {READER} admin", "line 1: the role (the second column)"),
    (f"{READER[:20]} admin {ADMIN}\n{READER[:20]} read {READER}", "tokens 1 and 2 have the same name"),
    ("[{\"name\": \"x\", \"role\": \"read\"}]", "either the token or sha256"),
    ("[{", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nested past the decoder's depth
])
def test_a_bad_file_says_why_and_never_shows_a_secret(text: str, says: str) -> None:
    with pytest.raises(InvalidTokens) as err:
        load_text(text)
    assert says in str(err.value), err.value
    for secret in (READER, ADMIN):
        assert secret[:8] not in str(err.value), err.value


def load_text(text: str) -> None:
    from controller.tokens import TokenSet
    TokenSet(parse_file(text))


def test_the_old_single_token_is_an_admin_named_default(tmp_path: Path) -> None:
    tokens = load(None, DEFAULT)
    found = tokens.find(DEFAULT.encode())
    assert found is not None and (found.name, found.role) == ("default", Role.ADMIN)
    assert tokens.find(DEFAULT[:-1].encode()) is None and tokens.find(b"") is None
    path = tmp_path / "tokens"
    path.write_text(f"default read {READER}\n")
    with pytest.raises(InvalidTokens, match="RTMANAGER_API_TOKEN's"):
        load(str(path), DEFAULT)
    assert not load(None, "")  # nothing configured: the API is off


def test_a_bad_file_at_start_up_stops_it_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("reader read short\n")
    with pytest.raises(ConfigError, match="^RTMANAGER_API_TOKENS_FILE: line 1: ") as err:
        Settings.from_env({"RTMANAGER_API_TOKENS_FILE": str(path)})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="RTMANAGER_API_TOKENS_FILE"):
        Settings.from_env({"RTMANAGER_API_TOKENS_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="RTMANAGER_API_TOKENS_FILE"):
        Settings.from_env({"RTMANAGER_API_TOKENS_FILE": "relative/path"})


def test_a_changed_file_is_read_again_and_a_bad_one_keeps_the_tokens(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    write(path, f"reader read {READER}\n")
    source = TokenSource(str(path), "")
    assert source.poll() is False  # unchanged
    write(path, f"reader read {ADMIN}\n")  # rotated
    assert source.poll() is True
    assert source.current.find(READER.encode()) is None
    assert source.current.find(ADMIN.encode()) is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rtmanager.tokens"):
        write(path, f"reader read {ADMIN}\nbroken line {OPERATOR} here\n")
        assert source.poll() is False
        assert source.poll() is False  # one line for one bad version of the file, not one a poll
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "not reloaded" in caplog.text and "line 2" in caplog.text
    assert OPERATOR not in caplog.text and ADMIN not in caplog.text
    assert source.current.find(ADMIN.encode()) is not None  # the tokens in force stay
    path.unlink()
    assert source.reload() is False and source.current.find(ADMIN.encode()) is not None


# ------------------------------------------------------------------ the HTTP surface


class Store(FakeStore):
    """FakeStore and the two reads of the REST job path."""

    async def result_for(self, op_id: int) -> dict[str, str] | None:
        for r in self.results:
            if r.get("operation_id") == op_id:
                return dict(r["fields"])
        return None

    async def operation(self, op_id: int) -> Operation:
        for o in self.ops:
            if o.id == op_id:
                return o
        raise NotFound(str(op_id))


class Api:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "tokens"
        write(self.path, f"reader read {READER}\nops operate {OPERATOR}\nboss admin {ADMIN}\n")
        self.store = Store()
        http = HttpSettings(http_port=0, http_host="127.0.0.1", api_token=DEFAULT, api_tokens_file=str(self.path))
        self.server = HttpServer(HttpDeps(
            http=http, allowlist=ImageAllowlist("galaxy/engine:*"), store=self.store,  # type: ignore[arg-type]
            admission=Admission(self.store, defaults(), wake=lambda g: None), metrics=Metrics(),
            is_leader=lambda: True, readiness=self._ready, results_changed=asyncio.Event))
        self.client = TestClient(TestServer(self.server.app))

    @staticmethod
    async def _ready() -> dict[str, str]:
        return {}

    async def call(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.client.request(method, path, headers=headers, json=body) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    a = Api(tmp_path)
    await a.client.start_server()
    yield a
    await a.client.close()


async def test_a_read_token_reads_and_cannot_submit(api: Api) -> None:
    assert (await api.call("GET", "/api/v1/runtimes", READER))[0] == 200
    status, body = await api.call("POST", "/api/v1/runtimes/g1/start?wait=0", READER, {"image_ref": IMAGE})
    assert status == 403, body
    assert body == {"error": "token reader has the role read; POST /api/v1/runtimes/{game_id}/start needs operate"}
    assert api.store.ops == [] and api.store.records == {}
    assert (await api.call("POST", "/api/v1/runtimes/g1/start", "x" * 20, {"image_ref": IMAGE}))[0] == 401


async def test_an_operate_token_submits_but_cannot_touch_the_registry_or_remove(api: Api) -> None:
    status, body = await api.call("POST", "/api/v1/runtimes/g1/start?wait=0", OPERATOR,
                                  {"image_ref": IMAGE, "requested_by": "gm:alice"})
    assert status == 202, body
    for method, path, payload in (
            ("POST", "/api/v1/admin/engine-versions", {"version": "1.0", "image_ref": IMAGE}),
            ("PATCH", "/api/v1/admin/engine-versions/1.0", {"status": "disabled"}),
            ("DELETE", "/api/v1/admin/engine-versions/1.0", None),
            ("POST", "/api/v1/rollouts", {}), ("POST", "/api/v1/drains", {"host": True}),
            ("POST", "/api/v1/runtimes/g1/cleanup", {})):
        status, body = await api.call(method, path, OPERATOR, payload)
        assert status == 403, (method, path, body)
    assert api.store.versions == {}
    assert [o.op for o in api.store.ops] == [JobKind.START]
    status, body = await api.call("POST", "/api/v1/admin/engine-versions", ADMIN, {"version": "1.0",
                                                                                   "image_ref": IMAGE})
    assert status == 201, body
    status, body = await api.call("GET", "/api/v1/admin/engine-versions", READER)  # reads are read's
    assert status == 200 and len(body["engine_versions"]) == 1


async def test_an_operation_names_its_actor_and_on_whose_behalf(api: Api) -> None:
    await api.call("POST", "/api/v1/runtimes/g1/start?wait=0", OPERATOR, {"image_ref": IMAGE,
                                                                          "requested_by": "gm:alice"})
    await api.call("POST", "/api/v1/runtimes/g1/pause?wait=0", DEFAULT, {})
    status, body = await api.call("GET", "/api/v1/operations", READER)
    assert status == 200, body
    assert [(o["op"], o["actor"], o["requested_by"]) for o in body["operations"]] == [
        ("pause", "token:default", None), ("start", "token:ops", "gm:alice")]
    assert body["next"] is None
    status, body = await api.call("GET", "/api/v1/operations?actor=token:ops&limit=1", READER)
    assert [o["op"] for o in body["operations"]] == ["start"] and body["next"] == body["operations"][0]["id"]
    status, body = await api.call("GET", "/api/v1/runtimes/g1/operations", READER)
    assert {o["actor"] for o in body["operations"]} == {"token:ops", "token:default"}
    status, body = await api.call("POST", "/api/v1/runtimes/g1/resume?wait=0", OPERATOR,
                                  {"requested_by": "bad\nname"})
    assert status == 400 and "requested_by" in body["error_message"], body
    for query in ("limit=0", "limit=x", "before=-1", "op=dance", "game_id=Bad!", "actor=a%00b", "actor=a%20b"):
        assert (await api.call("GET", f"/api/v1/operations?{query}", READER))[0] == 400, query


async def test_a_rotated_token_stops_working_without_a_restart(api: Api) -> None:
    assert (await api.call("GET", "/api/v1/runtimes", OPERATOR))[0] == 200
    rotated = OPERATOR[::-1]
    write(api.path, f"reader read {READER}\nops operate {rotated}\nboss admin {ADMIN}\n")
    assert api.server.tokens.poll() is True  # what the server's poll (or a SIGHUP) does
    assert (await api.call("GET", "/api/v1/runtimes", OPERATOR))[0] == 401
    assert (await api.call("GET", "/api/v1/runtimes", rotated))[0] == 200
    assert (await api.call("GET", "/api/v1/runtimes", DEFAULT))[0] == 200  # RTMANAGER_API_TOKEN stays


async def test_the_server_polls_the_file(api: Api) -> None:
    await api.server.stop()  # the test client's runner: start the poller on its own
    reloaded = asyncio.Event()
    source = api.server.tokens
    real = source.reload

    def spy() -> bool:
        done = real()
        reloaded.set()
        return done

    source.reload = spy  # type: ignore[method-assign]
    api.server._poller = asyncio.create_task(api.server._poll_tokens())
    try:
        write(api.path, f"reader read {READER}\n")
        await asyncio.wait_for(reloaded.wait(), 10)
        assert source.reloads == 1
        assert api.server.tokens.current.find(OPERATOR.encode()) is None
    finally:
        api.server._poller.cancel()


async def test_every_registered_route_has_a_role_in_the_table(tmp_path: Path) -> None:
    """No route under /api/ is left unguarded: each is in controller/access.py, and the table names no
    route that does not exist."""
    a = Api(tmp_path)
    await a.client.close()
    server = a.server
    registered = set()
    for route in server.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if not path.startswith("/api/") or route.method == "HEAD":
            continue
        registered.add((route.method, path))
    assert registered, "no API route found"
    assert registered - set(ROUTE_ROLES) == set(), "routes without a role: add them to controller/access.py"
    assert set(ROUTE_ROLES) - registered == set(), "roles of routes that do not exist"


def test_requested_by_on_a_job_entry_is_validated() -> None:
    allow = ImageAllowlist("galaxy/engine:*")
    job = parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b"finished", b"requested_by": b"game-master"},
                    allow, stream="runtime:stop_jobs", entry_id="1-0")
    assert job.requested_by == "game-master"
    for bad in (b"", b"x" * 129, b"tab\there", "\u200bzero-width".encode()):
        with pytest.raises(InvalidJob, match="requested_by"):
            parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b"finished", b"requested_by": bad}, allow)


def test_the_security_docs_role_table_is_the_generated_one() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    begin = "<!-- generated from controller/access.py (controller.access.markdown) -->\n"
    end = "<!-- end of the generated role table -->"
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table.strip() == markdown().strip(), "docs/security.md's role table is stale"


def test_the_migration_allows_exactly_the_fleet_ops() -> None:
    sql = (Path(__file__).resolve().parents[2] / "migrations" / "0020_operation_actors.sql").read_text()
    check = sql.split("runtime_operations_game_chk", 1)[1].split(";", 1)[0]
    assert set(re.findall(r"'([a-z_]+)'", check)) == set(FLEET_OPS)
    assert set(FLEET_OPS) <= set(LOG_OPS)


async def test_requests_waiting_for_results_cost_one_query_a_commit_not_one_each(tmp_path: Path) -> None:
    """Red-team 130: every commit of results anywhere in the fleet woke every REST request waiting for its
    job's result, and each asked Postgres: 200 waiters (one job, sent again with its Idempotency-Key) made 10
    unrelated commits cost 2,000 queries. The waiters are looked up together, and at most MAX_WAITERS wait."""
    import dataclasses

    from controller import http as http_module
    from desired.wakeup import Signal
    from tests.support.waits import eventually

    a = Api(tmp_path)
    signal = Signal()
    a.server.deps = dataclasses.replace(a.server.deps, results_changed=signal.next)
    a.server.waiters.changed = signal.next
    a.server.waiters.limit, a.server.waiters.each = 61, 60
    await a.client.start_server()
    try:
        headers = {"Authorization": f"Bearer {OPERATOR}", "Idempotency-Key": "k1"}
        body = {"image_ref": "galaxy/engine:1.0"}
        first = await a.client.post("/api/v1/runtimes/g1/start?wait=0", headers=headers, json=body)
        assert first.status == 202, await first.text()
        # 90: the test client's pool has 100 connections
        waiting = [asyncio.ensure_future(a.client.post("/api/v1/runtimes/g1/start?wait=300", headers=headers,
                                                       json=body)) for _ in range(90)]
        await eventually(lambda: len(a.server.waiters) == 60, 30, "the waiters registered")
        # past the limit: answered at once (which 30 of them is the order they came in)
        await eventually(lambda: sum(t.done() for t in waiting) == 30, 30, "30 answered at once")
        assert [t.result().status for t in waiting if t.done()] == [202] * 30
        held = [t for t in waiting if not t.done()]
        # another token still has its share (review 133: one client took every other client's waits)
        other = asyncio.ensure_future(a.client.post("/api/v1/runtimes/g2/start?wait=300", json=body, headers={
            "Authorization": f"Bearer {ADMIN}"}))
        await eventually(lambda: len(a.server.waiters) == 61, 30, "the other token's request waiting")
        assert not other.done()
        held.append(other)
        before = a.store.result_reads
        for _ in range(10):  # ten commits of other games' results
            signal.fire()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await eventually(lambda: a.store.result_reads > before, 10, "a look after the commits")
        assert a.store.result_reads - before <= 10, a.store.result_reads - before
        # the jobs' results (this fake store records each request as an operation of its own): one look
        before = a.store.result_reads
        for op in a.store.ops:
            a.store.results.append({"seq": 0, "result_id": "r", "game_id": "g1", "kind": "result",
                                    "operation_id": op.id, "published": None,
                                    "fields": {"job": "start", "outcome": "success", "game_id": "g1"}})
        signal.fire()
        answers = await asyncio.wait_for(asyncio.gather(*held), 30)
        assert {r.status for r in answers} == {200} and len(a.server.waiters) == 0 and not a.server.waiters._by
        assert a.store.result_reads - before <= 2, a.store.result_reads - before
        assert http_module.MAX_WAITERS > http_module.MAX_WAITERS_EACH
    finally:
        await a.client.close()
