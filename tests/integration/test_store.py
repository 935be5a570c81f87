"""The asyncpg store against a real Postgres (a fresh copy of the template database per test)."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from desired.db.migrate import load_migrations, migrate
from desired.db.store import Store
from desired.errors import Conflict, NotFound
from desired.jobs import Job, RecordDefaults
from desired.model import (
    DesiredStatus,
    ErrorCode,
    JobKind,
    OpSource,
    OpStatus,
    Status,
    StopReason,
)
from tests.support import eventually

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"


def start(game: str, entry: str = "", image: str = IMG) -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=image,
               stream="s:start" if entry else "", entry_id=entry)


def stop(game: str, entry: str = "") -> Job:
    return Job(kind=JobKind.STOP, game_id=game, source=OpSource.LOBBY, reason=StopReason.FINISHED,
               stream="s:stop" if entry else "", entry_id=entry)


async def results(pool) -> list[dict]:
    rows = await pool.fetch("SELECT fields FROM job_results WHERE kind = 'result' ORDER BY seq")
    return [json.loads(r["fields"]) for r in rows]


async def converge_running(store: Store, game: str, container: str = "c" * 64):
    rec = await store.get(game)
    return await store.mark_running(rec, container_id=container, image=rec.desired_image_ref)


async def test_migrate_twice_changes_nothing(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn) == []  # the template already has the schema
        before = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
        assert await migrate(conn) == []
        assert await conn.fetch("SELECT version, applied_at FROM schema_migrations") == before
        assert [r["version"] for r in before] == [m.version for m in load_migrations()]
    finally:
        await conn.close()


async def test_concurrent_migrations_on_an_empty_database_apply_once(database_url):
    conn = await asyncpg.connect(database_url)
    await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    expected = len(load_migrations())
    await conn.close()
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(len(a) for a in applied) == [0, 0, expected]
    finally:
        for c in conns:
            await c.close()


@pytest.mark.parametrize("auto_migrate", ["0", "1"])
async def test_a_schema_newer_than_the_binary_is_refused_at_start(database_url, auto_migrate):
    """Red-team finding: a binary started against a database another, newer rtmanager migrated (a rollback
    of the binary, an old replica during a rolling upgrade) ran, and one row with a value it does not know
    (a newer status or error code) failed the resync of every game. It now refuses to start, naming the
    migrations it does not know."""
    from controller.app import SchemaMissing, prepare_database
    from controller.config import Settings

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', "
                           "'9999_from_the_future.sql', 'x')")
    finally:
        await conn.close()
    settings = Settings.from_env({"RTMANAGER_DATABASE_URL": database_url, "RTMANAGER_IMAGE_ALLOWLIST": "x:*",
                                  "RTMANAGER_AUTO_MIGRATE": auto_migrate})
    with pytest.raises(SchemaMissing, match="9999_from_the_future.sql"):
        await prepare_database(settings)


async def test_a_schema_missing_migrations_is_refused_at_start_without_auto_migrate(database_url):
    """The other way round: with RTMANAGER_AUTO_MIGRATE=0 a binary ran against a schema without its newest
    migrations, and every admission failed on a missing column, counting an attempt against each job."""
    from controller.app import SchemaMissing, prepare_database
    from controller.config import Settings

    newest = load_migrations()[-1]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", newest.version)
    finally:
        await conn.close()
    settings = Settings.from_env({"RTMANAGER_DATABASE_URL": database_url, "RTMANAGER_IMAGE_ALLOWLIST": "x:*",
                                  "RTMANAGER_AUTO_MIGRATE": "0"})
    with pytest.raises(SchemaMissing, match=newest.name):
        await prepare_database(settings)


async def a_lock_awaited(pool) -> bool:
    """Some session of this test's database waits for a lock (the statement under test, blocked)."""
    return bool(await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE NOT granted"
        " AND pid IN (SELECT pid FROM pg_stat_activity WHERE datname = current_database())"))


async def test_a_lost_games_floor_is_stored_under_the_games_lock(pool, database_url):
    """Review: the floor of a game without a record was stored without the game's lock, so an admission that
    made its record at the same moment saw neither the floor nor was seen by the raise: it numbered from 1.
    Admission takes the game's lock before it makes a record; so does the floor now."""
    from desired.db.rows import GAME_LOCK_SPACE

    store = Store(pool)
    admission = await asyncpg.connect(database_url)
    try:
        tx = admission.transaction()
        await tx.start()
        await admission.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, "g9")
        raising = asyncio.create_task(store.raise_snapshot_revisions({"g9": 12}))

        await eventually(lambda: a_lock_awaited(pool), what="the floor waiting for the game's lock")
        assert not raising.done()
        await tx.commit()
        await asyncio.wait_for(raising, 10)
    finally:
        await admission.close()
    await store.submit(start("g9", "9-0"), DEFAULTS)
    assert (await store.get("g9")).snapshot_revision == 13


