"""Red-team, stop 45: a stop already under way was signalled again. A leader that took over while its
predecessor's stop was in its grace (or a stop retried after its call timed out) saw the engine still running
and stopped it again: a second SIGTERM into the engine's save, which many runtimes take as "exit now". A stop
begun less than its grace (and a margin) ago is now waited for, not repeated; one older than that is
repeated (the first may never have reached the daemon)."""

from __future__ import annotations

from datetime import timedelta

from desired.model import DesiredStatus, JobKind, Status
from tests.support.world import World, started


async def test_a_stop_begun_by_a_predecessor_is_waited_for_not_signalled_again(tmp_path) -> None:
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    await w.job(JobKind.STOP, "g1")
    rec = w.store.records["g1"]
    # the previous leader wrote that its stop was under way 5 s ago, and died in the engine's grace
    w.store.records["g1"] = rec.replace(stopping_since=w.store.clock.now() - timedelta(seconds=5))
    rec = await w.sync("g1")
    assert w.backend.ops("stop") == [] and rec.desired_status is DesiredStatus.STOPPED
    assert len(w.running("g1")) == 1
    w.store.clock.advance(60)  # past its grace and the margin: that stop never came, or did not end it
    rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED
