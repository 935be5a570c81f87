"""The relay against a large outbox and a stuck Postgres: its check of what Redis may have lost must
not scan the whole results table, and a relay that cannot finish a pass must show on /readyz and a
metric instead of retrying forever behind a green /readyz."""

from __future__ import annotations

import asyncpg

from desired.db.rows import RECENTLY_PUBLISHED_SQL
from desired.db.store import Store
from tests.support import eventually

ROWS = 200_000


async def test_the_check_of_recently_published_results_uses_an_index(pool, database_url):
    """Months of published results and a few recent ones: the check reads the recent ones by an index."""
    await pool.execute(
        "INSERT INTO job_results (result_id, game_id, fields, kind, created_at, published_at, stream_entry_id)"
        " SELECT gen_random_uuid(), 'g' || (i % 1000), '{}'::jsonb, CASE WHEN i % 3 = 0 THEN 'snapshot'"
        " ELSE 'result' END, now() - interval '30 days', now() - interval '30 days' + i * interval '10 ms',"
        " (1700000000000 + i) || '-0' FROM generate_series(1, $1) AS i", ROWS)
    await pool.execute(
        "INSERT INTO job_results (result_id, game_id, fields, kind, published_at, stream_entry_id)"
        " SELECT gen_random_uuid(), 'g1', '{}'::jsonb, 'result', now() - i * interval '1 s',"
        " (1800000000000 + i) || '-0' FROM generate_series(1, 5) AS i")
    await pool.execute("ANALYZE job_results")
    plan = "\n".join(r[0] for r in await pool.fetch("EXPLAIN " + RECENTLY_PUBLISHED_SQL, 600.0, 20000, "result"))
    assert "Seq Scan on job_results" not in plan, plan
    assert "job_results_published_idx" in plan, plan
    found = await Store(pool).recently_published("result", 600.0)
    assert len(found) == 5

    # And it completes under a statement timeout far below what scanning the table takes.
    tight = await asyncpg.create_pool(database_url, min_size=1, max_size=1,
                                      server_settings={"statement_timeout": "100"})
    try:
        assert len(await Store(tight).recently_published("result", 600.0)) == 5
    finally:
        await tight.close()


async def test_readyz_reports_a_relay_that_cannot_finish_a_pass(api):
    """A lock held on the outbox (as a statement that never finishes would): the relay's pass hangs;
    after the relay's stall limit /readyz answers 503 naming the relay and the metric counts the
    seconds; once the lock goes the relay finishes and /readyz is green again."""
    ctl = await api.start()
    ctl.relay.stall_limit = 0.5
    status, body = await api.get("/readyz", auth=False)
    assert status == 200 and body["checks"]["relay"] == "ok", body
    conn = await asyncpg.connect(api.env["RTMANAGER_DATABASE_URL"])
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE job_results IN ACCESS EXCLUSIVE MODE")
        ctl.relay.poke()  # a pass starts and waits for the lock

        async def unready() -> bool:
            status, body = await api.get("/readyz", auth=False)
            return status == 503 and body["checks"]["relay"].startswith("error")

        await eventually(unready, 20, what="/readyz naming the stalled relay")
        assert ctl.metrics.registry.get_sample_value("rtmanager_relay_stalled_seconds") >= 0.5
        await tx.rollback()

        async def ready() -> bool:
            status, body = await api.get("/readyz", auth=False)
            return status == 200 and body["checks"]["relay"] == "ok"

        await eventually(ready, 20, what="/readyz green again once the relay finished its pass")
        assert ctl.metrics.registry.get_sample_value("rtmanager_relay_stalled_seconds") == 0
    finally:
        await conn.close()