async def test_a_snapshot_committed_while_the_floor_waits_for_its_record_is_numbered_once(pool, database_url):
    """Review: the raise counted a game's pending snapshots before it held the game's record, and numbered
    them in a later statement: a transition that committed while the raise waited for the record was
    numbered but not counted, and the game's next snapshot (or a resync) took a revision already given."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    transition = await asyncpg.connect(database_url)
    try:
        tx = transition.transaction()
        await tx.start()
        await transition.execute("UPDATE runtime_records SET snapshot_revision = snapshot_revision + 1"
                                 " WHERE game_id = 'g1'")
        await transition.execute(
            "INSERT INTO job_results (result_id, game_id, fields, kind) SELECT id, 'g1',"
            " jsonb_build_object('snapshot_id', id::text, 'game_id', 'g1', 'revision', '2'), 'snapshot'"
            " FROM (SELECT gen_random_uuid() AS id) AS n")
        raising = asyncio.create_task(store.raise_snapshot_revisions({"g1": 10}))

        await eventually(lambda: a_lock_awaited(pool), what="the raise waiting for the record")
        await tx.commit()
        await asyncio.wait_for(raising, 10)
    finally:
        await transition.close()
    revisions = [int(p.fields["revision"]) for p in await store.unpublished(1000)
                 if p.kind == "snapshot" and p.game_id == "g1"]
    assert len(revisions) == len(set(revisions)) and min(revisions) > 10, revisions
    assert (await store.get("g1")).snapshot_revision == max(revisions)


async def test_a_game_whose_transition_commits_while_the_floor_waits_is_not_dropped(pool, database_url):
    """Review: the games were chosen and locked in one statement; a lock's wait re-checked a game changed
    meanwhile against its new record but not against its pending snapshots read before, so a game whose
    transition reached the floor during the wait dropped out: its snapshot at the floor, which Lobby holds,
    was published as it was."""
    store = Store(pool)
    await store.submit(start("a1", "1-0"), DEFAULTS)
    await store.submit(start("g1", "2-0"), DEFAULTS)
    await pool.execute("UPDATE job_results SET published_at = now(), stream_entry_id = '1-0'")
    await pool.execute("UPDATE runtime_records SET snapshot_revision = 10")
    holder = await asyncpg.connect(database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM runtime_records WHERE game_id = 'a1' FOR UPDATE")
        raising = asyncio.create_task(store.raise_snapshot_revisions({"a1": 11, "g1": 11}))

        await eventually(lambda: a_lock_awaited(pool), what="the raise waiting for a lock")
        async with pool.acquire() as conn, conn.transaction():  # g1's transition, reaching the floor
            await conn.execute("UPDATE runtime_records SET snapshot_revision = 11 WHERE game_id = 'g1'")
            await conn.execute(
                "INSERT INTO job_results (result_id, game_id, fields, kind) SELECT id, 'g1',"
                " jsonb_build_object('snapshot_id', id::text, 'game_id', 'g1', 'revision', '11'), 'snapshot'"
                " FROM (SELECT gen_random_uuid() AS id) AS n")
        await held.commit()
        await asyncio.wait_for(raising, 10)
    finally:
        await holder.close()
    revisions = [int(p.fields["revision"]) for p in await store.unpublished(1000)
                 if p.kind == "snapshot" and p.game_id == "g1"]
    assert revisions and min(revisions) > 11, revisions
    assert (await store.get("g1")).snapshot_revision == max(revisions)


async def test_submit_creates_record_and_queued_operation(pool):
    store = Store(pool)
    out = await store.submit(start("g1", "1-0"), DEFAULTS)
    assert out.decision.action == "change" and not out.duplicate
    rec = await store.get("g1")
    assert rec.status is Status.STARTING and rec.desired_status is DesiredStatus.RUNNING
    assert rec.generation == 1 and rec.observed_generation == 0
    assert rec.state_path == "/srv/games/g1" and rec.engine_endpoint == "http://galaxy-game-g1:8080"
    ops = await store.pending_operations("g1")
    assert [(o.op.value, o.status, o.generation, o.entry_id) for o in ops] == [("start", OpStatus.QUEUED, 1, "1-0")]
    assert await results(pool) == []


async def test_an_admission_waits_a_bounded_time_for_a_record_another_session_holds(pool, database_url):
    """Red-team, stop 43: an operator's transaction left open on a record made an admission of that game
    wait for the statement timeout (30 s), which read as Postgres being away, for every game of the batch.
    The admission now waits LOCK_WAIT at most and says the game is busy; other games are admitted."""
    import time

    from desired.db.submissions import LOCK_WAIT
    from desired.errors import StoreBusy
    store = Store(pool)
    await store.submit(start("held-1", "1-0"), DEFAULTS)
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM runtime_records WHERE game_id = 'held-1' FOR UPDATE")
        t0 = time.monotonic()
        with pytest.raises(StoreBusy):  # within a bound (a test pool has no statement timeout: it would hang)
            await asyncio.wait_for(store.submit_many([start("free-1", "2-0"), stop("held-1", "2-1")], DEFAULTS),
                                   LOCK_WAIT + 5)
        assert time.monotonic() - t0 < LOCK_WAIT + 3
        out = await store.submit(start("free-1", "2-0"), DEFAULTS)  # a game nobody holds: at once
        assert out.decision is not None and not out.duplicate
        await tx.rollback()
    finally:
        await other.close()
    out = await store.submit(stop("held-1", "2-1"), DEFAULTS)  # released: admitted
    assert out.decision is not None and not out.duplicate


async def test_the_same_entry_twice_is_one_operation(pool):
    store = Store(pool)
    first = await store.submit(start("g1", "1-0"), DEFAULTS)
    again = await store.submit(start("g1", "1-0"), DEFAULTS)
    assert again.duplicate and again.operation_id == first.operation_id
    assert await pool.fetchval("SELECT count(*) FROM runtime_operations") == 1
    assert (await store.get("g1")).generation == 1


async def test_converging_answers_the_job_once_with_container_and_endpoint(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    [res] = await results(pool)
    assert res["outcome"] == "success" and res["error_code"] == "" and res["job_entry_id"] == "1-0"
    assert res["container_id"] == "c" * 64 and res["engine_endpoint"] == "http://galaxy-game-g1:8080"
    assert (await store.get("g1")).converged
    assert await store.pending_operations("g1") == []


async def test_a_record_read_also_reads_the_database_clock(pool):
    """Review 134: a standby's store never read the database's clock (its fenced writes are refused first), so
    the pass-through compared stop marks with this host's wall clock. Reading a record reads it too."""
    from datetime import timedelta

    from desired.clock import Clock

    store = Store(pool, clock=Clock())
    await Store(pool).submit(start("g1", "1-0"), DEFAULTS)
    assert store.clock._db is None  # nothing read yet: this host's clock
    await store.get("g1")
    db_now = await pool.fetchval("SELECT now()")
    assert store.clock._db is not None and abs(store.clock.now() - db_now) < timedelta(seconds=5)


