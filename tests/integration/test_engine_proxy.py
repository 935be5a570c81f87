"""The engine proxy endpoints against the stub engine (galaxy/engine-stub:1.0) run by an in-process
controller: the engine's status through rtmanager, the gateway's pass-through (a GET and a POST reach
the engine, no path reaches its admin API, the body and time limits), a stopped game, and the roles."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import eventually
from tests.support.api import FAST, STUB_10, control, engine_turn, runtime

GATEWAY = "g" * 16 + "-gateway-secret"
READER = "r" * 16 + "-reader-secret"
LIMIT = 4096
ADMIN = "cgi-bin/admin/v1"  # FAST's RTMANAGER_ENGINE_ADMIN_PATH, where the stub serves it
HEALTHZ = (Path(__file__).resolve().parents[2] / "deploy/engine-stub/www/healthz").read_bytes()
# Ways to spell the admin API's turn request through the pass-through: each must be refused.
ESCAPES = [
    f"{ADMIN}/turns", f"{ADMIN}/status", f"/{ADMIN}/turns", f"{ADMIN.upper()}/turns", "CGI-BIN/admin/v1/turns",
    "cgi-bin//admin/v1/turns", "cgi-bin/./admin/v1/turns", "x/../cgi-bin/admin/v1/turns",
    "cgi-bin/admin/x/../v1/turns", "cgi-bin%2Fadmin%2Fv1/turns", "cgi-bin%2fadmin/v1/turns",
    "cgi-bin%5Cadmin/v1/turns", "%63gi-bin/admin/v1/turns", "%2563gi-bin/admin/v1/turns",
    "cgi-bin/admin/v1%2Fturns", "cgi-bin/%2E%2E/cgi-bin/admin/v1/turns", "cgi-bin;x/admin/v1/turns",
    "cgi-bin/admin;x=1/v1/turns", "cgi-bin/admin/v1%00/turns", "cgi-bin/admin/v1/./turns",
]


async def raw(api, method: str, target: str, token: str, body: bytes = b"") -> tuple[int, bytes]:
    """A request sent byte for byte (no client normalises the target): (status, answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: rtm\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                 .encode() + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_the_engine_proxy(api, tmp_path: Path) -> None:
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"gw gateway {GATEWAY}\nreader read {READER}\n")
    await api.start(**FAST, api_tokens_file=str(tokens), engine_proxy_max_body=str(LIMIT),
                    engine_proxy_timeout="1")
    game = f"px-{api.env['RTMANAGER_INSTANCE'][-8:]}"
    _, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    gw = {"Authorization": f"Bearer {GATEWAY}"}
    rd = {"Authorization": f"Bearer {READER}"}
    base = f"/api/v1/runtimes/{game}/engine"

    # The admin status, asked by rtmanager with the game's admin token (the stub refuses any other).
    status, body = await api.get(f"{base}/status", auth=False, headers=rd)
    assert status == 200 and body == {"game_id": game, "turn": 0, "phase": "idle", "last_generation": None}, body

    # The pass-through: a GET and a POST reach the engine (a POST of a static file is busybox's own 501).
    status, body, resp = await api.request("GET", f"{base}/proxy/healthz?probe=1", auth=False, headers=gw)
    assert status == 200 and body.encode() == HEALTHZ, (status, body)
    status, body, resp = await api.request("POST", f"{base}/proxy/healthz", auth=False, headers=gw,
                                           data=b'{"order": 1}')
    assert status == 501 and "Not Implemented" in body and "<HTML>" in body.upper(), (status, body)
    status, body, _ = await api.request("GET", f"{base}/proxy/no/such/page", auth=False, headers=gw)
    assert status == 404 and "<HTML>" in body.upper(), body  # the engine's 404, not rtmanager's JSON

    # No spelling of the admin path reaches the admin API: the turn request never gets there.
    for tail in ESCAPES:
        code, answer = await raw(api, "POST", f"{base}/proxy/{tail}", GATEWAY, b'{"expected_turn":0}')
        assert code in (400, 403), (tail, code, answer)
        code, answer = await raw(api, "GET", f"{base}/proxy/{tail}", GATEWAY)
        assert code in (400, 403), (tail, code, answer)
    assert engine_turn(api, game) == 0

    # A body over the limit: 413, before the engine is asked.
    status, body, _ = await api.request("POST", f"{base}/proxy/healthz", auth=False, headers=gw,
                                        data=b"x" * (LIMIT + 1))
    assert status == 413, body

    # The roles: the gateway reaches nothing else; no other token reaches the pass-through.
    for method, path in (("GET", "/api/v1/runtimes"), ("GET", f"/api/v1/runtimes/{game}"),
                         ("GET", f"{base}/status"), ("POST", f"/api/v1/runtimes/{game}/stop"),
                         ("GET", "/api/v1/operations")):
        assert (await api.request(method, path, auth=False, headers=gw))[0] == 403, (method, path)
    for headers in (rd, api.auth):
        assert (await api.request("GET", f"{base}/proxy/healthz", auth=False, headers=headers))[0] == 403
        assert (await api.request("POST", f"{base}/proxy/healthz", auth=False, headers=headers))[0] == 403

    # A slow engine: 504 once the timeout is spent (httpd stopped by the stub's mute switch).
    control(api, game, "mute")

    async def times_out() -> bool:
        return (await api.request("GET", f"{base}/proxy/healthz", auth=False, headers=gw))[0] == 504

    await eventually(times_out, 10, "a 504 from the muted engine")
    (Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "stub-control" / "mute").unlink()

    # An unknown game is a 404; a stopped one a 409 naming its status.
    assert (await api.request("GET", "/api/v1/runtimes/nosuchgame/engine/proxy/x", auth=False, headers=gw))[0] \
        == 404
    _, res = await api.job(game, "stop", {"force": True})
    assert res["outcome"] == "success", res
    assert (await runtime(api, game))["status"] == "stopped"
    for path, headers in ((f"{base}/proxy/healthz", gw), (f"{base}/status", rd)):
        status, body, _ = await api.request("GET", path, auth=False, headers=headers)
        assert status == 409 and body["status"] == "stopped", (path, status, body)
