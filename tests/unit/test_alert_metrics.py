"""The gauges the alert rules read that the resync refreshes: turn lateness from the store, in
whole intervals past the due time, for every game that should be turning."""

from __future__ import annotations

from datetime import timedelta

from controller.metrics import Metrics
from controller.triggers import Resync
from desired.model import JobKind, Status
from tests.support.world import IMG, World


async def test_the_resync_reports_how_late_the_turns_are(tmp_path):
    w = World(tmp_path)
    for game in ("g1", "g2", "g3"):
        await w.job(JobKind.START, game, IMG)
        assert (await w.sync(game)).status is Status.RUNNING
    now = w.store.clock.now()
    for game, ago in (("g1", 5), ("g2", 35), ("g3", 22)):
        w.store.records[game] = w.store.records[game].replace(
            turn_interval=10, admin_api=True, last_turn_at=now - timedelta(seconds=ago),
            clock_from=now - timedelta(seconds=ago))
    metrics = Metrics()

    async def ready() -> bool:
        return True

    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue, metrics=metrics,
                    interval=1, retention_days=0, ready_check=ready)
    await resync.once()
    assert metrics.turn_lateness._value.get() == 2.5  # g2: due 25 s ago on a 10 s clock
    assert metrics.turns_late._value.get() == 2      # g2 and g3 (1.2 intervals)

    w.store.records["g2"] = w.store.records["g2"].replace(paused=True)  # a paused clock is not late
    w.store.records["g3"] = w.store.records["g3"].replace(last_turn_at=now)
    await resync.once()
    assert metrics.turn_lateness._value.get() == 0 and metrics.turns_late._value.get() == 0
