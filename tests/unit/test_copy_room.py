"""The copy of a game's state taken before a patch keeps RTMANAGER_STATE_MIN_FREE (red-team finding): it
copied until the disk was full, taking the room every other engine needs to save its state (and, as
root, the blocks the filesystem keeps for root). A copy that would leave less than that free is not
taken: the patch fails storage_full and the game goes back to the engine it ran, on its own state."""

from __future__ import annotations

from pathlib import Path

import observed.statedir as statedir_module
from desired.errors import DockerUnavailable
from desired.model import JobKind
from observed.errors import BackendUnavailable
from tests.support.world import IMG, IMG2, World, started


async def test_a_patch_whose_copy_would_leave_too_little_room_is_refused(tmp_path, monkeypatch):
    w = World(tmp_path, RTMANAGER_STATE_MIN_FREE="1000000")
    rec = await started(w)
    (Path(rec.state_path) / "save").write_bytes(b"x" * 4_000_000)
    monkeypatch.setattr(statedir_module, "free_space", lambda root: (4_500_000, 10**10))  # room, but not for a copy
    copies = []
    monkeypatch.setattr(statedir_module, "backup", lambda *a: copies.append(a) or True)
    await w.job(JobKind.PATCH, "g1", IMG2)
    rec = await w.sync("g1")
    for _ in range(3):
        if rec.converged:
            break
        rec = await w.sync("g1")
    assert copies == []
    assert w.results("g1")[-1] == ("patch", "failure", "storage_full")
    assert rec.converged and rec.status.value == "running" and rec.current_image_ref == IMG
    assert (Path(rec.state_path) / "save").stat().st_size == 4_000_000


async def test_a_patch_with_room_for_its_copy_goes_ahead(tmp_path, monkeypatch):
    w = World(tmp_path, RTMANAGER_STATE_MIN_FREE="1000000")
    rec = await started(w)
    (Path(rec.state_path) / "save").write_bytes(b"x" * 4_000_000)
    monkeypatch.setattr(statedir_module, "free_space", lambda root: (6_000_000, 10**10))
    await w.job(JobKind.PATCH, "g1", IMG2)
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("patch", "success", "") and rec.current_image_ref == IMG2


async def test_a_retried_patch_does_not_count_its_own_copy_twice(tmp_path, monkeypatch):
    """Review: a patch retried after a temporary error (the create refused once) measured the room again
    with its own finished copy already on the disk, and refused itself."""
    w = World(tmp_path, RTMANAGER_STATE_MIN_FREE="1000000")
    rec = await started(w)
    (Path(rec.state_path) / "save").write_bytes(b"x" * 4_000_000)
    free = {"bytes": 6_000_000}
    monkeypatch.setattr(statedir_module, "free_space", lambda root: (free["bytes"], 10**10))
    real_backup = statedir_module.backup

    def backup(*args):
        done = real_backup(*args)
        free["bytes"] -= 4_000_000  # the copy took its room
        return done

    monkeypatch.setattr(statedir_module, "backup", backup)
    real_prepare, failed = w.backend.prepare, []

    async def prepare():
        if not failed:
            failed.append(1)
            raise BackendUnavailable("a blip")
        return await real_prepare()

    w.backend.prepare = prepare
    await w.job(JobKind.PATCH, "g1", IMG2)
    for _ in range(4):
        try:
            rec = await w.sync("g1")
        except DockerUnavailable:
            continue
        if rec.converged:
            break
    assert failed and w.results("g1")[-1] == ("patch", "success", "") and rec.current_image_ref == IMG2


async def test_a_copy_a_kill_cut_short_is_not_counted_against_the_room_for_the_next(tmp_path, monkeypatch):
    """Stop 41's open finding: a kill during the copy left ``TAG.tmp``. The retry measured the free space
    with that partial copy still on the disk, and counted the whole copy against it again: a patch that
    fits was refused storage_full. The partial copy, which the copy deletes first anyway, is deleted
    before the room is measured."""
    w = World(tmp_path, RTMANAGER_STATE_MIN_FREE="1000000")
    rec = await started(w)
    (Path(rec.state_path) / "save").write_bytes(b"x" * 4_000_000)
    partial = tmp_path / "games" / ".backups" / "g1" / (rec.current_container_id[:12] + ".tmp")
    partial.mkdir(parents=True)
    (partial / "save").write_bytes(b"x" * 3_000_000)  # what the kill left

    def free_space(root):
        return (6_000_000 - (3_000_000 if partial.exists() else 0), 10**10)

    monkeypatch.setattr(statedir_module, "free_space", free_space)
    await w.job(JobKind.PATCH, "g1", IMG2)
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("patch", "success", "") and rec.current_image_ref == IMG2
    assert not partial.exists()


async def test_a_patch_refused_for_its_copys_room_never_touches_the_running_engine(tmp_path, monkeypatch):
    """Red-team, stop 45: the room for the copy was measured only after the running engine had been stopped
    and removed, so a refused patch cost a healthy game a stop and a start of its old image (its save cut
    for nothing). The room is measured before the engine is touched."""
    w = World(tmp_path, RTMANAGER_STATE_MIN_FREE="1000000")
    rec = await started(w)
    [before] = w.running("g1")
    (Path(rec.state_path) / "save").write_bytes(b"x" * 4_000_000)
    monkeypatch.setattr(statedir_module, "free_space", lambda root: (4_500_000, 10**10))
    removed = []
    real_remove = w.backend.remove

    async def remove(container_id, grace):
        removed.append(container_id)
        return await real_remove(container_id, grace)

    w.backend.remove = remove
    await w.job(JobKind.PATCH, "g1", IMG2)
    for _ in range(4):
        rec = await w.sync("g1")
        if rec.converged:
            break
    assert w.results("g1")[-1] == ("patch", "failure", "storage_full")
    assert removed == [] and [c.id for c in w.running("g1")] == [before.id]
    assert rec.converged and rec.status.value == "running" and rec.current_container_id == before.id
