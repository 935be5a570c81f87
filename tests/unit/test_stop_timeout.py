"""Every engine's unit carries rtmanager's stop grace as its own stop timeout (red-team finding). A unit
made with none got the daemon's default, 10 s: a dockerd that stops (without live-restore), a host
shutdown or a plain ``docker stop`` SIGKILLed the engine 10 s after SIGTERM, whatever
RTMANAGER_STOP_GRACE said, and an engine that needs longer to save lost what it had not saved."""

from __future__ import annotations

from desired import versions
from tests.support.world import IMG, World, started


async def test_a_unit_is_made_with_the_global_stop_grace(tmp_path):
    w = World(tmp_path, RTMANAGER_STOP_GRACE="90")
    await started(w)
    assert [s.stop_grace for s in w.backend.specs] == [90.0]


async def test_an_engine_versions_own_grace_still_wins(tmp_path):
    w = World(tmp_path, RTMANAGER_STOP_GRACE="90")
    await w.store.create_version("1.0", IMG, versions.VersionStatus.ACTIVE, "", 300)
    await started(w)
    assert [s.stop_grace for s in w.backend.specs] == [300.0]

