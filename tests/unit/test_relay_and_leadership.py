"""The outbox relay and the leadership loop against in-memory fakes."""

from __future__ import annotations

import asyncio

import pytest

from controller.config import Settings
from controller.leadership import Leadership
from controller.metrics import Metrics
from controller.relay import Relay, RelayStalled
from desired.leader import Fence
from desired.model import ErrorCode, JobKind
from tests.fakes import FakeStore, FakeStreams
from tests.support import eventually
from tests.support.world import FakeLease, answered

RESULTS = "runtime:job_results"


def relay_world() -> tuple[Relay, FakeStreams, FakeStore]:
    settings = Settings.from_env({})
    streams, store = FakeStreams(), FakeStore()
    return Relay(settings.streams, streams, store, Metrics()), streams, store


async def test_results_are_published_in_commit_order_and_marked():
    relay, streams, store = relay_world()
    await answered(store, 5)
    assert await relay.flush() == 5
    assert [f["job_entry_id"] for f in streams.fields_of(RESULTS)] == [f"{i}-0" for i in range(1, 6)]
    assert await store.unpublished_count() == 0
    assert await relay.flush() == 0


async def test_a_result_already_on_the_stream_is_marked_not_published_again():
    relay, streams, store = relay_world()
    await answered(store, 1)
    [pending] = await store.unpublished()
    streams.xadd(RESULTS, pending.fields)  # XADD went through, the marking did not (a crash)
    assert await relay.flush() == 0
    assert len(streams.fields_of(RESULTS)) == 1 and await store.unpublished_count() == 0


async def test_results_a_restarted_redis_lost_are_published_again_with_the_same_result_id():
    relay, streams, store = relay_world()
    await answered(store, 4)
    await relay.flush()
    kept = streams.streams[RESULTS].entries[:2]
    lost_ids = [f["result_id"] for f in streams.fields_of(RESULTS)[2:]]
    streams.streams[RESULTS].entries = kept  # AOF everysec: the last two acknowledged entries are gone
    streams.run_id = "run-2"                 # a restarted server
    await relay.check_server()
    await relay.flush()
    ids = [f["result_id"] for f in streams.fields_of(RESULTS)]
    assert ids[2:] == lost_ids and len(ids) == len(set(ids)) == 4
    assert relay.republished == 2


@pytest.mark.parametrize("recreated", [False, True])
async def test_results_a_deleted_stream_took_are_published_again(recreated):
    """Red-team, stop 43: an operator's DEL of the results stream (or a FLUSHDB) leaves the server's run_id
    as it was, so the relay never compared what it had published with the stream: every result Lobby had
    not read yet was gone, and the next XADD made the stream again as if nothing had happened. The relay's
    periodic look now also notices a stream that is gone, or that counts fewer entries added than before."""
    relay, streams, store = relay_world()
    await answered(store, 1)
    await relay.flush()
    await relay.check_server()  # the look that learns the stream as it is
    for i in (2, 3):
        await store.reject_entry(kind=JobKind.STOP, game_id="g1", stream="s", entry_id=f"{i}-0",
                                 code=ErrorCode.INVALID_REQUEST, message="bad")
    await relay.flush()  # published after that look: the next one expects them too
    lost = [f["result_id"] for f in streams.fields_of(RESULTS)]
    del streams.streams[RESULTS]
    if recreated:  # something wrote to it since (fewer entries than it had): a new stream under the old name
        streams.xadd(RESULTS, {"kind": "other"})
        streams.xadd(RESULTS, {"kind": "other"})
    await relay.check_server()
    await relay.flush()
    ids = [f.get("result_id") for f in streams.fields_of(RESULTS) if "result_id" in f]
    assert ids == lost and relay.republished == 3


async def test_two_flushes_at_once_never_publish_a_result_twice():
    """The shutdown's last flush and the relay loop: one publisher at a time."""
    relay, streams, store = relay_world()
    await answered(store, 50)
    real_add = streams.add

    async def slow_add(*args, **kwargs):
        await asyncio.sleep(0)
        return await real_add(*args, **kwargs)

    streams.add = slow_add
    await asyncio.gather(relay.flush(), relay.flush())
    ids = [f["result_id"] for f in streams.fields_of(RESULTS)]
    assert len(ids) == len(set(ids)) == 50


async def test_the_relay_backs_off_during_an_outage_and_resumes():
    relay, streams, store = relay_world()
    await answered(store, 2)
    streams.down = True
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.05)
    assert streams.fields_of(RESULTS) == []
    streams.down = False
    for _ in range(100):
        if await store.unpublished_count() == 0:
            break
        await asyncio.sleep(0.05)
    relay.stop()
    await asyncio.wait_for(task, 5)
    assert len(streams.fields_of(RESULTS)) == 2


