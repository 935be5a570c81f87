"""A game's state directory has a lifecycle: a copy around a patch (restored by a rollback, dropped
once the new engine is healthy), deletion some time after the game was removed, a measured size, and
refused new starts when the state root's filesystem is nearly full. Never through a planted symlink."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import eventually
from tests.support.api import STUB_10, STUB_11, Api
from tests.support.local import cleanup_docker


async def record(api, game: str) -> dict:
    status, body = await api.get(f"/api/v1/runtimes/{game}")
    assert status == 200, body
    return body


def backups(api, game: str) -> list[str]:
    where = Path(api.env["RTMANAGER_STATE_ROOT"]) / ".backups" / game
    return sorted(os.listdir(where)) if where.is_dir() else []


def plant_symlink(state: Path, tmp_path: Path) -> Path:
    """A file outside the state root, and a symlink to it (and to its directory) in the state dir."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_text("do not touch")
    os.symlink(outside / "secret", state / "link-to-file")
    os.symlink(outside, state / "link-to-dir")
    return outside


def untouched(outside: Path) -> None:
    assert (outside / "secret").read_text() == "do not touch"
    assert sorted(os.listdir(outside)) == ["secret"]


async def test_a_failed_patch_restores_the_old_state_under_the_old_image(api, tmp_path, unique):
    """The new engine (the stub's crash variant) writes its boot into the state directory, then
    exits: the rollback starts the old image on the state the old engine left, not on that."""
    await api.start(start_timeout="3")
    game = f"st1-{unique}"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    state = Path(api.env["RTMANAGER_STATE_ROOT"]) / game
    (state / "marker").write_text("old engine")
    outside = plant_symlink(state, tmp_path)
    boots_before = (state / "boots").read_text()

    status, res = await api.job(game, "patch", {"image_ref": "galaxy/engine-stub:crash"}, wait=60)
    assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed", res

    async def back_on_old_image():
        rec = await record(api, game)
        return rec if (rec["status"] == "running" and rec["current_image_ref"] == STUB_10
                       and rec["observed_generation"] == rec["generation"]) else None

    await eventually(back_on_old_image, 30, "the game running again on its old image")
    boots = (state / "boots").read_text()
    # The old engine's boots, then the rollback's boot: the crashed engine's boot was undone.
    assert boots.startswith(boots_before) and len(boots.splitlines()) == len(boots_before.splitlines()) + 1, boots
    assert (state / "marker").read_text() == "old engine"
    assert os.readlink(state / "link-to-file") == str(outside / "secret")  # restored as a link
    untouched(outside)
    await eventually(lambda: backups(api, game) == [], 10, "the copy dropped once the old engine is back")


async def test_a_successful_patch_drops_its_copy(api, tmp_path, unique):
    await api.start()
    game = f"st2-{unique}"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    state = Path(api.env["RTMANAGER_STATE_ROOT"]) / game
    (state / "marker").write_text("kept")
    outside = plant_symlink(state, tmp_path)
    status, res = await api.job(game, "patch", {"image_ref": STUB_11}, wait=60)
    assert res["outcome"] == "success", res
    await eventually(lambda: backups(api, game) == [], 10, "the copy dropped once the new engine is healthy")
    assert (state / "marker").read_text() == "kept"
    untouched(outside)


async def test_a_removed_games_state_is_deleted_after_the_retention_never_while_a_unit_exists(api, tmp_path, unique):
    await api.start(state_retention="1", state_scan_interval="0.5", cleanup_ttl="0")
    game = f"st3-{unique}"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    state = Path(api.env["RTMANAGER_STATE_ROOT"]) / game
    outside = plant_symlink(state, tmp_path)

    # Measured, on the REST API.
    async def measured():
        rec = await record(api, game)
        return rec if rec.get("state_bytes") and rec.get("state_measured_at") else None

    await eventually(measured, 20, "the state directory measured")
    untouched(outside)

    status, res = await api.job(game, "stop", {"reason": "cancelled"}, wait=60)
    assert res["outcome"] == "success", res
    status, res = await api.job(game, "cleanup", {}, wait=60)
    assert res["outcome"] == "success", res
    assert (await record(api, game))["status"] == "removed"
    # Removal is final: the game_id cannot be started again, so no start can meet a pending disposal.
    status, res = await api.job(game, "start", {"image_ref": STUB_10}, wait=60)
    assert res["outcome"] == "failure" and res["error_code"] == "invalid_request", res
    # A unit holding the game's name exists (not rtmanager's: it is never touched): the directory
    # stays, whatever the record says.
    squatter = api.docker.containers.create(STUB_10, name=f"galaxy-game-{game}",
                                            labels={"com.galaxy.instance": api.env["RTMANAGER_INSTANCE"]})
    try:
        ctl = api.running[-1][0]
        rounds = ctl.storage.rounds
        await eventually(lambda: ctl.storage.rounds >= rounds + 4, 20, "four storage rounds, past the retention")
        assert state.is_dir()
    finally:
        squatter.remove(force=True)
    await eventually(lambda: not state.exists(), 20, "the removed game's state directory deleted")
    untouched(outside)

    async def forgotten() -> bool:  # written right after the deletion (a CI run read it between the two)
        return (await record(api, game))["state_bytes"] is None

    await eventually(forgotten, 20, "the record's size of the deleted directory cleared")


