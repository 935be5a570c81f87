"""The controller in process against real Postgres, Redis and Docker (issue 4's scenarios)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.spec import build_spec
from desired.db.store import Store
from desired.jobs import Job
from desired.model import DesiredStatus, JobKind, OpSource, Status, StopReason
from observed.docker import DockerBackend, ensure_state_dir
from tests.support import Harness, eventually, settled


@pytest.fixture
async def h(rtm_env, docker_client):
    harness = Harness(rtm_env, docker_client)
    yield harness
    await harness.stop_all()
    await harness.redis.aclose()


async def recorded_start(store, settings, game_id):
    """A start job recorded, its state directory made: what a controller does before creating."""
    await store.submit(Job(kind=JobKind.START, game_id=game_id, source=OpSource.LOBBY,
                           image_ref="galaxy/engine-stub:1.0"), settings.record_defaults)
    record = await store.get(game_id)
    ensure_state_dir(settings.storage.state_root, record.state_path)
    return record


async def test_concurrent_creates_of_one_name_give_one_container(h, pool):
    """The loser of a name race gets the winner's container, not an error: Docker answers 409
    before the winner's container can be inspected by name."""
    settings = h.settings()
    record = await recorded_start(Store(pool), settings, "twice-1")
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network)
    try:
        await adapter.ensure_network()
        units = await asyncio.gather(*(adapter.create(build_spec(settings, record)) for _ in range(4)))
    finally:
        adapter.close()
    assert len({u.id for u in units}) == 1
    assert [c.id for c in h.containers("twice-1")] == [units[0].id]


async def test_a_create_asks_the_daemon_once_and_says_what_an_inspect_would(h, pool):
    """Issue 25 (CPU per start): a create made three daemon calls (an image check, the create, an inspect);
    now one. What it returns must be what an inspect shows of the new container, field for field where the
    start goes by it; a missing image is still pulled once, then ``ImageMissing``."""
    import dataclasses

    from observed.errors import ImageMissing

    settings = h.settings()
    record = await recorded_start(Store(pool), settings, "once-1")
    calls: list[str] = []
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network,
                            observer=lambda op, seconds, ok: calls.append(op))
    try:
        await adapter.ensure_network()
        spec = dataclasses.replace(build_spec(settings, record), admin_token="t0ken")
        calls.clear()
        made = await adapter.create(spec)
        assert calls == ["create"]
        seen = await adapter.inspect(made.id)
        assert seen is not None
        for name in ("id", "name", "image", "state", "admin_token", "mounts", "running", "spec_hash"):
            assert getattr(made, name) == getattr(seen, name), name
        assert made.labels.items() <= seen.labels.items()  # an inspect adds the image's own labels
        assert made.managed_by(settings.leadership.instance)
        assert adapter._docker().api.trust_env is False  # a local socket: requests reads no proxy settings
        # A game whose name says "network" (the create's URL carries it): still a missing image, pulled once
        # (review: the first version took any 404 naming "network" for a deleted network, and never pulled).
        absent = dataclasses.replace(build_spec(settings, await recorded_start(Store(pool), settings, "network-2")),
                                     image="galaxy/engine-stub:not-here")
        calls.clear()
        with pytest.raises(ImageMissing):
            await adapter.create(absent)
        assert calls == ["create", "image_inspect", "pull"]
    finally:
        adapter.close()


