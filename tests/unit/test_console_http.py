"""The console's server side without a browser: /ui's files and headers, and GET /api/v1/whoami for each
role (tests/integration/test_console.py drives the page itself in Chromium)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from controller.admission import Admission
from controller.config import HttpSettings
from controller.console_http import FILES
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.jobs import ImageAllowlist
from tests.fakes import FakeStore, defaults

READER, OPERATOR, ADMIN = "r" * 32, "o" * 32, "a" * 32


async def _ready() -> dict[str, str]:
    return {}


@pytest.fixture
async def client(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"reader read {READER}\nops operate {OPERATOR}\nboss admin {ADMIN}\n")
    store = FakeStore()
    server = HttpServer(HttpDeps(
        http=HttpSettings(http_port=0, http_host="127.0.0.1", api_token="", api_tokens_file=str(tokens)),
        allowlist=ImageAllowlist("galaxy/engine:*"), store=store,  # type: ignore[arg-type]
        admission=Admission(store, defaults(), wake=lambda g: None), metrics=Metrics(),
        is_leader=lambda: True, readiness=_ready, results_changed=asyncio.Event))
    c = TestClient(TestServer(server.app))
    await c.start_server()
    yield c
    await c.close()


async def test_the_files_are_public_with_a_strict_policy_and_nothing_else_is_served(client) -> None:
    for path in ["/ui", "/ui/", *(f"/ui/{name}" for name in FILES)]:
        async with client.get(path) as resp:
            assert resp.status == 200, path
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
            assert "frame-ancestors 'none'" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
    async with client.get("/ui/console.js") as resp:
        assert resp.content_type == "text/javascript"
        js = await resp.text()
    assert "innerHTML" not in js and "eval(" not in js
    assert "?token=" not in js and "access_token" not in js, "the token goes in a header, never a URL"
    for path in ("/ui/secret.txt", "/ui/..%2Fhttp.py", "/ui/console"):
        async with client.get(path) as resp:
            assert resp.status == 404, path


@pytest.mark.parametrize(("token", "name", "role", "operate", "admin"), [
    (READER, "reader", "read", False, False),
    (OPERATOR, "ops", "operate", True, False),
    (ADMIN, "boss", "admin", True, True),
])
async def test_whoami_names_the_token_and_what_its_role_may_call(client, token, name, role, operate, admin) -> None:
    async with client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        me = await resp.json()
    assert (me["name"], me["role"], me["operate"], me["admin"]) == (name, role, operate, admin)
    allowed = {(a["method"], a["path"]) for a in me["allowed"]}
    assert (("POST", "/api/v1/runtimes/{game_id}/restart") in allowed) is operate
    assert (("POST", "/api/v1/rollouts") in allowed) is admin
    assert ("GET", "/api/v1/events") in allowed


async def test_whoami_without_a_token_is_401(client) -> None:
    async with client.get("/api/v1/whoami") as resp:
        assert resp.status == 401