async def test_the_results_of_several_operations_in_one_read(pool):
    """The REST requests waiting for their jobs' results are looked up together (controller/http.py JobWaiters)."""
    store = Store(pool)
    first = await store.submit(start("g1", "1-0"), DEFAULTS)
    second = await store.submit(start("g2", "2-0"), DEFAULTS)
    await converge_running(store, "g1")
    found = await store.results_of([first.operation_id, second.operation_id, 10**12])
    assert list(found) == [first.operation_id] and found[first.operation_id]["outcome"] == "success"
    assert await store.result_for(first.operation_id) == found[first.operation_id]


async def test_start_of_running_game_with_same_image_is_replay(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    out = await store.submit(start("g1", "2-0"), DEFAULTS)
    assert out.decision.action == "replay"
    res = (await results(pool))[-1]
    assert (res["outcome"], res["error_code"], res["container_id"]) == ("success", "replay_no_op", "c" * 64)
    assert (await store.get("g1")).generation == 1


@pytest.mark.parametrize("case", ["unknown", "stopped"])
async def test_stop_replays_have_empty_container_fields(pool, case):
    store = Store(pool)
    if case == "stopped":
        await store.submit(start("g1", "1-0"), DEFAULTS)
        await converge_running(store, "g1")
        await store.submit(stop("g1", "2-0"), DEFAULTS)
        await store.mark_stopped(await store.get("g1"), container_id="c" * 64)
    out = await store.submit(stop("g1", "3-0"), DEFAULTS)
    assert out.decision.action == "replay"
    res = (await results(pool))[-1]
    assert res["error_code"] == "replay_no_op" and res["container_id"] == "" and res["engine_endpoint"] == ""


async def test_a_newer_job_supersedes_a_pending_one(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await store.submit(stop("g1", "2-0"), DEFAULTS)
    [res] = await results(pool)
    assert res["job_entry_id"] == "1-0" and res["outcome"] == "failure" and res["error_code"] == "superseded"
    rec = await store.get("g1")
    assert rec.desired_status is DesiredStatus.STOPPED and rec.generation == 2
    assert [o.entry_id for o in await store.pending_operations("g1")] == ["2-0"]


async def test_a_stop_a_newer_start_overtook_is_recorded_without_answering_anyone(pool):
    """rtmanager stopped the engine, but a start came meanwhile: nothing runs (no crash to find),
    the start still has its work to do, and no job is answered by the note."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(stop("g1", "2-0"), DEFAULTS)
    await store.submit(start("g1", "3-0"), DEFAULTS)
    answered = len(await results(pool))
    assert await store.note_stopped("g1", container_id="d" * 64) is None  # not the unit the record names
    rec = await store.note_stopped("g1", container_id="c" * 64)
    assert rec is not None and rec.status is Status.STOPPED and rec.current_container_id == "c" * 64
    assert not rec.converged and rec.desired_status is DesiredStatus.RUNNING and rec.generation == 3
    assert len(await results(pool)) == answered
    assert [o.entry_id for o in await store.pending_operations("g1")] == ["3-0"]
    assert await store.note_stopped("g1", container_id="c" * 64) is None  # already recorded: no-op


async def test_a_stop_that_supersedes_a_forced_turn_stops_asking_for_it(pool):
    """Else the turn nobody waits for any more is generated after the next start."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY,
                           stream="s:control", entry_id="2-0"), DEFAULTS)
    assert (await store.get("g1")).desired_turn == 1
    await store.submit(stop("g1", "3-0"), DEFAULTS)
    superseded = [r for r in await results(pool) if r["job_entry_id"] == "2-0"]
    assert [r["error_code"] for r in superseded] == ["superseded"]
    rec = await store.get("g1")
    assert rec.desired_status is DesiredStatus.STOPPED and rec.desired_turn is None