async def test_a_network_deleted_behind_our_back_is_made_again_when_a_start_finds_it_gone(h, pool, docker_client):
    """A game network deleted from outside: this dockerd creates a container on it all the same and refuses
    its start with a 404 naming the network. That start was taken for a container gone (a failed start, and
    every later start failed too, the network being made once per process); now the network is made again
    and the start goes on."""
    settings = h.settings()
    record = await recorded_start(Store(pool), settings, "nonet-1")
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network)
    try:
        await adapter.prepare()
        made = await adapter.create(build_spec(settings, record))
        await asyncio.to_thread(docker_client.networks.get(settings.runtime.docker_network).remove)
        await adapter.start(made.id)
        seen = await adapter.inspect(made.id)
        assert seen is not None and seen.running and seen.address, seen
        # One that ran before keeps the deleted network's id: refused (a failed start, as before), not a
        # temporary failure retried for ever (review of 4af39db).
        from observed.errors import Refused

        await adapter.stop(made.id, 1)
        await asyncio.to_thread(docker_client.networks.get(settings.runtime.docker_network).remove)
        with pytest.raises(Refused, match="network"):
            await adapter.start(made.id)
    finally:
        adapter.close()


async def test_the_event_stream_hands_on_what_others_do_and_not_the_echo_of_our_own_start(h, pool, docker_client):
    """Issue 25 (CPU per start): the ``start`` event of a container rtmanager had just started woke one more
    look of the game. Events come in order: once the ``kill`` somebody else sent after our start has come,
    our start's event would have come before it."""
    settings = h.settings()
    record = await recorded_start(Store(pool), settings, "echo-1")
    seen: list[str] = []
    connected = asyncio.Event()
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network)
    watcher = adapter.events(on_event=lambda game, action: seen.append(action + ":" + game), on_connect=connected.set)
    watcher.start()
    try:
        await asyncio.wait_for(connected.wait(), 10)
        await adapter.ensure_network()
        made = await adapter.create(build_spec(settings, record))
        await adapter.start(made.id)
        await asyncio.to_thread(docker_client.containers.get(made.id).kill)  # not ours: news
        await eventually(lambda: "die:echo-1" in seen, 10, "the kill's events", interval=0.05)
        assert "start:echo-1" not in seen and seen.index("kill:echo-1") < seen.index("die:echo-1"), seen
        await adapter.remove(made.id, 1)
    finally:
        watcher.stop()
        adapter.close()


async def test_adopts_a_container_created_by_an_earlier_process(h, pool):
    """A start job recorded and a container created by a controller that then died: adopted, not duplicated."""
    store = Store(pool)
    settings = h.settings()
    record = await recorded_start(store, settings, "adopt-1")
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network)
    try:
        await adapter.ensure_network()
        created = await adapter.create(build_spec(settings, record))
        await adapter.start(created.id)
    finally:
        adapter.close()
    await h.start()
    rec = await eventually(lambda: _converged(store, "adopt-1"), what="convergence")
    assert rec.current_container_id == created.id
    assert [c.id for c in h.containers("adopt-1")] == [created.id]


async def test_adopting_a_renamed_unit_makes_no_second_engine(h, pool):
    """Stop 41's open finding: ``rtmanager adopt`` of a unit that runs under another name (renamed from
    outside) made a record that named no unit. The game's next round found nothing under its name and
    created a second engine on the same state directory. The record now names the unit it adopted."""
    from controller.cli.local import adopt

    store = Store(pool)
    settings = h.settings()
    entry = await h.submit_start("renamed-1")
    await h.start()
    first = await eventually(lambda: _converged(store, "renamed-1"), what="first convergence")
    assert (await h.result(entry))["outcome"] == "success"
    await h.stop_all()
    # A database restored from a backup older than the game, and the unit renamed meanwhile.
    await pool.execute("DELETE FROM runtime_records WHERE game_id = 'renamed-1'")
    [unit] = h.containers("renamed-1")
    unit.rename("galaxy-game-renamed-1-by-hand")
    assert await adopt(settings, ["renamed-1"], False) == 0
    assert (await store.get("renamed-1")).current_container_id == first.current_container_id
    await h.start()
    rec = await eventually(lambda: _converged(store, "renamed-1"), what="convergence after the adoption")
    assert rec.current_container_id == first.current_container_id
    assert [c.id for c in h.containers("renamed-1")] == [first.current_container_id]