async def test_a_relay_that_keeps_failing_says_it_is_stalled_and_recovers():
    """A check that keeps failing (a statement timeout is retried like an outage) is a stall, not a
    quiet retry: past the limit check_stalled raises (/readyz) and the gauge counts; a finished pass
    clears both."""
    relay, streams, store = relay_world()
    relay.stall_limit = 0.2
    await answered(store, 1)
    metrics = relay.metrics.registry
    store.down = True  # every statement fails
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.stalled_for() > 0.2, 5, what="the stall past its limit")
        with pytest.raises(RelayStalled, match="no pass finished"):
            relay.check_stalled()
        assert metrics.get_sample_value("rtmanager_relay_stalled_seconds") > 0.2
        store.down = False
        await eventually(lambda: relay.stalled_for() == 0, 15, what="a pass finished")
        relay.check_stalled()
        assert metrics.get_sample_value("rtmanager_relay_stalled_seconds") == 0
        assert len(streams.fields_of(RESULTS)) == 1
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


async def test_an_idle_relay_is_never_stalled():
    relay, streams, store = relay_world()
    relay.stall_limit = 0.0
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.healthy, 5, what="a first pass")
        relay.check_stalled()  # waiting for work is not a stall
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


class Calls:
    """Which of the store's outbox calls the relay makes, and with how many marks."""

    def __init__(self, store: FakeStore) -> None:
        self.log: list[tuple[str, int]] = []
        read, alone = store.mark_and_read_unpublished, store.mark_published_many

        async def mark_and_read(marks, limit=100):
            self.log.append(("mark_and_read", len(marks)))
            return await read(marks, limit)

        async def mark_alone(marks):
            self.log.append(("mark_alone", len(marks)))
            return await alone(marks)

        store.mark_and_read_unpublished, store.mark_published_many = mark_and_read, mark_alone


async def test_a_flow_of_results_is_marked_by_the_next_read_and_an_idle_relay_marks_alone():
    """Issue 25: a statement a pass, not two. Results that keep coming (a commit every few ms) are
    marked by the statement that reads the next ones; once nothing comes for MARK_DELAY, the relay
    writes the last marks alone, and nothing published stays unmarked."""
    relay, streams, store = relay_world()
    calls = Calls(store)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.healthy, 5, what="a first pass")
        for i in range(20):
            await store.reject_entry(kind=JobKind.STOP, game_id="g", stream="s", entry_id=f"{i + 1}-0",
                                     code=ErrorCode.INVALID_REQUEST, message="bad")
            relay.wake.set()
            await eventually(lambda i=i: len(streams.fields_of(RESULTS)) == i + 1, 5, interval=0.001)
        await eventually(lambda: not relay._unmarked, 5, what="the last marks written")  # noqa: SLF001
        assert await store.unpublished_count() == 0
        assert len(streams.fields_of(RESULTS)) == 20
        marked_by_reads = sum(n for kind, n in calls.log if kind == "mark_and_read")
        alone = [n for kind, n in calls.log if kind == "mark_alone"]
        assert marked_by_reads + sum(alone) == 20
        assert marked_by_reads >= 15, calls.log  # the flow's marks went with the next read
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


async def test_marks_kept_for_the_next_read_are_checked_against_a_restarted_redis():
    """Published, its mark kept for the next read, then Redis restarts and loses it: the check of the
    stream against what was marked must see it (the kept marks are written first) and publish it again."""
    relay, streams, store = relay_world()
    await answered(store, 3)
    assert await relay.flush(defer_marks=True) == 3
    assert len(relay._unmarked) == 3 and await store.unpublished_count() == 3  # noqa: SLF001
    lost = [f["result_id"] for f in streams.fields_of(RESULTS)]
    streams.streams[RESULTS].entries = []  # AOF everysec: all three acknowledged entries are gone
    streams.run_id = "run-2"
    await relay.check_server()
    await relay.flush()
    ids = [f["result_id"] for f in streams.fields_of(RESULTS)]
    assert ids == lost and relay.republished == 3 and await store.unpublished_count() == 0


