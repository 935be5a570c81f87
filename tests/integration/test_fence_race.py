"""The one-statement fenced writes (issue 25: ``StoreBase._fenced`` for the claim and the relay's marks,
``lock_record`` for every record compare-and-swap) against a take-over that races them, on a real
Postgres.

The sequential case (the new term committed before the old leader writes) is in test_store.py. Here
the new leader's take-over holds the lease row (``SELECT ... FOR UPDATE``, then the new epoch) and
has not committed when the old leader's statement starts: the statement's snapshot is older than the
new term. Its ``FOR KEY SHARE`` on the lease row waits for the take-over, and once that commits the
row it locks is re-read (read committed's recheck of a row updated meanwhile), finds another holder
and epoch, and the write is refused (Fenced) and changes nothing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from desired.db.lease import Lease
from desired.db.store import Store
from desired.jobs import Job, RecordDefaults
from desired.leader import Fence, Fenced
from desired.model import JobKind, OpSource

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"


async def _take_over_uncommitted(database_url: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """The new leader's ``Lease._acquire`` (reclaim of a live lease: its row locked FOR UPDATE, a new holder
    and epoch), left uncommitted."""
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.fetchrow("SELECT holder FROM leader_leases WHERE instance = 'i' FOR UPDATE")
    await conn.execute("UPDATE leader_leases SET holder = 'new', epoch = epoch + 1, acquired_at = now(),"
                       " renewed_at = now(), expires_at = now() + interval '30 seconds' WHERE instance = 'i'")
    return conn, tx


async def _blocked(task: asyncio.Task) -> bool:
    done, _ = await asyncio.wait({task}, timeout=0.5)
    return not done


@pytest.fixture
async def old_leader(pool, database_url):
    fence = Fence(instance="i", holder="old", ttl=30)
    lease = Lease(database_url, fence)
    assert await lease.acquire() == 1
    store = Store(pool, fence=fence)
    await store.submit(Job(kind=JobKind.START, game_id="g1", source=OpSource.LOBBY, image_ref=IMG,
                           stream="s:start", entry_id="1-0"), DEFAULTS)
    yield store
    await lease.close()


@pytest.mark.parametrize("write", ["claim", "find_and_claim", "mark_published_many", "mark_and_read_unpublished",
                                   "mark_stopped", "set_admin_token"])
async def test_a_write_racing_the_take_over_waits_for_it_and_is_refused(old_leader, pool, database_url, write):
    record = await Store(pool).get("g1")
    before_ops = [(o.id, o.status) for o in await Store(pool).operations("g1")]
    conn, tx = await _take_over_uncommitted(database_url)
    committed = False
    try:
        call = {"claim": lambda: old_leader.claim("g1", record.generation),
                "find_and_claim": lambda: old_leader.find_and_claim("g1"),
                "mark_published_many": lambda: old_leader.mark_published_many([(1, "1-1")]),
                "mark_and_read_unpublished": lambda: old_leader.mark_and_read_unpublished([(1, "1-1")]),
                "mark_stopped": lambda: old_leader.mark_stopped(record, container_id=None),
                # A record read with its row's version: one statement (StoreBase._swap), fenced in it.
                "set_admin_token": lambda: old_leader.set_admin_token(record, "t" * 32)}[write]
        task = asyncio.create_task(call())
        assert await _blocked(task), "the old leader's statement did not wait for the take-over"
        await tx.commit()
        committed = True
        with pytest.raises(Fenced):
            await asyncio.wait_for(task, 5)
    finally:
        if not committed:  # a failed assertion above: let the take-over go
            await tx.rollback()
        await conn.close()
    assert [(o.id, o.status) for o in await Store(pool).operations("g1")] == before_ops
    assert await Store(pool).get("g1") == record
    assert await pool.fetchval("SELECT count(*) FROM job_results WHERE published_at IS NOT NULL") == 0


async def test_a_take_over_waits_for_a_compare_and_swap_in_flight(old_leader, pool, database_url):
    """The other order: the old leader's transaction locked the lease row (KEY SHARE) and the record in
    its first statement; the take-over's FOR UPDATE waits for it to commit, so the old term's last
    write is committed before the new term begins, never after."""
    record = await Store(pool).get("g1")
    gate = asyncio.Event()
    inside = asyncio.Event()
    original = old_leader._write  # noqa: SLF001

    async def slow_write(*args, **kwargs):
        inside.set()
        await gate.wait()
        return await original(*args, **kwargs)

    old_leader._write = slow_write  # noqa: SLF001
    # The locking path: a record without its row's version (a swap on the version is one statement, the
    # fence in it: there is no "in between" for a take-over to fall into).
    cas = asyncio.create_task(old_leader.mark_stopped(record.replace(), container_id=None))
    await asyncio.wait_for(inside.wait(), 5)
    conn = await asyncpg.connect(database_url)
    try:
        take_over = asyncio.create_task(conn.fetchrow(
            "SELECT holder FROM leader_leases WHERE instance = 'i' FOR UPDATE"))
        assert await _blocked(take_over), "the take-over did not wait for the old term's write in flight"
        gate.set()
        await asyncio.wait_for(cas, 5)
        await asyncio.wait_for(take_over, 5)
    finally:
        gate.set()
        await conn.close()
    assert (await Store(pool).get("g1")).generation == record.generation


async def test_a_standby_frozen_mid_campaign_holds_no_lock_the_leader_needs(pool, database_url):
    """Red-team finding: a standby campaigned with SELECT ... FOR UPDATE on the lease row before it knew
    whether the lease was live. Frozen between that statement and its COMMIT (a paused container, a VM
    freeze, a partition), it held the row: the leader's renewals and its fenced writes (FOR KEY SHARE)
    waited for it, the leader stepped down, and nobody could lead until the frozen session ended. A
    standby now locks the row only to take a lease that has expired (or its own)."""
    leader_fence = Fence(instance="i", holder="leader", ttl=4)
    leader = Lease(database_url, leader_fence)
    standby = Lease(database_url, Fence(instance="i", holder="standby", ttl=4))
    frozen = asyncio.Event()
    try:
        assert await leader.acquire() == 1
        conn = await standby._connection()

        class Freezing:  # the standby stops right after each read, holding whatever it holds
            def __getattr__(self, name):
                return getattr(conn, name)

            async def fetchrow(self, *args, **kwargs):
                row = await conn.fetchrow(*args, **kwargs)
                await frozen.wait()
                return row

        async def connection():
            return Freezing()

        standby._connection = connection
        campaign = asyncio.create_task(standby.acquire())
        await asyncio.sleep(0.2)
        assert not campaign.done()
        assert await asyncio.wait_for(leader.renew(), 2), "the renewal waited for the frozen standby"
        store = Store(pool, fence=leader_fence)
        await asyncio.wait_for(store.submit(Job(kind=JobKind.START, game_id="g9", source=OpSource.LOBBY,
                                                image_ref=IMG, stream="s:start", entry_id="9-0"), DEFAULTS), 2)
        frozen.set()
        assert await campaign is None  # the lease is live: not taken
    finally:
        frozen.set()
        await standby.close()
        await leader.close()


async def test_the_lease_connection_ends_a_transaction_left_open(database_url):
    """A campaigner frozen while it takes an expired lease (its row locked) is cut by the server after
    the lease's TTL, so the other replicas can campaign again."""
    lease = Lease(database_url, Fence(instance="i", holder="x", ttl=4))
    try:
        conn = await lease._connection()
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "4s"
    finally:
        await lease.close()