async def test_the_lease_is_handed_over_only_once_every_file_thread_of_the_term_has_ended(h, pool):
    """Stop 41's open finding: a shutdown released the lease before its cancelled leader tasks ended. A task
    cancelled inside a copy or restore of a state directory waits for its file thread (``storage.in_thread``),
    and a standby that took the lease meanwhile could copy or restore the same game's directory beside it (the
    game's lock is per process). The lease now outlives every such thread."""
    import threading

    from controller import storage

    ctl = await h.start()
    await eventually(lambda: ctl.is_leader, what="leadership")
    started, go = threading.Event(), threading.Event()
    ended_at: list[datetime] = []

    def a_long_copy() -> None:
        started.set()
        go.wait(30)
        ended_at.append(datetime.now(UTC))

    ctl._spawn("state-copy", lambda: storage.in_thread(a_long_copy), leader=True)
    await eventually(started.is_set, what="the file thread under way")

    async def released() -> bool:
        return bool(await pool.fetchval("SELECT expires_at <= now() FROM leader_leases WHERE instance = $1",
                                        h.settings().leadership.instance))

    [(_, task)] = h.running
    h.running.clear()
    ctl.stopping.set()
    with contextlib.suppress(AssertionError):  # the old order released it at once; now it must not
        await eventually(released, timeout=3, what="an early release")
    assert not await released(), "the lease was released while a file thread of the term still ran"
    go.set()
    assert await asyncio.wait_for(task, 40) == 0
    assert await released()
    expires_at = await pool.fetchval("SELECT expires_at FROM leader_leases WHERE instance = $1",
                                     h.settings().leadership.instance)
    assert ended_at and expires_at >= ended_at[0]


async def test_after_a_restore_of_the_database_snapshot_revisions_go_on_above_what_lobby_was_sent(h, pool):
    """Red-team finding: a database restored from an older backup numbered a game's next snapshots from its
    record, below the revisions Lobby holds, so Lobby dropped them. A new term raises them first."""
    async def revisions() -> list[int]:
        entries = await h.redis.xrange(h.env["RTMANAGER_SNAPSHOT_STREAM"])
        return [int(f["revision"]) for _, f in entries if f["game_id"] == "floor-1"]

    store = Store(pool)
    entry = await h.submit_start("floor-1")
    await h.start()
    await eventually(lambda: _converged(store, "floor-1"), what="convergence")
    assert (await h.result(entry))["outcome"] == "success"
    await h.stop_all()
    sent = max(await revisions())
    # The restore: the record and the outbox as they were when the game had just been admitted.
    await pool.execute("UPDATE runtime_records SET snapshot_revision = 1 WHERE game_id = 'floor-1'")
    await pool.execute("DELETE FROM job_results WHERE game_id = 'floor-1' AND kind = 'snapshot'"
                       " AND (fields->>'revision')::bigint > 1")
    await h.start()
    stop = await h.submit_stop("floor-1")
    assert (await h.result(stop, "stop"))["outcome"] == "success"
    after = await eventually(lambda: _after(revisions, sent), what="a snapshot after the restart")
    assert min(after) > sent, (sent, after)


async def _after(revisions, sent: int):
    every = await revisions()
    return every[every.index(sent) + 1:] or None


async def test_a_created_but_never_started_container_is_started_not_duplicated(h, pool):
    """The state a kill -9 between create and start leaves behind."""
    store = Store(pool)
    settings = h.settings()
    entry = await h.submit_start("half-1")
    ctl = await h.start(concurrency="1")
    await eventually(lambda: _converged(store, "half-1"), what="first convergence")
    await h.stop_all()
    # Put the world back to "created, not started, record starting", as after a crash mid-way.
    [c] = h.containers("half-1")
    c.stop(timeout=1)
    c.remove()
    await pool.execute("UPDATE runtime_records SET status = 'starting', observed_generation = 0,"
                       " current_container_id = NULL WHERE game_id = 'half-1'")
    adapter = DockerBackend(instance=settings.leadership.instance, network=settings.runtime.docker_network)
    try:
        created = await adapter.create(build_spec(settings, await store.get("half-1")))
    finally:
        adapter.close()
    assert created.state == "created"
    await h.start()
    rec = await eventually(lambda: _converged(store, "half-1"), what="convergence after restart")
    assert rec.current_container_id == created.id
    assert [c.id for c in h.containers("half-1")] == [created.id]
    assert (await h.result(entry))["outcome"] == "success"
    del ctl


