"""Only rtmanager drives an engine: every unit gets a secret admin token of its own
(``ENGINE_ADMIN_TOKEN``), and the stub engine refuses admin calls without it. Seen from inside a real
engine container on the shared game network, as a neighbour would try it; the token is never shown
in results, snapshots, REST answers, labels, metrics or logs."""

from __future__ import annotations

import json
import logging

import asyncpg

from tests.support import eventually
from tests.support.api import FAST, STUB_10, engine_turn, runtime


def _env_token(container) -> str:
    container.reload()
    for item in container.attrs["Config"]["Env"] or []:
        if item.startswith("ENGINE_ADMIN_TOKEN="):
            return item.split("=", 1)[1]
    return ""


def _ip(api, container) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][api.env["RTMANAGER_DOCKER_NETWORK"]]["IPAddress"]


def _admin_from(container, ip: str, what: str, token: str | None) -> tuple[int, str]:
    """An admin call from inside ``container`` (busybox nc, a raw HTTP request) to the engine at ``ip``:
    (HTTP status, the answer)."""
    method, body = ("POST", '{"expected_turn":0}') if what == "turns" else ("GET", "")
    auth = f"Authorization: Bearer {token}\\r\\n" if token is not None else ""
    request = (f"{method} /cgi-bin/admin/v1/{what} HTTP/1.0\\r\\nHost: engine\\r\\n{auth}"
               f"Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n{body}")
    _, out = container.exec_run(["sh", "-c", 'printf "%b" "$1" | nc -w 5 "$2" 8080', "sh", request, ip])
    text = out.decode(errors="replace")
    first = text.split("\r\n", 1)[0].split()
    return (int(first[1]) if len(first) > 1 and first[1].isdigit() else 0), text


async def test_a_neighbour_engine_cannot_drive_another_game_but_rtmanager_can(api, caplog):
    caplog.set_level(logging.DEBUG)
    await api.start(**FAST)
    # Container names are the host's: names of this test's own, so that runs beside it cannot collide.
    ga, gb = f"tok-a-{api.env['RTMANAGER_INSTANCE'][-8:]}", f"tok-b-{api.env['RTMANAGER_INSTANCE'][-8:]}"
    for game in (ga, gb):
        _, res = await api.job(game, "start", {"image_ref": STUB_10})
        assert res["outcome"] == "success", res
    await eventually(lambda: _known_turn(api, gb), what="the engine's turn known")
    [a], [b] = api.containers(ga), api.containers(gb)
    ip_b = _ip(api, b)

    # From inside game A's engine: B's admin API, without a token and with A's own token.
    for token in (None, _env_token(a), ""):
        for what in ("turns", "status"):
            code, out = _admin_from(a, ip_b, what, token)
            assert code == 401, (what, token is None, code, out)
    assert engine_turn(api, gb) == 0  # the refused turn request changed nothing

    # rtmanager's own turn goes through, also after a controller restart (the token is recorded).
    _, res = await api.job(gb, "force-next-turn")
    assert res["outcome"] == "success", res
    assert engine_turn(api, gb) == 1
    await api.stop_all()
    api.port = 0  # the next controller serves on a port of its own
    await api.start(**FAST)
    _, res = await api.job(gb, "force-next-turn")
    assert res["outcome"] == "success", res
    assert engine_turn(api, gb) == 2

    # A new unit, a new token.
    token_b = _env_token(b)
    _, res = await api.job(gb, "restart")
    assert res["outcome"] == "success", res
    [b2] = api.containers(gb)
    tokens = {_env_token(a), token_b, _env_token(b2)}
    assert len(tokens) == 3 and all(len(t) >= 32 for t in tokens), "each unit has a token of its own"
    _, res = await api.job(gb, "force-next-turn")
    assert res["outcome"] == "success", res

    # Nowhere to be seen.
    shown: list[str] = []
    for path in ("/api/v1/runtimes", f"/api/v1/runtimes/{gb}", f"/api/v1/runtimes/{gb}/operations",
                 f"/api/v1/runtimes/{ga}/operations", "/metrics"):
        status, body = await api.get(path)
        assert status == 200, (path, body)
        shown.append(json.dumps(body))
    for stream in (api.env["RTMANAGER_RESULTS_STREAM"], api.env["RTMANAGER_SNAPSHOT_STREAM"]):
        shown.append(json.dumps(await api.redis.xrange(stream)))
    for c in (a, b2):
        shown.append(json.dumps(c.labels))
    shown.extend(json.dumps(r.__dict__, default=str) for r in caplog.records)
    shown.append(caplog.text)
    conn = await asyncpg.connect(api.env["RTMANAGER_DATABASE_URL"])
    try:
        shown.extend(json.dumps(dict(r), default=str) for r in await conn.fetch("SELECT * FROM runtime_operations"))
        shown.extend(json.dumps(dict(r), default=str) for r in await conn.fetch("SELECT * FROM job_results"))
    finally:
        await conn.close()
    blob = "\n".join(shown)
    assert len(blob) > 1000
    for token in tokens:
        assert token not in blob


async def test_an_engine_refusing_the_recorded_token_is_engine_refused_not_a_crash(api):
    """A database restored from an older backup may record another token than the unit has."""
    await api.start(**FAST)
    game = f"tok-old-{api.env['RTMANAGER_INSTANCE'][-8:]}"
    _, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    await eventually(lambda: _known_turn(api, game), what="the engine's turn known")
    conn = await asyncpg.connect(api.env["RTMANAGER_DATABASE_URL"])
    try:
        await conn.execute("UPDATE runtime_records SET admin_token = 'stale-token-of-an-older-unit'"
                           " WHERE game_id = $1", game)
    finally:
        await conn.close()

    async def refused() -> bool:
        return (await runtime(api, game))["last_error_code"] == "engine_refused"
    await eventually(refused, 10, "the health round surfaces the refusal")
    _, res = await api.job(game, "force-next-turn")
    assert res["outcome"] == "failure" and res["error_code"] == "engine_refused", res
    body = await runtime(api, game)
    assert body["status"] == "running" and body["crash_count"] == 0, body
    assert len(api.containers(game)) == 1 and api.containers(game)[0].status == "running"
    assert engine_turn(api, game) == 0


async def _known_turn(api, game: str) -> bool:
    return (await runtime(api, game))["turn"] is not None
