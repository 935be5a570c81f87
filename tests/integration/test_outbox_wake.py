"""The outbox wakes its readers itself: a snapshot that no job's answer comes with (a counted crash,
the failed restart after it, a cleanup, the start of a stopped game whose engine does not answer yet)
reaches the snapshot stream at once, not at the relay's next poll.

The relay's poll is set to 30 s here, so a snapshot that only the poll would publish misses the
few seconds each step waits for. Below them, the store's part: the signal comes after COMMIT, from
the writes of the outbox only, and to another process through NOTIFY."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from desired.db.notifications import Notifications
from desired.db.store import Store
from desired.model import ErrorCode, JobKind
from desired.wakeup import Signal
from tests.support import Harness, eventually

PROMPT = 5.0  # seconds a snapshot may take from the change to the stream; the poll is 30 s
QUIET = dict(health_interval="0", crash_limit="100")  # no health round; a crash loop that is not given up


@pytest.fixture
async def h(rtm_env, docker_client, monkeypatch):
    monkeypatch.setattr("controller.relay.IDLE_POLL", 30.0)
    harness = Harness(rtm_env, docker_client)
    yield harness
    await harness.stop_all()
    await harness.redis.aclose()


async def snapshot(h: Harness, game: str, reason: str, *, previous: str | None = None, after: int = 0,
                   timeout: float = PROMPT) -> dict[str, str]:
    """The first snapshot of ``game`` with ``reason`` (``previous_status``, a revision above ``after``)
    on the stream, waited for at most ``timeout``."""
    stream = h.env["RTMANAGER_SNAPSHOT_STREAM"]

    async def found():
        for _, f in await h.redis.xrange(stream):
            if (f["game_id"] == game and f["reason"] == reason and previous in (None, f["previous_status"])
                    and int(f["revision"]) > after):
                return f
        return None

    return await eventually(found, timeout=timeout, what=f"{reason} snapshot of {game} on the stream",
                            interval=0.05)


def control(h: Harness, game: str, name: str, content: str = "") -> None:
    """A switch of the stub engine in the game's state directory (deploy/engine-stub/entrypoint.sh)."""
    d = Path(h.env["RTMANAGER_STATE_ROOT"]) / game / "stub-control"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    (d / name).write_text(content)


async def test_a_counted_crash_and_the_failed_restart_after_it_are_published_at_once(h):
    await h.start(**QUIET)
    assert (await h.result(await h.submit_start("wcrash-1")))["outcome"] == "success"
    control(h, "wcrash-1", "exit", "3")  # exits now and on every boot: restarts that never converge
    crashed = await snapshot(h, "wcrash-1", "crashed", previous="running", timeout=PROMPT + 1)  # + the stub's check
    assert crashed["exit_code"] == "3" and crashed["status"] == "starting"
    again = await snapshot(h, "wcrash-1", "crashed", after=int(crashed["revision"]))  # the restart 0.1 s later
    assert again["previous_status"] == "starting" and again["exit_code"] == "3"


async def test_a_cleanup_is_published_at_once(h):
    await h.start(cleanup_ttl="1", resync_interval="0.5", **QUIET)
    await h.result(await h.submit_start("wclean-1"))
    await h.result(await h.submit_stop("wclean-1"), job="stop")
    removed = await snapshot(h, "wclean-1", "removed", timeout=PROMPT + 1.5)  # + the TTL and a resync
    assert removed["status"] == "removed" and removed["previous_status"] == "stopped"


async def test_the_start_of_a_stopped_game_is_published_before_its_engine_answers(h):
    await h.start(start_timeout="60", **QUIET)
    await h.result(await h.submit_start("wstart-1"))
    await h.result(await h.submit_stop("wstart-1"), job="stop")
    await h.submit_start("wstart-1", "galaxy/engine-stub:mute")  # no answer to this start for 60 s
    started = await snapshot(h, "wstart-1", "started", previous="stopped")
    assert started["status"] == "starting"


_entries = itertools.count(1)