async def test_never_disposes_of_a_unit_without_a_record_whatever_its_labels(h, docker_client, unique, pool):
    """A container of this instance without a record is left running and reported, even one whose
    labels say it was created under this database in a term it knows: a database restored from an
    older backup of itself has no record of the games started after the backup."""
    settings = h.settings()
    ctl = await h.start(orphan_grace="1", resync_interval="0.5")
    await eventually(lambda: ctl.is_leader, what="leadership")
    uid = str(await pool.fetchval("SELECT uid FROM controller_identity"))
    docker_client.networks.create(settings.runtime.docker_network, driver="bridge")
    common = dict(image="galaxy/engine-stub:1.0", detach=True, network=settings.runtime.docker_network)
    ours = {"com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": settings.leadership.instance}
    after_backup = docker_client.containers.run(name=f"galaxy-game-orphan-{unique}", labels={
        **ours, "com.galaxy.game-id": f"orphan-{unique}", "com.galaxy.database": uid,
        "com.galaxy.epoch": str(ctl.fence.epoch)}, **common)
    unowned = docker_client.containers.run(name=f"galaxy-game-unowned-{unique}", labels={
        **ours, "com.galaxy.game-id": f"unowned-{unique}", "com.galaxy.database": "another-database",
        "com.galaxy.epoch": "1"}, **common)
    future = docker_client.containers.run(name=f"galaxy-game-future-{unique}", labels={
        **ours, "com.galaxy.game-id": f"future-{unique}", "com.galaxy.database": uid,
        "com.galaxy.epoch": str(ctl.fence.epoch + 5)}, **common)  # a database restored from an older backup
    foreign = docker_client.containers.run(name=f"galaxy-game-foreign-{unique}", **common)
    other_instance = docker_client.containers.run(name=f"galaxy-game-other-{unique}", labels={
        "com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": f"someone-else-{unique}",
        "com.galaxy.game-id": f"other-{unique}"}, **common)
    kept = (after_backup, foreign, other_instance, unowned, future)
    resyncs = ctl.metrics.resyncs.labels("ok")
    try:
        await eventually(lambda: ctl.metrics.unowned._value.get() == 3, what="three unowned counted")
        assert ctl.resync.unowned == 3  # what /readyz reports
        seen = resyncs._value.get()
        await eventually(lambda: resyncs._value.get() >= seen + 4, what="four more resyncs, well past the grace")
        for c in kept:
            c.reload()
            assert c.status == "running", c.name
        assert ctl.metrics.unowned._value.get() == 3
    finally:
        for c in kept:
            c.remove(force=True)


async def test_dry_run_takes_no_action(h, docker_client, unique, pool, caplog):
    settings = h.settings()
    caplog.set_level("INFO", logger="rtmanager.reconciler")
    ctl = await h.start(dry_run="1", orphan_grace="0", resync_interval="0.5")
    await eventually(lambda: ctl.is_leader, what="leadership")
    docker_client.networks.create(settings.runtime.docker_network, driver="bridge")
    orphan = docker_client.containers.run(
        "galaxy/engine-stub:1.0", detach=True, name=f"galaxy-game-dry-{unique}",
        network=settings.runtime.docker_network,
        labels={"com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": settings.leadership.instance,
                "com.galaxy.game-id": f"dry-{unique}", "com.galaxy.epoch": str(ctl.fence.epoch),
                "com.galaxy.database": str(await pool.fetchval("SELECT uid FROM controller_identity"))})
    await h.submit_start("dry-2")
    await eventually(lambda: "dry run: would create" in caplog.text, what="dry-run log lines")
    assert h.containers("dry-2") == []
    orphan.reload()
    assert orphan.status == "running"
    assert (await Store(pool).get("dry-2")).status is Status.STARTING


