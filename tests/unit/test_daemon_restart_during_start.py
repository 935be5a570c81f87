"""A restart of the container daemon during a start's health wait is the daemon's, not the engine's
(red-team, stop 43).

Without live-restore, a stopping dockerd stops every container; it still answers on kept-alive
connections and still sends their exits. An engine that a start, restart, patch or rollback was waiting
for then "exited while it started": the start failed. A restart or a start then stopped a healthy game
and told Lobby its job failed; a patch was rolled back (against its rollout's failure budget); a crash's
restart counted one more crash. An exit the daemon caused is now an outage of the daemon (temporary):
the job waits for it and the engine is started again, as a running engine stopped so is."""

from __future__ import annotations

import pytest

from desired.errors import DockerUnavailable
from desired.model import DesiredStatus, JobKind, Status
from tests.support.world import IMG, IMG2, World, started


def daemon_restarts_during_the_health_wait(w: World) -> list[int]:
    """On the first health check of a starting engine, the daemon stops every container."""
    real, done = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if (c is not None and c.state == "running" and not done
                and w.store.records["g1"].status is Status.STARTING):
            done.append(1)
            w.backend.restart_daemon()
        return await real(host)

    w.engine.check = check
    return done


async def until_converged(w: World, rounds: int = 8, every: float = 1):
    """Looks as the worker makes them: a temporary error (the daemon away) is a look to make again."""
    outages = 0
    for _ in range(rounds):
        try:
            rec = await w.sync("g1")
        except DockerUnavailable:
            outages += 1
        else:
            if rec.converged and rec.status is Status.RUNNING:
                break
        w.store.clock.advance(every)
    assert outages == 1  # the start the daemon cut, and only it
    return w.store.records["g1"]


@pytest.mark.parametrize("kind,image,running", [("restart", None, IMG), ("patch", IMG2, IMG2),
                                                ("start", IMG, IMG)])
async def test_a_job_whose_engine_the_daemon_stopped_while_it_started_is_carried_out(tmp_path, kind, image,
                                                                                    running):
    w = World(tmp_path)
    await started(w)
    if kind == "start":  # the start of a stopped game
        await w.job(JobKind.STOP, "g1")
        await w.sync("g1")
    await w.job(JobKind(kind), "g1", image)
    done = daemon_restarts_during_the_health_wait(w)
    rec = await until_converged(w)
    assert done, "the daemon was not restarted during the health wait"
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.RUNNING
    assert rec.current_image_ref == running and not rec.rolling_back and rec.crash_count == 0
    assert w.results("g1")[-1] == (kind, "success", "")
    assert [c.image for c in w.running("g1")] == [running]


async def test_a_crash_restart_the_daemon_cut_is_not_a_second_crash(tmp_path):
    w = World(tmp_path)
    await started(w)
    w.backend.crash("g1")
    done = daemon_restarts_during_the_health_wait(w)
    rec = await until_converged(w, every=5)
    assert done
    assert rec.crash_count == 1 and rec.status is Status.RUNNING and len(w.running("g1")) == 1
