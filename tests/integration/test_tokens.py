"""Scoped API tokens on a real controller (Postgres, Redis): the roles, a rotation by SIGHUP without a
restart, and who asked in the operation log (migration 0020), for REST calls, registry changes and
stream entries. No engine is started: every job here is answered without a container."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support import eventually
from tests.support.api import STUB_10

READER = "reader-" + "r" * 20
OPERATOR = "operator-" + "o" * 20
ADMIN = "admin-" + "a" * 20
V = "/api/v1/admin/engine-versions"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_roles_rotation_and_actors(api, tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text(f"reader read {READER}\nops operate {OPERATOR}\nboss admin {ADMIN}\n")
    api.env["RTMANAGER_API_TOKENS_FILE"] = str(path)
    ctl = await api.start()

    # a read token reads and cannot submit; an operate token cannot touch the registry
    assert (await api.get("/api/v1/runtimes", auth=False, headers=bearer(READER)))[0] == 200
    status, body = await api.job("t1", "start", {"image_ref": STUB_10}, auth=False, headers=bearer(READER))
    assert status == 403 and "needs operate" in body["error"], body
    status, body, _ = await api.request("POST", V, auth=False, headers=bearer(OPERATOR),
                                        json={"version": "t-1.0", "image_ref": STUB_10})
    assert status == 403 and "needs admin" in body["error"], body
    status, body, _ = await api.request("POST", V, auth=False, headers=bearer(ADMIN),
                                        json={"version": "t-1.0", "image_ref": STUB_10})
    assert status == 201, body
    status, _, _ = await api.request("DELETE", f"{V}/t-1.0", auth=False, headers=bearer(ADMIN))
    assert status == 204
    # drains are admin's, and in the log too
    status, body, _ = await api.request("POST", "/api/v1/drains", auth=False, headers=bearer(OPERATOR),
                                        json={"host": True})
    assert status == 403, body
    status, drain, _ = await api.request("POST", "/api/v1/drains", auth=False, headers=bearer(ADMIN),
                                         json={"host": True})
    assert status == 201, drain
    status, body, _ = await api.request("POST", f"/api/v1/drains/{drain['id']}/undrain", auth=False,
                                        headers=bearer(ADMIN))
    assert status == 200, body
    # an operate token's job on a game that does not exist: answered at once, logged under its name
    status, body = await api.job("t1", "pause", {"requested_by": "gm:alice"}, wait=5, auth=False,
                                 headers=bearer(OPERATOR))
    assert status == 200 and body["outcome"] == "failure", body
    # a stream entry with requested_by
    stream = ctl.settings.streams.control_stream
    await api.redis.xadd(stream, {"game_id": "t2", "op": "resume", "requested_by": "game-master"})

    async def logged():
        status, body = await api.get("/api/v1/operations", auth=False, headers=bearer(READER))
        assert status == 200, body
        seen = [(o["op"], o["game_id"], o["actor"], o["requested_by"]) for o in body["operations"]]
        assert ("resume", "t2", f"stream:{stream}", "game-master") in seen, seen
        return seen

    seen = await eventually(logged, 15, "the stream entry in the operation log")
    assert seen[1:] == [("pause", "t1", "token:ops", "gm:alice"),
                        ("drain_undrain", None, "token:boss", None),
                        ("drain_create", None, "token:boss", None),
                        ("version_delete", None, "token:boss", None),
                        ("version_create", None, "token:boss", None)]
    status, body = await api.get("/api/v1/operations?op=version_create", auth=False, headers=bearer(READER))
    assert [o["params"]["version"] for o in body["operations"]] == ["t-1.0"]

    # rotated: the old secret stops working at the SIGHUP, no restart
    rotated = OPERATOR[::-1]
    path.write_text(f"reader read {READER}\nops operate {rotated}\nboss admin {ADMIN}\n")
    os.kill(os.getpid(), signal.SIGHUP)  # the in-process controller's handler on this event loop

    async def rotated_in():
        assert (await api.get("/api/v1/runtimes", auth=False, headers=bearer(OPERATOR)))[0] == 401
        return True

    await eventually(rotated_in, 10, "the old operator token refused")
    assert (await api.get("/api/v1/runtimes", auth=False, headers=bearer(rotated)))[0] == 200
    assert (await api.get("/api/v1/runtimes"))[0] == 200  # RTMANAGER_API_TOKEN: admin, named default