async def test_kill_from_outside_is_noticed_through_events_and_restarted(h, pool):
    store = Store(pool)
    await h.start(resync_interval="300")  # only events can notice within the test's time
    await h.result(await h.submit_start("kill-1"))
    [c] = h.containers("kill-1")
    started = time.monotonic()
    c.kill()
    rec = await eventually(lambda: _crashed_and_back(store, "kill-1"), timeout=10, what="restart after kill")
    assert time.monotonic() - started < 10
    assert rec.crash_count == 1 and rec.last_exit_code == 137 and not rec.last_oom_killed
    assert [x.id for x in h.containers("kill-1")] == [c.id]  # restarted in place
    ops = await store.operations("kill-1")
    crash = next(o for o in ops if o.source is OpSource.RECONCILER)
    assert crash.params["exit_code"] == 137 and "engine-stub" in crash.params["log_tail"]


async def test_crash_loop_ends_in_a_terminal_failure(h, pool):
    store = Store(pool)
    await h.start(resync_interval="300", crash_limit="2")
    await h.result(await h.submit_start("loop-1"))
    [c] = h.containers("loop-1")
    c.kill()
    await eventually(lambda: _crashed_and_back(store, "loop-1"), timeout=10, what="first restart")
    c.reload()
    c.kill()
    rec = await eventually(lambda: _given_up(store, "loop-1"), timeout=10, what="terminal failure")
    assert rec.last_error_code.value == "container_start_failed" and "crash loop" in rec.last_error_message
    assert rec.crash_count == 2
    c.reload()
    assert c.status == "exited"


@pytest.mark.parametrize("desired", ["running", "stopped"])
async def test_rm_from_outside_is_recreated_or_recorded(h, pool, desired):
    store = Store(pool)
    await h.start(resync_interval="300")
    await h.result(await h.submit_start("rm-1"))
    if desired == "stopped":
        await h.result(await h.submit_stop("rm-1"), job="stop")
    [c] = h.containers("rm-1")
    c.remove(force=True)
    if desired == "running":
        rec = await eventually(lambda: _converged(store, "rm-1", other_than=c.id), timeout=10, what="recreated")
        assert rec.status is Status.RUNNING
        assert [x.id for x in h.containers("rm-1")] == [rec.current_container_id]
    else:
        async def recorded():
            r = await store.get("rm-1")
            return r if r.current_container_id is None and r.status is Status.STOPPED else None
        await eventually(recorded, timeout=10, what="container gone recorded")
        assert h.containers("rm-1") == []


async def test_new_image_recreates_the_container_and_keeps_the_state(h, pool, rtm_env):
    store = Store(pool)
    await h.start()
    first = await h.result(await h.submit_start("img-1", "galaxy/engine-stub:1.0"))
    state = Path(rtm_env["RTMANAGER_STATE_ROOT"]) / "img-1"
    (state / "save.dat").write_text("turn 42")
    second = await h.result(await h.submit_start("img-1", "galaxy/engine-stub:1.1"))
    assert second["outcome"] == "success" and second["container_id"] != first["container_id"]
    [c] = h.containers("img-1")
    assert c.id == second["container_id"] and c.attrs["Config"]["Image"] == "galaxy/engine-stub:1.1"
    assert (state / "save.dat").read_text() == "turn 42"
    assert len((state / "boots").read_text().splitlines()) == 2  # both engines wrote into the same directory
    assert (state.stat().st_mode & 0o777) == 0o700
    rec = await store.get("img-1")
    assert rec.current_image_ref == "galaxy/engine-stub:1.1" and rec.generation == 2