async def test_results_a_redis_that_restarted_empty_lost_are_published_again_after_a_new_entry():
    """Found by review: Redis restarts with the stream gone and takes a new entry (on a reconnected
    connection) before the relay notices the restart. The lost entries are older than the stream's new
    first entry: taken for trimmed by MAXLEN, they were never published again. Fewer than MAXLEN entries
    were published after them, so no trimming removed them."""
    relay, streams, store = relay_world()
    await relay.check_server()
    await answered(store, 3)
    assert await relay.flush() == 3
    lost = [f["result_id"] for f in streams.fields_of(RESULTS)]
    del streams.streams[RESULTS]   # restarted empty (no persistence, or the AOF lost it)
    streams.run_id = "run-2"       # not looked at yet (check_server every IDLE_POLL)
    await store.reject_entry(kind=JobKind.STOP, game_id="g", stream="s", entry_id="9-0",
                             code=ErrorCode.INVALID_REQUEST, message="bad")
    assert await relay.flush() == 1  # the restarted server's first entry
    await relay.check_server()
    await relay.flush()
    ids = [f["result_id"] for f in streams.fields_of(RESULTS)]
    assert all(i in ids for i in lost) and relay.republished == 3


async def test_entries_trimmed_by_maxlen_are_not_taken_for_lost():
    settings = Settings.from_env({"RTMANAGER_RESULTS_MAXLEN": "2"})
    streams, store = FakeStreams(), FakeStore()
    relay = Relay(settings.streams, streams, store, Metrics())
    await answered(store, 4)
    assert await relay.flush() == 4  # MAXLEN 2: the two oldest are trimmed as the newest are added
    assert len(streams.fields_of(RESULTS)) == 2
    streams.run_id = "run-2"
    await relay.check_server()
    await relay.flush()
    assert relay.republished == 0 and len(streams.fields_of(RESULTS)) == 2
    # One of the two newest lost with a restart: it was not trimmed (fewer than MAXLEN after it).
    streams.streams[RESULTS].entries = streams.streams[RESULTS].entries[:1]
    streams.run_id = "run-3"
    await relay.check_server()
    await relay.flush()
    assert relay.republished == 1


async def test_the_shutdowns_flush_leaves_nothing_unmarked():
    relay, streams, store = relay_world()
    await answered(store, 2)
    await relay.flush(defer_marks=True)
    await store.reject_entry(kind=JobKind.STOP, game_id="g", stream="s", entry_id="9-0",
                             code=ErrorCode.INVALID_REQUEST, message="bad")
    assert await relay.flush() == 1
    assert not relay._unmarked and await store.unpublished_count() == 0  # noqa: SLF001


# ------------------------------------------------------------------ leadership
@pytest.fixture
async def leading():
    fence = Fence(instance="i", holder="me", ttl=0.3)
    lease = FakeLease(fence)
    events: list[str] = []

    async def elected():
        events.append(f"elected {fence.epoch}")

    async def deposed(reason):
        events.append("deposed")

    leadership = Leadership(lease, fence, Metrics(), on_elected=elected, on_deposed=deposed)
    stopping = asyncio.Event()
    task = asyncio.create_task(leadership.run(stopping))
    yield leadership, lease, fence, events
    stopping.set()
    leadership.release()
    await asyncio.wait_for(task, 5)


async def test_an_outage_past_the_lease_steps_down_then_leads_again_in_a_new_term(leading):
    leadership, lease, fence, events = leading
    await eventually(lambda: events == ["elected 1"], 5.0, interval=0.01)
    lease.down = True  # Postgres away for longer than the lease
    await eventually(lambda: "deposed" in events, 5.0, interval=0.01)
    assert not fence.valid_locally and not leadership.leading  # no action passes the fence any more
    lease.down, lease.free = False, True  # back; nobody else took it
    await eventually(lambda: events == ["elected 1", "deposed", "elected 2"], 5.0, interval=0.01)
    assert leadership.leading and fence.valid_locally


async def test_a_fenced_write_steps_down_at_once_and_the_replica_follows(leading):
    leadership, lease, fence, events = leading
    await eventually(lambda: events == ["elected 1"], 5.0, interval=0.01)
    lease.free = False  # another replica took over
    leadership.lost("a write found another epoch")
    await eventually(lambda: events == ["elected 1", "deposed"], 5.0, interval=0.01)
    assert not fence.valid_locally
    await asyncio.sleep(0.2)
    assert events == ["elected 1", "deposed"]  # standing by while the other leads


async def test_renewals_that_fail_briefly_keep_the_term(leading):
    leadership, lease, fence, events = leading
    await eventually(lambda: events == ["elected 1"], 5.0, interval=0.01)
    lease.down = True
    await asyncio.sleep(fence.ttl / 3)  # shorter than the term
    lease.down = False
    await asyncio.sleep(fence.ttl)
    assert events == ["elected 1"] and leadership.leading


