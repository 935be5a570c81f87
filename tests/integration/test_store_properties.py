"""Property, against the real store: random sequences of jobs and observations keep every stored
record valid, and every job ends with exactly one result.

The observations are what the reconciler writes (desired/db/transitions.py's named transitions and
fail_generation): converging a game to its desired status, or failing a generation (which rolls a
running game back, or stops it, or keeps removing it).
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desired.db.rows import record_from_row
from desired.db.store import Store
from desired.jobs import Job, RecordDefaults
from desired.model import DesiredStatus, ErrorCode, JobKind, OpSource, Status, StopReason
from desired.transitions import Probe

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMAGES = ["galaxy/engine:1", "galaxy/engine:2", "other/engine:1"]
GAMES = ["a", "b"]

JOB = st.tuples(st.just("job"), st.sampled_from(list(JobKind)), st.sampled_from(GAMES), st.sampled_from(IMAGES),
                st.sampled_from(list(StopReason)))
OBSERVE = st.tuples(st.sampled_from(["converge", "give_up"]), st.sampled_from(GAMES))
STEPS = st.lists(st.one_of(JOB, OBSERVE), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_random_jobs_and_observations_keep_records_valid_and_answer_every_job_once(steps, database_url):
    asyncio.run(_run(steps, database_url))


async def _run(steps, database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    prefix = uuid.uuid4().hex[:6]
    store = Store(pool)

    try:
        for n, step in enumerate(steps):
            if step[0] == "job":
                _, kind, game, image, reason = step
                await store.submit(Job(kind=kind, game_id=f"{prefix}-{game}", source=OpSource.LOBBY,
                                       image_ref=image if kind in (JobKind.START, JobKind.PATCH) else None,
                                       reason=reason if kind is JobKind.STOP else None,
                                       stream="s", entry_id=f"{prefix}-{n}"), DEFAULTS)
            elif step[0] == "converge":
                await _converge(store, f"{prefix}-{step[1]}")
            else:
                rec = await store.find(f"{prefix}-{step[1]}")
                if rec is not None and not rec.converged:
                    if rec.status is Status.RUNNING and rec.desired_status is DesiredStatus.RUNNING:
                        rec = await store.mark_starting(rec, rollback_image=rec.current_image_ref)
                    await store.fail_generation(rec.game_id, rec.generation, ErrorCode.ENGINE_UNHEALTHY, "no answer")
            await _check_records(pool, prefix)
        for game in GAMES:  # the controller catches up with everything
            await _converge(store, f"{prefix}-{game}")
        await _check_records(pool, prefix)
        rows = await pool.fetch(
            "SELECT o.id, o.status, count(r.seq) AS results FROM runtime_operations o"
            " LEFT JOIN job_results r ON r.operation_id = o.id WHERE o.entry_id LIKE $1 GROUP BY o.id, o.status",
            f"{prefix}-%")
        jobs = sum(1 for s in steps if s[0] == "job")
        assert len(rows) == jobs
        for row in rows:
            assert row["results"] == 1, dict(row)
            assert row["status"] in ("succeeded", "failed"), dict(row)
    finally:
        await pool.close()


async def _converge(store: Store, game: str) -> None:
    rec = await store.find(game)
    if rec is None or rec.converged:
        return
    if rec.desired_status is DesiredStatus.RUNNING:
        if rec.status is not Status.STARTING:
            rec = await store.mark_starting(rec, rollback_image=None)
        # A forced turn converges once the engine has reached it: the engine says so.
        probe = None if rec.desired_turn is None else Probe(healthy=True, admin_api=True, turn=rec.desired_turn,
                                                            phase="idle")
        await store.mark_running(rec, container_id=f"c{rec.generation}", image=rec.desired_image_ref, probe=probe)
    elif rec.desired_status is DesiredStatus.STOPPED:
        await store.mark_stopped(rec, container_id=None)
    else:
        await store.mark_removed(rec)


async def _check_records(pool: asyncpg.Pool, prefix: str) -> None:
    for row in await pool.fetch("SELECT * FROM runtime_records WHERE game_id LIKE $1", f"{prefix}-%"):
        record_from_row(row).validate()
