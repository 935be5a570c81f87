"""REST jobs' Idempotency-Key in the store, on real Postgres: the same key and request from the same token is
one operation, even sent at once; another request under the key is refused, even for another game at once
(whose lock the admission does not share); another token's key is its own."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from desired.db.store import Store
from desired.jobs import Job, KeyReused, RecordDefaults
from desired.model import JobKind, OpSource
from tests.support import eventually

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"


def start(game: str, key: str, actor: str = "token:ops") -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.ADMIN, image_ref=IMG, actor=actor,
               idempotency_key=key)


async def test_the_same_request_under_one_key_is_one_operation_even_at_once(pool):
    store = Store(pool)
    outcomes = await asyncio.gather(*(store.submit(start("k1", "key-1"), DEFAULTS) for _ in range(6)))
    assert len({o.operation_id for o in outcomes}) == 1, outcomes
    assert sum(not o.duplicate for o in outcomes) == 1, outcomes
    assert (await store.get("k1")).generation == 1
    again = await store.submit(start("k1", "key-1"), DEFAULTS)
    assert again.duplicate and again.operation_id == outcomes[0].operation_id
    # the same key of another token is that token's own
    other = await store.submit(start("k1", "key-1", actor="token:someone-else"), DEFAULTS)
    assert not other.duplicate and other.operation_id != outcomes[0].operation_id
    count = await pool.fetchval("SELECT count(*) FROM runtime_operations WHERE idempotency_key = 'key-1'")
    assert count == 2


async def test_another_request_under_a_used_key_is_refused_even_for_another_game_at_once(pool):
    store = Store(pool)
    await store.submit(start("k2", "key-2"), DEFAULTS)
    for job in (dataclasses.replace(start("k2", "key-2"), kind=JobKind.RESTART, image_ref=None),
                dataclasses.replace(start("k2", "key-2"), image_ref="galaxy/engine-stub:1.1"),
                dataclasses.replace(start("k2", "key-2"), force=True),
                start("k3", "key-2")):
        with pytest.raises(KeyReused):
            await store.submit(job, DEFAULTS)
    assert await store.find("k3") is None
    # two games under one new key at once: one is admitted, the other refused (the unique index decides)
    outcomes = await asyncio.gather(*(store.submit(start(g, "key-3"), DEFAULTS) for g in ("k4", "k5", "k6")),
                                    return_exceptions=True)
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(admitted) == 1 and all(isinstance(o, KeyReused) for o in outcomes if o not in admitted), outcomes
    assert sum([await store.find(g) is not None for g in ("k4", "k5", "k6")]) == 1


async def test_a_key_whose_first_use_commits_while_the_second_waits_is_judged_against_it(pool):
    """The race the games' locks do not cover: another game's admission under the same key has not committed
    when this one looks. Its insert waits on the unique index, fails once the first commits, and the
    admission is tried again: judged against the first, it is refused, not a database error."""
    store = Store(pool)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "INSERT INTO runtime_operations (game_id, op, source, status, generation, params, created_at, actor,"
            " idempotency_key) VALUES ('k7', 'start', 'admin', 'queued', 1, $1::jsonb, now(), 'token:ops', 'key-4')",
            '{"request_digest": "not this request"}')
        second = asyncio.create_task(store.submit(start("k8", "key-4"), DEFAULTS))
        await eventually(lambda: pool.fetchval(  # its insert waits on the uncommitted key
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query LIKE 'INSERT INTO runtime_operations%'"), 10, "the second admission waiting on the key")
        assert not second.done()
        await tx.commit()
    with pytest.raises(KeyReused):
        await second
    assert await store.find("k8") is None