async def test_concurrent_transitions_one_wins_the_other_conflicts(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await converge_running(store, "g1")
    outcomes = await asyncio.gather(store.mark_stopped(rec, container_id=rec.current_container_id),
                                    store.mark_starting(rec, rollback_image=None), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "RuntimeRecord"]
    winner = next(o for o in outcomes if not isinstance(o, Exception))
    assert (await store.get("g1")).status is winner.status


async def test_transition_guards_and_database_timestamps(pool):
    store = Store(pool)
    with pytest.raises(NotFound):
        await store.get("nope")
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await converge_running(store, "g1")
    db_now = await pool.fetchval("SELECT now()")
    assert abs((rec.started_at - db_now).total_seconds()) < 5  # the database clock, not the caller's
    with pytest.raises(Conflict):  # a stale container id
        await store.mark_stopped(rec.replace(current_container_id="d" * 64), container_id=None)
    with pytest.raises(Conflict):  # a stale status
        await store.mark_removed(rec.replace(status=Status.STARTING))
    removed = await store.mark_removed(rec)
    assert removed.removed_at >= removed.created_at and removed.current_container_id is None
    from desired.model import InvalidTransition
    with pytest.raises(InvalidTransition):
        await store.mark_starting(removed, rollback_image=None)


async def test_a_stop_mark_names_its_unit_and_is_cleared_whole(pool):
    """Migration 0026: the mark of a stop under way is stored with the unit it is of (the record's engine, or a
    unit the record does not name), read back, and cleared with it."""
    from desired.transitions import stop_mark_of

    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await converge_running(store, "g1")
    other = "d" * 64
    marked = await store.mark_stopping(rec, other)
    got = await store.get("g1")
    assert got.stopping_unit == other and got.stopping_since == marked.stopping_since is not None
    assert stop_mark_of(got, other) == got.stopping_since and stop_mark_of(got, rec.current_container_id) is None
    own = await store.mark_stopping(got)  # no unit given: the record's engine
    assert (await store.get("g1")).stopping_unit == rec.current_container_id == own.stopping_unit
    cleared = await store.clear_stopping(own)
    got = await store.get("g1")
    assert (got.stopping_since, got.stopping_unit) == (None, None) == (cleared.stopping_since, cleared.stopping_unit)
    # Only at the generation it was read at: a job that landed meanwhile makes both a Conflict (the chaos run's
    # seed 25, stop 46: the record of the newer generation came back and carried the older action on)
    marked = await store.mark_stopping(cleared)
    await store.submit(stop("g1"), DEFAULTS)
    with pytest.raises(Conflict):
        await store.clear_stopping(marked)
    with pytest.raises(Conflict):
        await store.mark_stopping(cleared)
    # a mark that dates no signal (or a unit gone) is cleared whatever the generation
    done = await store.clear_stopping(marked, same_generation=False)
    assert done.stopping_since is None and done.generation == marked.generation + 1


async def test_a_generation_answered_while_another_was_accepted_conflicts(pool):
    """A finishing write guards on the generation: a job accepted meanwhile must be looked at first."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.get("g1")
    await store.submit(start("g1", "2-0", image="galaxy/engine-stub:1.1"), DEFAULTS)
    with pytest.raises(Conflict):
        await store.mark_running(rec, container_id="c" * 64, image=IMG)


@pytest.mark.parametrize("sql, constraint", [
    ("INSERT INTO runtime_records (game_id, status, engine_endpoint, state_path, docker_network, last_op_at,"
     " created_at, desired_status, desired_image_ref, generation, observed_generation)"
     " VALUES ('g1', 'running', 'e', '/s', 'n', now(), now(), 'running', 'i', 1, 0)", "runtime_records_up_chk"),
    ("INSERT INTO runtime_records (game_id, status, engine_endpoint, state_path, docker_network, last_op_at,"
     " created_at, desired_status, desired_image_ref, generation, observed_generation)"
     " VALUES ('../x', 'starting', 'e', '/s', 'n', now(), now(), 'running', 'i', 1, 0)", "game_id"),
    ("INSERT INTO runtime_records (game_id, status, engine_endpoint, state_path, docker_network, last_op_at,"
     " created_at, desired_status, desired_image_ref, generation, observed_generation)"
     " VALUES ('g1', 'starting', 'e', '/s', 'n', now(), now(), 'running', 'i', 1, 2)",
     "runtime_records_generation_chk"),
    ("INSERT INTO runtime_records (game_id, status, engine_endpoint, state_path, docker_network, last_op_at,"
     " created_at, desired_status, generation, observed_generation)"
     " VALUES ('g1', 'starting', 'e', '/s', 'n', now(), now(), 'running', 1, 0)", "runtime_records_desired_chk"),
    ("INSERT INTO runtime_records (game_id, status, engine_endpoint, state_path, docker_network, last_op_at,"
     " created_at, desired_status, desired_image_ref, generation, observed_generation)"
     " VALUES ('g1', 'paused', 'e', '/s', 'n', now(), now(), 'running', 'i', 1, 0)", "status"),
    ("INSERT INTO runtime_operations (game_id, op, source, status) VALUES ('g1', 'start', 'lobby', 'succeeded')",
     "runtime_operations_finished_chk"),
])
async def test_schema_refuses_rows_that_break_invariants(pool, sql, constraint):
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await pool.execute(sql)
    assert constraint in str(err.value.constraint_name or "")


async def test_rejected_entry_is_a_failed_operation_with_one_result(pool):
    store = Store(pool)
    first = await store.reject_entry(kind=JobKind.START, game_id="BAD/..", stream="s:start", entry_id="5-0",
                                     code=ErrorCode.INVALID_REQUEST, message="game_id must match")
    again = await store.reject_entry(kind=JobKind.START, game_id="BAD/..", stream="s:start", entry_id="5-0",
                                     code=ErrorCode.INVALID_REQUEST, message="game_id must match")
    assert again.duplicate and again.operation_id == first.operation_id
    [res] = await results(pool)
    assert res["outcome"] == "failure" and res["error_code"] == "invalid_request" and res["game_id"] == "BAD/.."
    op = await store.operation(first.operation_id)
    assert op.status is OpStatus.FAILED and op.finished_at is not None


async def test_a_failed_start_answers_failure_and_stops_wanting_the_game(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    new = await store.fail_generation("g1", 1, ErrorCode.ENGINE_UNHEALTHY, "no answer")
    assert new.desired_status is DesiredStatus.STOPPED and new.generation == 2 and not new.rolling_back
    assert new.last_error_code is ErrorCode.ENGINE_UNHEALTHY
    assert await results(pool) == []  # not while its engine may still run: once it is stopped
    [op] = await store.pending_operations("g1")
    assert op.error_code == "engine_unhealthy"
    await store.mark_stopped(new, container_id=None)
    [res] = await results(pool)
    assert (res["outcome"], res["error_code"], res["error_message"]) == ("failure", "engine_unhealthy", "no answer")
    assert res["container_id"] == "" and res["engine_endpoint"] == ""
    # a stale generation changes nothing
    assert await store.fail_generation("g1", 1, ErrorCode.ENGINE_UNHEALTHY, "again") is None


@pytest.mark.parametrize("answer_now", [False, True])
async def test_a_generation_that_only_asked_for_a_turn_fails_the_turn_and_keeps_the_game(pool, answer_now):
    """A Docker outage past the job timeout (answer_now), or an error past the start timeout, fails a
    generation a turn asked for: the turn's jobs get the failure, and the game stays wanted running
    (before: stopped, like a failed start, its engine healthy; found by a red-team reading)."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY,
                           stream="s:control", entry_id="2-0"), DEFAULTS)
    rec = await store.get("g1")
    new = await store.fail_generation("g1", rec.generation, ErrorCode.DOCKER_UNAVAILABLE, "gave up after 301s",
                                      answer_now=answer_now)
    assert new.desired_status is DesiredStatus.RUNNING and new.desired_turn == new.turn and new.converged
    assert new.generation == rec.generation + 1 and new.last_error_code is ErrorCode.DOCKER_UNAVAILABLE
    [res] = [r for r in await results(pool) if r["job_entry_id"] == "2-0"]
    assert (res["job"], res["outcome"], res["error_code"]) == ("force_next_turn", "failure", "docker_unavailable")
    assert await store.pending_operations("g1") == []


