"""The engine-version registry: REST CRUD with constraint-named conflicts, the registry policy at
admission and at every container start, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.support.api import STUB_10, STUB_11

V = "/api/v1/admin/engine-versions"


async def create(api, version: str, image: str, **extra):
    status, body, _ = await api.request("POST", V, json={"version": version, "image_ref": image, **extra})
    return status, body


async def test_two_racing_creates_give_one_201_and_one_409_naming_the_constraint(api):
    await api.start()
    registered = []
    for n in range(5):
        answers = await asyncio.gather(create(api, f"race-{n}", f"galaxy/engine-stub:r{n}a"),
                                       create(api, f"race-{n}", f"galaxy/engine-stub:r{n}b"))
        assert sorted(a[0] for a in answers) == [201, 409], answers
        conflict = next(b for s, b in answers if s == 409)
        assert "engine_versions_version_key" in conflict["error"] and "version" in conflict["error"]
        registered.append(next(b for s, b in answers if s == 201)["image_ref"])  # either may win
    status, body = await create(api, "other", registered[0])  # the image is registered already
    assert status == 409 and "engine_versions_image_ref_key" in body["error"], body


@pytest.mark.parametrize("body, field", [
    ({"version": "bad version!", "image_ref": STUB_10}, "version"),
    ({"version": "x" * 65, "image_ref": STUB_10}, "version"),
    ({"version": "1.0", "image_ref": "nginx:latest"}, "image_ref"),          # outside the allowlist
    ({"version": "1.0", "image_ref": "not an image"}, "image_ref"),
    ({"version": "1.0"}, "image_ref"),
    ({"version": 1, "image_ref": STUB_10}, "version"),
    ({"version": "1.0", "image_ref": STUB_10, "status": "retired"}, "status"),
    ({"version": "1.0", "image_ref": STUB_10, "colour": "blue"}, "colour"),
    ({"version": "1.0", "image_ref": STUB_10, "notes": "a\x00b"}, "notes"),
    ({"version": "1.0", "image_ref": STUB_10, "stop_grace": -1}, "stop_grace"),
    ({"version": "1.0", "image_ref": STUB_10, "stop_grace": 3601}, "stop_grace"),
    ({"version": "1.0", "image_ref": STUB_10, "stop_grace": 1.5}, "stop_grace"),
    ({"version": "1.0", "image_ref": STUB_10, "stop_grace": "30"}, "stop_grace"),
    ({"version": "1.0", "image_ref": STUB_10, "stop_grace": True}, "stop_grace"),
])
async def test_bad_fields_get_400_naming_the_field(api, body, field):
    await api.start()
    status, answer, _ = await api.request("POST", V, json=body)
    assert status == 400 and field in answer["error"], answer


async def test_crud_with_live_games_pull_and_immutable_image(api):
    await api.start()
    status, body, _ = await api.request("POST", V, params={"pull": "1"},
                                        json={"version": "1.0", "image_ref": STUB_10, "notes": "first"})
    assert status == 201 and body["image_present"] is True and body["status"] == "active", body
    status, body = await create(api, "ghost", "galaxy/engine-stub:not-built")
    assert status == 201 and body["image_present"] is False
    status, res = await api.job("v1", "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    status, body = await api.get(f"{V}/1.0")
    assert status == 200 and body["live_games"] == 1 and body["notes"] == "first"
    _, runtime = await api.get("/api/v1/runtimes/v1")
    assert runtime["engine_version"] == "1.0"
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"image_ref": STUB_11})
    assert status == 400 and "immutable" in body["error"]
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"notes": "second", "status": "deprecated"})
    assert status == 200 and body["status"] == "deprecated" and body["notes"] == "second"
    status, body = await api.get(V, params={"status": "deprecated"})
    assert [e["version"] for e in body["engine_versions"]] == ["1.0"]
    assert body["engine_versions"][0]["stop_grace"] is None  # RTMANAGER_STOP_GRACE
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"stop_grace": 3601})
    assert status == 400 and "stop_grace" in body["error"], body
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"stop_grace": 120})
    assert status == 200 and body["stop_grace"] == 120 and body["notes"] == "second", body
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"notes": "third"})
    assert status == 200 and body["stop_grace"] == 120, body  # kept when not named
    status, body = await api.get(f"{V}/1.0")
    assert body["stop_grace"] == 120
    status, body, _ = await api.request("PATCH", f"{V}/1.0", json={"stop_grace": None})
    assert status == 200 and body["stop_grace"] is None, body
    status, body, _ = await api.request("DELETE", f"{V}/1.0")
    assert status == 409 and "v1" in body["error"], body  # a live game uses it
    for kind, payload in (("stop", None), ("cleanup", None)):
        status, res = await api.job("v1", kind, payload)
        assert res["outcome"] == "success", res
    status, _, _ = await api.request("DELETE", f"{V}/1.0")
    assert status == 204
    status, _, _ = await api.request("DELETE", f"{V}/1.0")
    assert status == 404


async def test_the_registry_policy_refuses_what_the_allowlist_alone_would_run(api):
    await api.start(version_policy="registry", crash_limit="10")
    status, res = await api.job("r1", "start", {"image_ref": STUB_10})  # allow-listed, not registered
    assert res["error_code"] == "image_rejected" and "not a registered" in res["error_message"], res
    assert (await create(api, "1.0", STUB_10))[0] == 201
    status, res = await api.job("r1", "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res

    # deprecated: runs and restarts, takes no new start
    assert (await api.request("PATCH", f"{V}/1.0", json={"status": "deprecated"}))[0] == 200
    status, res = await api.job("r2", "start", {"image_ref": STUB_10})
    assert res["error_code"] == "image_rejected" and "1.0" in res["error_message"] \
        and "deprecated" in res["error_message"], res
    status, res = await api.job("r1", "restart")
    assert res["outcome"] == "success", res

    # disabled: refused at every container start, crash restarts included. A restart refused before it touched
    # the engine leaves it running (stop 45: stopping a healthy game nobody asked to stop was the refusal's
    # doing, not the job's); once the engine exits, it is not started again and the game is stopped.
    assert (await api.request("PATCH", f"{V}/1.0", json={"status": "disabled"}))[0] == 200
    [before] = api.containers("r1")
    status, res = await api.job("r1", "restart")
    assert res["error_code"] == "image_rejected" and "disabled" in res["error_message"], res
    _, body = await api.get("/api/v1/runtimes/r1")
    assert body["status"] == "running" and body["desired_status"] == "running", body
    [still] = api.containers("r1")
    assert still.id == before.id and still.status == "running"
    still.kill()

    async def stopped():
        _, body = await api.get("/api/v1/runtimes/r1")
        return body if body["status"] == "stopped" and body["desired_status"] == "stopped" else None

    async def stopped_published():  # the record says stopped; the relay publishes its snapshot after
        snaps = [f for _, f in await api.redis.xrange(api.env["RTMANAGER_SNAPSHOT_STREAM"]) if f["game_id"] == "r1"]
        return snaps if snaps and snaps[-1]["reason"] == "stopped" else None

    for _ in range(100):
        if await stopped() and await stopped_published():
            break
        await asyncio.sleep(0.1)
    assert await stopped()
    snaps = await stopped_published()
    assert snaps, "the stopped snapshot was not published"
    last = snaps[-1]
    assert last["reason"] == "stopped" and last["error_code"] == "image_rejected" and "disabled" in \
        last["error_message"] and last["engine_version"] == "1.0", last


async def test_a_disabled_version_is_not_restarted_after_a_crash(api):
    await api.start(version_policy="registry", crash_limit="10")
    assert (await create(api, "1.0", STUB_10))[0] == 201
    status, res = await api.job("c1", "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    assert (await api.request("PATCH", f"{V}/1.0", json={"status": "disabled"}))[0] == 200
    [c] = api.containers("c1")
    c.kill()
    for _ in range(100):
        _, body = await api.get("/api/v1/runtimes/c1")
        if body["desired_status"] == "stopped" and body["status"] == "stopped":
            break
        await asyncio.sleep(0.1)
    assert body["last_error_code"] == "image_rejected" and "disabled" in body["last_error_message"], body
    c.reload()
    assert c.status == "exited"


def test_the_versions_cli(rtm_env, database_url):
    env = {**os.environ, **rtm_env}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "controller.cli", "versions", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    assert cli("add", "2.0", STUB_11, "--stop-grace", "3601").returncode == 2
    out = cli("add", "2.0", STUB_11, "--notes", "from the CLI", "--stop-grace", "30")
    assert out.returncode == 0, out.stderr
    assert "30" in cli("list").stdout.splitlines()[1]
    assert cli("stop-grace", "2.0", "x").returncode == 2
    out = cli("stop-grace", "2.0", "default")
    assert out.returncode == 0 and "RTMANAGER_STOP_GRACE" in out.stdout, out
    assert cli("add", "2.0", STUB_10).returncode == 1  # exists
    assert cli("deprecate", "2.0").returncode == 0
    listing = cli("list", "--status", "deprecated")
    assert "2.0" in listing.stdout and "from the CLI" in listing.stdout
    listing = cli("list", "--status", "deprecated", "--json")
    assert [(e["version"], e["status"], e["stop_grace"]) for e in json.loads(listing.stdout)["engine_versions"]] == [
        ("2.0", "deprecated", None)], listing
    assert cli("disable", "2.0").returncode == 0
    assert cli("remove", "2.0").returncode == 0
    assert cli("remove", "2.0").returncode == 1
    assert "2.0" not in cli("list").stdout
    # each change is in the operation log, with the local user as its actor
    import asyncio
    import getpass

    import asyncpg

    async def logged() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(rtm_env["RTMANAGER_DATABASE_URL"])
        try:
            rows = await conn.fetch("SELECT op, actor FROM runtime_operations WHERE game_id IS NULL ORDER BY id")
        finally:
            await conn.close()
        return [(r["op"], r["actor"]) for r in rows]

    me = f"cli:{getpass.getuser()}"
    assert asyncio.run(logged()) == [("version_create", me)] + [("version_update", me)] * 3 + [
        ("version_delete", me)]


async def test_an_engine_is_stopped_with_the_grace_of_its_version(api):
    """An engine that ignores SIGTERM is SIGKILLed after its version's stop_grace (1 s), not after
    RTMANAGER_STOP_GRACE (20 s here), whatever RTMANAGER_VERSION_POLICY."""
    import time
    await api.start(stop_grace="20")
    image = "galaxy/engine-stub:termdeaf"
    status, body = await create(api, "deaf", image, stop_grace=1)
    assert status == 201 and body["stop_grace"] == 1, body
    status, res = await api.job("grace1", "start", {"image_ref": image})
    assert res["outcome"] == "success", res
    t0 = time.monotonic()
    status, res = await api.job("grace1", "stop", wait=60)
    took = time.monotonic() - t0
    assert res["outcome"] == "success", res
    assert took < 10, took