def test_a_standby_campaigns_again_when_the_held_lease_expires_or_at_its_poll():
    from controller.leadership import EXPIRY_SLACK, campaign_wait

    assert campaign_wait(5, None) == 1.0 and campaign_wait(0.3, None) == pytest.approx(0.1)
    assert campaign_wait(5, 0.4) == pytest.approx(0.4 + EXPIRY_SLACK)  # expires before the next poll
    assert campaign_wait(5, 4.0) == 1.0                                # a renewal may come meanwhile: poll
    assert campaign_wait(5, -0.2) == EXPIRY_SLACK                      # expired as the answer came


async def test_a_flow_of_results_is_read_at_most_once_a_gather_interval():
    """Issue 25: at 1,000 games the relay read (and marked) 1.9 times a generated turn: every commit
    that wrote the outbox woke it, and each wake was a statement. While results flow (the previous read
    found some), the next read waits for GATHER after it, so many commits go in one statement."""
    from controller.relay import GATHER

    relay, streams, store = relay_world()
    calls = Calls(store)
    task = asyncio.create_task(relay.run())
    loop = asyncio.get_running_loop()
    try:
        await eventually(lambda: relay.healthy, 5, what="a first pass")
        calls.log.clear()
        began = loop.time()
        for i in range(200):
            await store.reject_entry(kind=JobKind.STOP, game_id="g", stream="s", entry_id=f"{i + 1}-0",
                                     code=ErrorCode.INVALID_REQUEST, message="bad")
            relay.wake.set()
            await asyncio.sleep(0.002)
        await eventually(lambda: len(streams.fields_of(RESULTS)) == 200, 5, interval=0.001)
        elapsed = loop.time() - began
        reads = sum(1 for kind, _ in calls.log if kind == "mark_and_read")
        assert reads <= elapsed / GATHER + 3, (reads, elapsed)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


def test_an_idle_relay_reads_at_once_and_a_flowing_one_gathers():
    from controller.relay import GATHER, gather_delay

    assert gather_delay(now=10.0, last_read=9.99, found=0) == 0.0  # nothing flowed: at once
    assert gather_delay(now=10.0, last_read=10.0 - GATHER - 0.01, found=5) == 0.0  # long enough ago
    assert gather_delay(now=10.0, last_read=9.99, found=5) == pytest.approx(GATHER - 0.01)


class HangingLease(FakeLease):
    """Postgres stops answering the lease's connection: a renewal hangs (the real one for up to its connect
    timeout and half a TTL), until closed."""

    hang = False
    closed = 0

    async def renew(self):
        if self.hang:
            await asyncio.Event().wait()
        return await super().renew()

    async def close(self):
        self.closed += 1


@pytest.mark.parametrize("how", ["the deadline", "a fenced write"])
async def test_a_renewal_that_hangs_does_not_hold_the_step_down(how):
    """Red-team, stop 44: the loop stepped down only when the renewal in flight returned (up to a connect
    timeout and half a TTL after the deadline), and a fenced write's ``lost()`` was not looked at meanwhile:
    the term's tasks went on while another replica could lead. The renewal now races the deadline and
    ``lost()``; the one that hangs is given up and its connection closed."""
    fence = Fence(instance="i", holder="me", ttl=0.3)
    lease = HangingLease(fence)
    events: list[str] = []

    async def elected():
        events.append("elected")

    async def deposed(reason):
        events.append(f"deposed: {reason}")

    leadership = Leadership(lease, fence, Metrics(), on_elected=elected, on_deposed=deposed)
    stopping = asyncio.Event()
    task = asyncio.create_task(leadership.run(stopping))
    try:
        await eventually(lambda: events == ["elected"], 5.0, interval=0.01)
        lease.hang = True
        if how == "a fenced write":
            await asyncio.sleep(0.1)  # a renewal is in flight
            leadership.lost("a write was fenced")
        await eventually(lambda: len(events) == 2, 5.0, interval=0.01)
        assert events[1].startswith("deposed") and not fence.valid_locally and lease.closed >= 1
    finally:
        stopping.set()
        leadership.release()
        lease.hang = False
        await asyncio.wait_for(task, 5)


async def test_the_terms_local_deadline_comes_before_the_leases_expiry(monkeypatch):
    """Red-team, stop 44: the local deadline was the very moment the lease expired in the database (a
    standby campaigns right then): an action that passed its check just before it reached the daemon as
    the next leader began. It now comes a fifth of the TTL before, from the time the statement was sent."""
    import time

    from desired.db.lease import Lease

    fence = Fence(instance="i", holder="me", ttl=5.0)
    lease = Lease("postgresql://unused", fence)

    async def answered(fn):
        await asyncio.sleep(0.05)
        return 7 if fence.epoch == 0 else "UPDATE 1"

    monkeypatch.setattr(lease, "_run", answered)
    before = time.monotonic()
    assert await lease.acquire() == 7
    assert before + 3.9 <= fence.deadline <= before + 4.1
    before = time.monotonic()
    assert await lease.renew()
    assert before + 3.9 <= fence.deadline <= before + 4.1