async def test_new_starts_are_refused_when_the_state_filesystem_is_nearly_full(api, unique):
    """The threshold set above the filesystem's size: every new start is refused with storage_full
    and /readyz says why; a restart of an existing game is not refused."""
    await api.start(state_min_free="0")
    status, res = await api.job(f"st4-{unique}", "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    await api.stop_all()
    api.port = 0  # the next controller's

    await api.start(state_min_free="100%")
    status, res = await api.job(f"st5-{unique}", "start", {"image_ref": STUB_10}, wait=60)
    assert res["outcome"] == "failure" and res["error_code"] == "storage_full", res
    assert "RTMANAGER_STATE_MIN_FREE" in res["error_message"], res
    assert not (Path(api.env["RTMANAGER_STATE_ROOT"]) / f"st5-{unique}").exists()
    status, body = await api.get("/readyz", auth=False)
    assert status == 503 and body["checks"]["state_storage"].startswith("error: "), body
    assert "RTMANAGER_STATE_MIN_FREE" in body["checks"]["state_storage"], body

    status, res = await api.job(f"st4-{unique}", "restart", {}, wait=60)
    assert res["outcome"] == "success", res


async def test_a_controller_gone_mid_patch_still_restores_the_copy_and_drops_leftovers(api, tmp_path, unique):
    """The controller stops while the new engine (the mute variant: it boots, writes its boot, never
    answers) is waited for; the next controller rolls back from the copy the first one took. A
    leftover copy of an older replacement is never restored, and the storage round deletes it."""
    await api.start(start_timeout="60")
    game = f"st6-{unique}"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    state = Path(api.env["RTMANAGER_STATE_ROOT"]) / game
    (state / "marker").write_text("old engine")
    boots_before = (state / "boots").read_text()
    leftover = Path(api.env["RTMANAGER_STATE_ROOT"]) / ".backups" / game / "0000deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "marker").write_text("an older state")

    status, accepted = await api.job(game, "patch", {"image_ref": "galaxy/engine-stub:mute"}, wait=0)
    assert status == 202, accepted

    def new_engine_booted():
        return len((state / "boots").read_text().splitlines()) == len(boots_before.splitlines()) + 1

    await eventually(new_engine_booted, 30, "the new engine booted on the state directory")
    assert len(backups(api, game)) == 2  # the leftover, and the copy of this replacement
    await api.stop_all()
    api.port = 0

    await api.start(start_timeout="2", state_scan_interval="0.5")

    async def rolled_back():
        rec = await record(api, game)
        return rec if (rec["status"] == "running" and rec["current_image_ref"] == STUB_10
                       and rec["observed_generation"] == rec["generation"]) else None

    await eventually(rolled_back, 60, "the game rolled back to its old image")
    assert (state / "marker").read_text() == "old engine"
    boots = (state / "boots").read_text()
    assert boots.startswith(boots_before) and len(boots.splitlines()) == len(boots_before.splitlines()) + 1, boots
    await eventually(lambda: backups(api, game) == [], 20, "every copy deleted")


@pytest.fixture
def small_state_fs(tmp_path):
    """An 8 MiB tmpfs of the test's own (lazily unmounted afterwards)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0711", "tmpfs", str(small)], check=True)
    yield small
    subprocess.run(["umount", "-l", str(small)], check=False)


async def test_a_copy_that_runs_out_of_space_fails_the_patch_with_storage_full_and_keeps_the_game(
        rtm_env, docker_client, small_state_fs, unique):
    """The state root on a small tmpfs of the test's own: the copy before a patch does not fit. The
    patch fails with storage_full, the game goes back to its old image on its untouched state, and
    no half-made copy stays."""
    small = small_state_fs
    env = {**rtm_env, "RTMANAGER_STATE_ROOT": str(small / "games")}
    api = Api(env, docker_client)
    try:
        await api.start(state_min_free="0")
        game = f"st7-{unique}"
        status, res = await api.job(game, "start", {"image_ref": STUB_10})
        assert res["outcome"] == "success", res
        state = small / "games" / game
        (state / "big").write_bytes(b"x" * (5 << 20))
        status, res = await api.job(game, "patch", {"image_ref": STUB_11}, wait=60)
        assert res["outcome"] == "failure" and res["error_code"] == "storage_full", res

        async def back_on_old_image():
            rec = await record(api, game)
            return rec if (rec["status"] == "running" and rec["current_image_ref"] == STUB_10
                           and rec["observed_generation"] == rec["generation"]) else None

        await eventually(back_on_old_image, 30, "the game running again on its old image")
        assert (state / "big").stat().st_size == 5 << 20
        assert [n for n in backups(api, game) if n.endswith(".tmp")] == []
    finally:
        try:
            await api.stop_all()
            await api.close()
        finally:
            cleanup_docker(docker_client, env["RTMANAGER_INSTANCE"], env["RTMANAGER_DOCKER_NETWORK"])