async def test_a_pause_whose_generation_fails_is_answered_as_done_and_stays_in_effect(pool):
    """A pause took effect when it was accepted: the failure of its generation (a Docker outage past the
    job timeout) answers it as done, and the game stays wanted running and paused."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(Job(kind=JobKind.PAUSE, game_id="g1", source=OpSource.LOBBY, stream="s:control",
                           entry_id="2-0"), DEFAULTS)
    rec = await store.get("g1")
    new = await store.fail_generation("g1", rec.generation, ErrorCode.DOCKER_UNAVAILABLE, "gave up after 301s",
                                      answer_now=True)
    assert new.desired_status is DesiredStatus.RUNNING and new.paused
    [res] = [r for r in await results(pool) if r["job_entry_id"] == "2-0"]
    assert (res["job"], res["outcome"], res["error_code"]) == ("pause", "success", "")


async def test_a_failed_start_whose_engine_is_not_stopped_is_answered_when_overdue_and_says_so(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    new = await store.fail_generation("g1", 1, ErrorCode.ENGINE_UNHEALTHY, "no answer")
    await store.fail_generation("g1", new.generation, ErrorCode.DOCKER_UNAVAILABLE, "gave up after 300s: docker away",
                                answer_now=True)
    [res] = await results(pool)
    assert (res["outcome"], res["error_code"]) == ("failure", "engine_unhealthy")
    assert res["error_message"] == ("no answer; answered although the engine was not stopped: "
                                    "gave up after 300s: docker away")
    assert await store.pending_operations("g1") == []


async def test_a_failed_patch_of_a_running_game_rolls_back_once(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await converge_running(store, "g1")
    patch = Job(kind=JobKind.PATCH, game_id="g1", source=OpSource.ADMIN, image_ref="galaxy/engine-stub:9")
    await store.submit(patch, DEFAULTS)
    rec = await store.mark_starting(await store.get("g1"), rollback_image=IMG)
    new = await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNHEALTHY, "no answer")
    assert new.desired_status is DesiredStatus.RUNNING and new.desired_image_ref == IMG and new.rolling_back
    res = (await results(pool))[-1]
    assert res["job"] == "patch" and res["error_code"] == "engine_unhealthy"
    assert res["error_message"] == f"no answer; rolled back to {IMG}"
    [note] = [o for o in await store.operations("g1") if o.source is OpSource.RECONCILER]
    assert note.params["event"] == "rollback" and note.params["to"] == IMG
    # the rollback generation's own failure stops the game instead of rolling back again
    again = await store.fail_generation("g1", new.generation, ErrorCode.ENGINE_UNHEALTHY, "still no answer")
    assert again.desired_status is DesiredStatus.STOPPED and not again.rolling_back


async def test_an_overdue_cleanup_stays_a_removal(pool):
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(stop("g1", "2-0"), DEFAULTS)
    await store.mark_stopped(await store.get("g1"), container_id="c" * 64)
    await store.submit(Job(kind=JobKind.CLEANUP, game_id="g1", source=OpSource.ADMIN), DEFAULTS)
    rec = await store.get("g1")
    new = await store.fail_generation("g1", rec.generation, ErrorCode.DOCKER_UNAVAILABLE, "docker away")
    assert new.desired_status is DesiredStatus.REMOVED and new.generation == rec.generation + 1
    assert (await results(pool))[-1]["error_code"] == "docker_unavailable"


async def test_outbox_is_read_in_commit_order_and_marked(pool):
    store = Store(pool)
    for i in range(3):
        await store.reject_entry(kind=JobKind.STOP, game_id=f"g{i}", stream="s:stop", entry_id=f"{i}-0",
                                 code=ErrorCode.INVALID_REQUEST, message="x")
    pending = await store.unpublished()
    assert [p.game_id for p in pending] == ["g0", "g1", "g2"]
    await store.mark_published(pending[0].seq, "9-0")
    assert [p.game_id for p in await store.unpublished()] == ["g1", "g2"]
    assert await store.unpublished_count() == 2
    # The relay's loop: one statement marks a batch and reads what follows (not what it marks).
    nxt = await store.mark_and_read_unpublished([(pending[1].seq, "9-1")], limit=10)
    assert [p.game_id for p in nxt] == ["g2"]
    assert await store.unpublished_count() == 1
    assert await pool.fetchval("SELECT stream_entry_id FROM job_results WHERE seq = $1", pending[1].seq) == "9-1"
    assert await store.mark_and_read_unpublished([(pending[2].seq, "9-2")], limit=10) == []
    assert await store.unpublished_count() == 0




async def test_a_deposed_leader_cannot_write(pool, database_url):
    from desired.db.lease import Lease
    from desired.leader import Fence, Fenced

    old_fence, new_fence = Fence(instance="i", holder="old", ttl=5), Fence(instance="i", holder="new", ttl=5)
    old, new = Lease(database_url, old_fence), Lease(database_url, new_fence)
    assert await old.acquire() == 1
    assert await new.acquire() is None  # the lease is held
    old_store = Store(pool, fence=old_fence)
    await old_store.submit(start("g1", "1-0"), DEFAULTS)  # the leader writes
    await pool.execute("UPDATE leader_leases SET expires_at = now()")  # the old leader stalls past its lease
    assert await new.acquire() == 2  # a new term, with a larger epoch
    assert not await old.renew()
    with pytest.raises(Fenced):
        await old_store.submit(start("g2", "2-0"), DEFAULTS)
    with pytest.raises(Fenced):
        await old_store.mark_published(1, "1-1")
    # The writes that are one statement on their own (no transaction) are fenced in that statement.
    with pytest.raises(Fenced):
        await old_store.mark_published_many([(1, "1-1")])
    with pytest.raises(Fenced):
        await old_store.mark_and_read_unpublished([(1, "1-1")])
    with pytest.raises(Fenced):
        await old_store.claim("g1", 1)
    with pytest.raises(Fenced):  # the fence and the record's lock are one statement
        await old_store.mark_stopped(await Store(pool).get("g1"), container_id=None)
    with pytest.raises(Fenced):  # a compare-and-swap on the row's version: the fence in its one statement
        await old_store.set_admin_token(await Store(pool).get("g1"), "t" * 32)
    assert (await Store(pool).get("g1")).admin_token == ""
    assert (await Store(pool).pending_operations("g1"))[0].status.value == "queued"
    assert await Store(pool).find("g2") is None
    await Store(pool, fence=new_fence).submit(start("g2", "2-0"), DEFAULTS)
    await new.release()
    third = Lease(database_url, Fence(instance="i", holder="third", ttl=5))
    assert await third.acquire() == 3  # released: no wait
    for lease in (old, new, third):
        await lease.close()


async def test_retention_prunes_only_old_published_results_and_finished_operations(pool):
    store = Store(pool)
    for i in range(3):
        await store.reject_entry(kind=JobKind.STOP, game_id=f"g{i}", stream="s:stop", entry_id=f"{i}-0",
                                 code=ErrorCode.INVALID_REQUEST, message="x")
    await store.submit(start("live", "9-0"), DEFAULTS)  # queued: never pruned (its snapshot is not published)
    [p0, p1, _, snapshot] = await store.unpublished()
    assert snapshot.kind == "snapshot"
    await store.mark_published(p0.seq, "1-1")
    await store.mark_published(p1.seq, "1-2")
    await pool.execute("UPDATE job_results SET published_at = now() - interval '40 days' WHERE seq = $1", p0.seq)
    await pool.execute("UPDATE runtime_operations SET finished_at = now() - interval '40 days'"
                       " WHERE finished_at IS NOT NULL")
    assert await store.prune(30, batch=1) == (1, 1)  # g0: old and published; g2 is not published yet
    remaining = {r["game_id"] for r in await pool.fetch("SELECT game_id FROM runtime_operations")}
    assert remaining == {"g1", "g2", "live"}
    assert await store.unpublished_count() == 2


async def test_renewal_does_not_wait_for_writes_in_flight_but_a_take_over_does(pool, database_url):
    from desired.db.lease import Lease, check_fence
    from desired.leader import Fence

    fence = Fence(instance="j", holder="a", ttl=5)
    lease = Lease(database_url, fence)
    other = Lease(database_url, Fence(instance="j", holder="b", ttl=5))
    assert await lease.acquire() == 1
    conn = await pool.acquire()
    tx = conn.transaction()
    await tx.start()
    try:
        await check_fence(fence, conn)  # a long write transaction of the leader, in flight
        assert await asyncio.wait_for(lease.renew(), 1.0)  # the holder's renewal does not wait for it
        await pool.execute("UPDATE leader_leases SET expires_at = now()")  # the term lapses meanwhile
        take_over = asyncio.create_task(other.acquire())

        async def waiting_on_a_lock() -> int:
            return await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event_type = 'Lock'")

        await eventually(waiting_on_a_lock, 10, "the take-over waiting on a lock", interval=0.02)
        assert not take_over.done()  # waits for the old term's write to end
    finally:
        await tx.rollback()
        await pool.release(conn)
    assert await asyncio.wait_for(take_over, 5) == 2
    await lease.close()
    await other.close()


async def test_a_restarted_replica_takes_back_its_own_lease_at_once(database_url):
    from desired.db.lease import Lease
    from desired.leader import Fence

    before = Lease(database_url, Fence(instance="k", holder="replica-1", ttl=30))
    assert await before.acquire() == 1
    after = Lease(database_url, Fence(instance="k", holder="replica-1", ttl=30))  # the same replica after a kill -9
    other = Lease(database_url, Fence(instance="k", holder="replica-2", ttl=30))
    try:
        assert await after.acquire() is None                     # not a first campaign: it waits like anyone
        assert await other.acquire(reclaim=True) is None         # another replica's live lease: never
        assert await after.acquire(reclaim=True) == 2 and after.reclaimed  # its own: at once, a new term
        assert not await before.renew()                          # the old term is over: fenced
    finally:
        for lease in (before, after, other):
            await lease.close()


async def test_replicas_claiming_an_empty_databases_identity_at_once_all_get_the_one_identity(pool):
    """Two replicas started together on an empty database: the one whose insert lost the race must
    read the winner's row, not crash start-up (seen in CI: one of two replicas died at start)."""
    store = Store(pool)
    for _ in range(20):
        await pool.execute("DELETE FROM controller_identity")
        claimed = await asyncio.gather(*(store.claim_identity("inst") for _ in range(6)))
        assert len({i.uid for i in claimed}) == 1, claimed
        assert {i.instance for i in claimed} == {"inst"}