async def leading_until(lease, fence: Fence, done) -> list[str]:
    """Leadership on ``lease`` until ``done()``: what happened to the term ("elected", "deposed: why")."""
    events: list[str] = []

    async def elected():
        events.append("elected")

    async def deposed(reason):
        events.append(f"deposed: {reason}")

    leadership = Leadership(lease, fence, Metrics(), on_elected=elected, on_deposed=deposed)
    stopping = asyncio.Event()
    task = asyncio.create_task(leadership.run(stopping))
    try:
        await eventually(done, 10.0, interval=0.01)
    finally:
        stopping.set()
        leadership.release()
        await asyncio.wait_for(task, 5)
    return events


async def test_one_renewal_that_times_out_does_not_cost_a_healthy_leader_its_term(monkeypatch):
    """Review, stop 44: with the local deadline at 0.8 TTL, the loop's wait of TTL/5 after a failed renewal
    left no room for a second attempt: one renewal that ran into its statement timeout deposed a leader whose
    lease was still live in the database (and it could not take it back for a TTL). A failed renewal is tried
    again at once, within the time left."""
    import time

    from desired.db.lease import Lease
    from desired.errors import StoreUnavailable

    ttl = 2.0
    fence = Fence(instance="i", holder="me", ttl=ttl)
    lease = Lease("postgresql://unused", fence)
    expires = [0.0]  # the lease's expiry in the database, on the monotonic clock
    renewals = [0]

    async def run(fn):
        sent = time.monotonic()
        if fence.epoch == 0 or not fence.valid_locally:  # a campaign
            if sent < expires[0]:
                return None
            expires[0] = sent + ttl
            return fence.epoch + 1
        renewals[0] += 1
        if renewals[0] == 2:  # Postgres stalls: this renewal runs into its statement timeout
            await asyncio.sleep(0.45 * ttl)
            raise StoreUnavailable("postgres: QueryCanceledError: canceling statement due to statement timeout")
        assert sent < expires[0]
        expires[0] = sent + ttl
        return "UPDATE 1"

    monkeypatch.setattr(lease, "_run", run)
    assert await leading_until(lease, fence, lambda: renewals[0] >= 4) == ["elected"]


class StallingConnection:
    """The lease's connection: the second renewal stalls past the statement timeout the client gives."""

    def __init__(self, world: dict) -> None:
        self.world = world
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True

    async def execute(self, sql, *args, timeout=None):
        import time
        w = self.world
        w["renewals"] += 1
        if w["renewals"] == 2:
            await asyncio.sleep(timeout)
            raise TimeoutError()
        await asyncio.sleep(0.005)
        assert time.monotonic() < w["expires"], "renewed after the lease expired"
        w["expires"] = time.monotonic() + w["ttl"]
        return "UPDATE 1"


async def test_a_renewal_timed_out_leaves_room_for_a_reconnect_and_a_second_attempt(monkeypatch):
    """Review, stop 44: a renewal that ran into its real statement timeout (half a TTL) left its retry a
    twentieth of the TTL, and the retry had to connect again first (the failed attempt closes the
    connection): a 150 ms connect deposed a leader whose lease was live. A renewal's statement may take at
    most half the time the term has left, so a second attempt of the same size fits."""
    import time

    from desired.db.lease import Lease

    ttl = 2.0
    fence = Fence(instance="i", holder="me", ttl=ttl)
    lease = Lease("postgresql://unused", fence)
    world = {"renewals": 0, "ttl": ttl, "expires": 0.0}

    async def connection():
        if lease._conn is None or lease._conn.is_closed():
            await asyncio.sleep(0.15)  # TCP, TLS and SCRAM to a database across a network
            lease._conn = StallingConnection(world)  # type: ignore[assignment]
        return lease._conn

    async def acquire(*, reclaim=False):
        started = time.monotonic()
        fence.epoch += 1
        fence.deadline = started + ttl * 0.8
        world["expires"] = started + ttl
        return fence.epoch

    monkeypatch.setattr(lease, "_connection", connection)
    monkeypatch.setattr(lease, "acquire", acquire)
    assert await leading_until(lease, fence, lambda: world["renewals"] >= 5) == ["elected"]
