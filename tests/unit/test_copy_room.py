"""The copy of a game's state taken before a patch keeps RTMANAGER_STATE_MIN_FREE (red-team finding): it
copied until the disk was full, taking the room every other engine needs to save its state (and, as
root, the blocks the filesystem keeps for root). A copy that would leave less than that free is not
taken: the patch fails storage_full and the game goes back to the engine it ran, on its own state."""

from __future__ import annotations

from pathlib import Path

import observed.statedir as statedir_module
from desired.model import JobKind
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