async def test_a_standby_takes_over_as_soon_as_the_lease_expires_not_at_its_next_poll(database_url):
    """A kill -9'd leader cannot release its lease: the standby's first answer waits for the lease to
    expire, and then for the standby's next campaign. That campaign is due at the expiry the database
    named, not at the next poll (up to a second later, or a third of the TTL)."""
    from controller.leadership import Leadership
    from controller.metrics import Metrics
    from desired.db.lease import Lease
    from desired.leader import Fence

    dead = Lease(database_url, Fence(instance="f", holder="dead", ttl=3))
    assert await dead.acquire() == 1
    expires = asyncio.get_running_loop().time() + 3
    await dead.close()  # killed: never renews, never releases
    fence = Fence(instance="f", holder="standby", ttl=3)
    standby = Lease(database_url, fence)
    elected: list[float] = []

    async def on_elected():
        elected.append(asyncio.get_running_loop().time())

    async def on_deposed(reason):
        pass

    leadership = Leadership(standby, fence, Metrics(), on_elected=on_elected, on_deposed=on_deposed)
    stopping = asyncio.Event()
    await asyncio.sleep(0.5)  # campaigns at 0.5 s, then every second: 3.5 s without the expiry's own due time
    task = asyncio.create_task(leadership.run(stopping))
    try:
        await eventually(lambda: elected, 6.0, what="elected", interval=0.01)
        assert elected[0] - expires < 0.25, f"took over {elected[0] - expires:.2f}s after the lease expired"
    finally:
        stopping.set()
        leadership.release()
        await asyncio.wait_for(task, 5)
        await standby.close()