async def test_an_engine_that_exits_at_once_fails_without_a_hot_loop(h, pool, docker_client):
    store = Store(pool)
    ctl = await h.start(resync_interval="0.5")
    since = int(time.time()) - 1
    res = await h.result(await h.submit_start("crash-1", "galaxy/engine-stub:crash"))
    assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed"
    assert "exited with code 3" in res["error_message"] and "crashing as asked" in res["error_message"]
    rec = await eventually(lambda: _status(store, "crash-1", Status.STOPPED), what="recorded stopped")
    assert rec.desired_status is DesiredStatus.STOPPED and rec.converged
    resyncs = ctl.metrics.resyncs.labels("ok")._value.get()
    await eventually(lambda: ctl.metrics.resyncs.labels("ok")._value.get() >= resyncs + 2, what="two resyncs")
    starts = list(docker_client.events(since=since, until=int(time.time()) + 1, decode=True,
                                       filters={"container": "galaxy-game-crash-1", "event": "start"}))
    assert len(starts) == 1


async def test_an_engine_that_never_answers_is_unhealthy_and_stopped(h, pool):
    await h.start(start_timeout="1.5")
    res = await h.result(await h.submit_start("mute-1", "galaxy/engine-stub:mute"))
    [c] = h.containers("mute-1")  # at the moment the failure is read (issue 21 #10)
    assert c.status == "exited", c.status
    assert res["outcome"] == "failure" and res["error_code"] == "engine_unhealthy"
    assert "/healthz" in res["error_message"]
    # the failed generation turns the game to stopped; the stop comes first, then the answer with the record
    rec = await Store(pool).get("mute-1")
    assert rec.status is Status.STOPPED and rec.converged and rec.desired_status is DesiredStatus.STOPPED
    [op] = await Store(pool).operations("mute-1")
    exited = datetime.fromisoformat(c.attrs["State"]["FinishedAt"][:26].rstrip("Z") + "+00:00")
    assert op.finished_at is not None and exited <= op.finished_at, (exited, op.finished_at)


async def test_missing_image_is_image_unavailable(h):
    await h.start()
    res = await h.result(await h.submit_start("noimg-1", "galaxy/engine-stub:does-not-exist"))
    assert res["outcome"] == "failure" and res["error_code"] == "image_unavailable"


async def test_cleanup_ttl_removes_stopped_containers_and_keeps_the_record(h, pool):
    store = Store(pool)
    await h.start(cleanup_ttl="1", resync_interval="0.5")
    await h.result(await h.submit_start("ttl-1"))
    await h.result(await h.submit_stop("ttl-1"), job="stop")
    rec = await eventually(lambda: _status(store, "ttl-1", Status.REMOVED), timeout=10, what="removed after TTL")
    assert rec.removed_at is not None and rec.desired_status is DesiredStatus.REMOVED
    assert h.containers("ttl-1") == []


async def _converged(store: Store, game: str, other_than: str | None = None):
    rec = await store.find(game)
    if rec and rec.converged and rec.status is Status.RUNNING and rec.current_container_id != other_than:
        return rec
    return None


async def _crashed_and_back(store: Store, game: str):
    rec = await store.find(game)
    if rec and rec.crash_count >= 1 and rec.status is Status.RUNNING and rec.health.value == "healthy":
        return rec
    return None


async def _given_up(store: Store, game: str):
    rec = await store.find(game)
    return rec if rec and rec.desired_status is DesiredStatus.STOPPED and rec.status is Status.STOPPED else None


async def _status(store: Store, game: str, status: Status):
    rec = await store.find(game)
    return rec if rec and rec.status is status else None