async def rejected(store: Store) -> None:
    """A write that puts a result in the outbox (an entry that could not be parsed)."""
    await store.reject_entry(kind=JobKind.START, game_id="w", stream="s:start", entry_id=f"{next(_entries)}-0",
                             code=ErrorCode.INVALID_REQUEST, message="bad entry")


async def test_the_store_raises_the_signal_after_the_commit_that_wrote_the_outbox(pool):
    store = Store(pool)
    fired: list[int] = []
    store.outbox.subscribe(lambda: fired.append(1))

    async def reader():  # woken by the signal: the rows are there to read
        await store.outbox.next().wait()
        return await store.unpublished()

    woken = asyncio.create_task(reader())
    await asyncio.sleep(0)  # the reader waits on the signal before the write
    await rejected(store)
    assert [r.fields["error_code"] for r in await asyncio.wait_for(woken, 5)] == ["invalid_request"]
    assert fired == [1]
    await store.forget_attempts("s:start", "1-0")  # a write that leaves the outbox alone wakes nobody
    assert fired == [1]


async def test_another_process_hears_the_outbox_written(pool, database_url):
    writer = Store(pool)
    elsewhere = Signal()  # another replica's
    stopping = asyncio.Event()
    listener = asyncio.create_task(Notifications(database_url, lambda g: None, outbox=elsewhere).run(stopping))
    try:
        async def heard():
            await rejected(writer)  # again until the listener is connected
            return elsewhere.raised

        await eventually(heard, timeout=10, what="the outbox NOTIFY heard by another process")
        assert writer.outbox.raised == len(await writer.unpublished())  # in this process: once a write
    finally:
        stopping.set()
        await listener


async def test_the_leaders_own_outbox_writes_send_no_notify(pool, database_url):
    """NOTIFY makes every committing transaction that sent one queue on one cluster-wide lock; the
    relay runs only in the leader, so the leader's writes wake it in-process and notify nobody. A
    process that leads nothing (an operator's tool) still notifies, so the leader hears its writes."""
    import asyncpg

    from desired.db.lease import Lease
    from desired.leader import Fence

    fence = Fence(instance="w", holder="leader", ttl=30)
    lease = Lease(database_url, fence)
    assert await lease.acquire() == 1
    leader, tool = Store(pool, fence=fence), Store(pool)
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("rtmanager_outbox", lambda *args: heard.put_nowait(args[3]))
        await rejected(leader)
        await rejected(tool)
        # Notifications of commits made one after another arrive in commit order: the first one
        # heard is the tool's when the leader sent none.
        assert await asyncio.wait_for(heard.get(), 10) == tool.outbox.origin
        assert leader.outbox.raised == 1  # woken in-process all the same
    finally:
        await conn.close()
        await lease.release()
        await lease.close()


async def test_a_schedule_set_by_another_process_wakes_the_leaders_turn_clock(pool, database_url):
    """An interval set by an operator's tool writes no outbox row; the leader's turn clock hears it
    through the desired-state NOTIFY that every change of desired state sends."""
    from desired.jobs import Job, RecordDefaults
    from desired.model import OpSource

    tool = Store(pool)
    await tool.submit(Job(kind=JobKind.START, game_id="sched", source=OpSource.LOBBY,
                          image_ref="galaxy/engine-stub:1.0", stream="s:start", entry_id="9-0"),
                      RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080))
    schedule, games = Signal(), []
    stopping = asyncio.Event()
    listener = asyncio.create_task(Notifications(database_url, games.append, schedule=schedule).run(stopping))
    try:
        async def heard():
            before = tool.outbox.raised
            await tool.set_schedule("sched", 30, OpSource.ADMIN)  # again until the listener is connected
            assert tool.outbox.raised == before  # no outbox row: the outbox signal cannot carry this
            return schedule.raised and "sched" in games

        await eventually(heard, timeout=10, what="a tool's schedule change heard by the leader's turn clock")
        # Not in the tool's own process: the game does not run yet, so no interval makes it due there
        # (desired/transitions.py moves_the_clock); the leader's listener wakes its clock all the same.
        assert tool.schedule.raised == 0
    finally:
        stopping.set()
        await listener