async def test_a_disruption_wait_begins_once_from_the_database_clock(pool):
    """The wait on an engine that answers its health path but not its status is bounded from the first
    look (controller/turns.py): the store writes when it began, once."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.turn_requested(await converge_running(store, "g1"))
    first = await store.note_disruption_wait(rec)
    assert first.disruption_wait_since is not None
    assert first.disruption_wait_since == await pool.fetchval(
        "SELECT disruption_wait_since FROM runtime_records WHERE game_id = 'g1'")
    again = await store.note_disruption_wait(first)
    assert again.disruption_wait_since == first.disruption_wait_since


async def test_removed_games_with_state_are_paged_by_removal_then_game(pool):
    """The storage round's disposal goes on after the last removed game it looked at, in one order: removal
    time, then game (two games removed in the same instant are neither skipped nor looked at twice)."""
    store = Store(pool)
    for game in ("g3", "g1", "g2", "g4"):
        await store.submit(start(game, f"{game}-0"), DEFAULTS)
        await store.mark_removed(await converge_running(store, game))
    await pool.execute("UPDATE runtime_records SET removed_at = (SELECT max(removed_at) FROM runtime_records"
                       " WHERE game_id <> 'g4') WHERE game_id <> 'g4'")  # g1-g3 in one instant, g4 later
    first = await store.removed_with_state(0, 2)
    assert [r.game_id for r in first] == ["g1", "g2"]
    last = first[-1]
    rest = await store.removed_with_state(0, 2, (last.removed_at, last.game_id))
    assert [r.game_id for r in rest] == ["g3", "g4"]
    assert await store.removed_with_state(0, 2, (rest[-1].removed_at, rest[-1].game_id)) == []
    await store.mark_state_disposed("g1")
    assert [r.game_id for r in await store.removed_with_state(0, 10)] == ["g2", "g3", "g4"]


async def test_a_snapshot_resync_of_the_fleet_holds_a_batch_of_records_at_a_time(pool, monkeypatch):
    """Red-team, stop 44: POST /api/v1/snapshots/resync locked every live record in one transaction, for one
    statement per game: at 10,000 games every reconcile write, admission and turn-clock tick of the fleet
    waited behind it (admissions past their lock wait were refused). It now goes a batch of games at a time,
    each batch its own short transaction."""
    from desired.db import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "RESYNC_BATCH", 20)
    store = Store(pool)
    games = [f"g{i:03d}" for i in range(60)]
    for g in games:
        await store.submit(start(g, f"{g}-0"), DEFAULTS)
    real_write = store._write

    async def slow_write(*a, **k):
        await asyncio.sleep(0.02)
        return await real_write(*a, **k)

    monkeypatch.setattr(store, "_write", slow_write)
    resync = asyncio.create_task(store.snapshot_resync())
    await asyncio.sleep(0.2)  # the first batch is under way
    assert not resync.done()
    async with pool.acquire() as conn, conn.transaction():  # the last game is not held yet
        await conn.execute("SET LOCAL lock_timeout = '100ms'")
        assert await conn.fetchval("SELECT game_id FROM runtime_records WHERE game_id = $1 FOR UPDATE",
                                   games[-1]) == games[-1]
    assert await resync == len(games)
    revisions = await pool.fetch("SELECT game_id, snapshot_revision FROM runtime_records ORDER BY game_id")
    assert len({r["snapshot_revision"] for r in revisions}) == 1  # every game got one more, once