def test_stop_reason_vocabulary_matches_the_contract():
    assert [r.value for r in StopReason] == ["orphan_cleanup", "cancelled", "finished", "admin_request", "timeout"]


async def test_periodic_probe_marks_a_stalled_engine_unreachable_and_back(h, pool):
    store = Store(pool)
    await h.start(health_interval="0.5", resync_interval="300")
    await h.result(await h.submit_start("health-1"))
    [c] = h.containers("health-1")
    assert c.exec_run(["sh", "-c", "kill -STOP $(pidof httpd)"]).exit_code == 0
    rec = await eventually(lambda: _health(store, "health-1", "unreachable"), timeout=10, what="unreachable")
    assert rec.status is Status.RUNNING and rec.health_checked_at is not None
    assert c.exec_run(["sh", "-c", "kill -CONT $(pidof httpd)"]).exit_code == 0
    await eventually(lambda: _health(store, "health-1", "healthy"), timeout=10, what="healthy again")


async def _health(store: Store, game: str, health: str):
    rec = await store.find(game)
    return rec if rec and rec.health.value == health else None


async def test_a_foreign_container_holding_the_name_is_never_recorded_as_ours(h, pool, docker_client, unique):
    """Desired stopped while somebody else's container holds the name: converge without touching it."""
    store = Store(pool)
    settings = h.settings()
    docker_client.networks.create(settings.runtime.docker_network, driver="bridge")
    foreign = docker_client.containers.run("galaxy/engine-stub:1.0", detach=True, name="galaxy-game-held-1",
                                           network=settings.runtime.docker_network)
    try:
        ctl = await h.start()
        res = await h.result(await h.submit_start("held-1"))
        assert res["error_code"] == "container_start_failed" and "does not manage" in res["error_message"]
        rec = await eventually(lambda: _status(store, "held-1", Status.STOPPED), what="recorded stopped")
        assert rec.converged and rec.current_container_id is None
        await settled(ctl, horizon=60)  # nothing keeps working on it: no retry planned
        assert (await store.get("held-1")).generation == rec.generation
        foreign.reload()
        assert foreign.status == "running"
    finally:
        foreign.remove(force=True)


async def test_an_engine_that_fails_its_restarts_is_counted_up_to_the_limit(h, pool):
    """A failed restart after a crash is one more crash (backoff, limit), not a failed start job."""
    store = Store(pool)
    await h.start(resync_interval="300", crash_limit="3")
    res = await h.result(await h.submit_start("flaky-1", "galaxy/engine-stub:flaky"))
    assert res["outcome"] == "success"
    [c] = h.containers("flaky-1")
    c.kill()
    rec = await eventually(lambda: _given_up(store, "flaky-1"), timeout=20, what="terminal failure")
    assert rec.crash_count == 3
    assert "crash loop: 3 crashes" in rec.last_error_message and "code 4" in rec.last_error_message
    restarts = [o for o in await store.operations("flaky-1") if o.source is OpSource.RECONCILER]
    assert len(restarts) == 3 and restarts[0].error_code == "container_start_failed"


async def test_an_image_banned_after_it_was_accepted_is_not_started_again(h, pool, rtm_env):
    """The allowlist holds at every container start: a restart of a banned image is refused."""
    store = Store(pool)
    await h.start()
    await h.result(await h.submit_start("ban-1", "galaxy/engine-stub:1.0"))
    await h.stop_all()
    h.env = {**rtm_env, "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:1.1"}
    ctl = await h.start()
    # Until its event stream has been up for a moment (longer than the clock uncertainty), a
    # controller cannot tell a kill from a daemon restart and takes the cheaper mistake (no crash
    # counted): kill once it can tell.
    backend = ctl.backend

    def stream_vouches() -> bool:
        since = backend._stream_since
        return since is not None and datetime.now(UTC) - since > timedelta(seconds=1)

    await eventually(stream_vouches, timeout=15, what="event stream up for a second")
    [c] = h.containers("ban-1")
    c.kill()  # the crash recovery would start the banned image again
    rec = await eventually(lambda: _given_up(store, "ban-1"), timeout=15, what="refused restart")
    assert rec.last_error_code.value == "image_rejected" and rec.crash_count == 1  # no retries of a ban
    c.reload()
    assert c.status == "exited"
    del ctl


async def test_events_missed_while_the_stream_was_down_are_caught_by_the_relist(h, pool):
    """The event stream ends (as on a dockerd restart) and says nothing of what happened meanwhile:
    the reconnect relists before trusting events again. Another engine, running since before the
    kill, proves the daemon did not restart meanwhile: the exit is a crash."""
    store = Store(pool)
    ctl = await h.start(resync_interval="300")  # no periodic resync within the test
    await h.result(await h.submit_start("relist-witness"))
    await h.result(await h.submit_start("relist-1"))
    await eventually(lambda: ctl.events.connected, what="event stream connected")
    connects = ctl.events.connects
    ctl.events.reconnect(delay=3.0)  # reconnects only after the kill below
    await eventually(lambda: not ctl.events.connected, timeout=5, what="stream dropped")
    [c] = h.containers("relist-1")
    c.kill()  # while no stream is connected: this event is lost
    assert ctl.events.connects == connects and not ctl.events.connected  # the kill fell in the gap
    await eventually(lambda: ctl.events.connects > connects, timeout=10, what="reconnected")
    rec = await eventually(lambda: _crashed_and_back(store, "relist-1"), timeout=10, what="noticed by the relist")
    assert rec.last_exit_code == 137


async def test_a_kill_nothing_can_tell_from_a_daemon_restart_is_not_counted_as_a_crash(h, pool):
    """The same kill in a gap of the event stream with no other engine to vouch for the daemon:
    where the evidence cannot tell, the exit is put down to the daemon (a crash put down to the
    daemon costs one restart not counted; the reverse gives games up). The game is back all the
    same, its crash count untouched."""
    store = Store(pool)
    ctl = await h.start(resync_interval="300")
    await h.result(await h.submit_start("relist-alone"))
    await eventually(lambda: ctl.events.connected, what="event stream connected")
    connects = ctl.events.connects
    ctl.events.reconnect(delay=3.0)
    await eventually(lambda: not ctl.events.connected, timeout=5, what="stream dropped")
    [c] = h.containers("relist-alone")
    started = c.attrs["State"]["StartedAt"]
    c.kill()
    assert ctl.events.connects == connects and not ctl.events.connected

    async def back_running():
        c.reload()
        return c.status == "running" and c.attrs["State"]["StartedAt"] != started

    await eventually(back_running, timeout=15, what="the engine started again")

    async def recorded_running():
        rec = await store.get("relist-alone")
        return rec if rec.status is Status.RUNNING and rec.current_container_id == c.id else None

    rec = await eventually(recorded_running, timeout=10, what="recorded running again")
    assert rec.crash_count == 0


async def test_removals_nobody_asked_for_are_rationed_per_resync(h, pool):
    store = Store(pool)
    await h.start(cleanup_ttl="300", resync_interval="300", max_removals="1")
    for g in ("ration-1", "ration-2"):
        await h.result(await h.submit_start(g))
        await h.result(await h.submit_stop(g), job="stop")
    await h.stop_all()
    await asyncio.sleep(1.2)
    ctl = await h.start(cleanup_ttl="1", resync_interval="300", max_removals="1")  # both past the TTL
    async def one_removed():
        return [g for g in ("ration-1", "ration-2") if (await store.get(g)).status is Status.REMOVED]

    await eventually(one_removed, timeout=10, what="one cleanup")
    await settled(ctl, horizon=60)  # the resync is 300 s away: nothing else removes before it
    assert len(await one_removed()) == 1  # the second waits for the next resync interval's budget
    del ctl
