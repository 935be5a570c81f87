"""The turn clock's query against the real store: it never asks for a turn while the previous
request is still unanswered.

Found by the scale benchmark (1,000 games on a 10 s clock, 2 loaded cores): the health round
recorded the turn an engine had reached before the reconciler converged the request, the clock
saw the turn reached and asked for the next one at once, and the generation moved on again. Under
load this happened on every turn: observed_generation stayed at 1 while generation reached 16, no
turn operation was ever answered, and neither was a start job that changed the game's interval
(950 of 1,000 unanswered after 20 minutes).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from controller.admission import Admission
from controller.metrics import Metrics
from controller.triggers import TurnClock
from desired.db.store import Store
from desired.jobs import Job, RecordDefaults
from desired.model import JobKind, OpSource, OpStatus
from desired.transitions import Probe

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMAGE = "galaxy/engine-stub:1.0"


def at(turn: int, phase: str = "idle") -> Probe:
    return Probe(healthy=True, admin_api=True, turn=turn, phase=phase)


async def overdue(pool: asyncpg.Pool, game: str) -> None:
    await pool.execute("UPDATE runtime_records SET clock_from = now() - interval '1 hour',"
                       " last_turn_at = now() - interval '1 hour' WHERE game_id = $1", game)


async def pending(store: Store, game: str) -> list[str]:
    return [op.op.value for op in await store.operations(game) if op.status in (OpStatus.QUEUED, OpStatus.RUNNING)]


async def test_the_clock_asks_for_no_turn_while_the_previous_one_is_unanswered(pool):
    store = Store(pool)
    game = "clock-1"
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                           turn_interval=10), DEFAULTS)
    rec = await store.mark_starting(await store.get(game), rollback_image=None)
    rec = await store.mark_running(rec, container_id="c1", image=IMAGE, probe=at(0))
    assert rec.converged and await pending(store, game) == []
    await overdue(pool, game)
    due, _ = await store.due_turns()
    assert game in due

    # The clock asks for turn 1; the reconciler hands it to the engine, which generates it.
    await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    rec = await store.turn_requested(await store.get(game))
    assert rec.desired_turn == 1 and not rec.converged
    # A start that changes the interval meanwhile waits for the same generation's answer.
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                           turn_interval=5), DEFAULTS)
    # The health round sees the engine at turn 1 before the reconciler does: the turn is reached,
    # the request not answered yet.
    rec = await store.record_observation(await store.get(game), at(1), unreachable_after=3, generation_timeout=600)
    assert rec.turn == 1 and not rec.converged
    await overdue(pool, game)
    due, _ = await store.due_turns()
    assert game not in due, "the clock asked for turn 2 while turn 1's request was unanswered"

    # The reconciler converges: every job of the generation is answered; then the clock may ask again.
    rec = await store.mark_running(await store.get(game), container_id="c1", image=IMAGE, probe=at(1))
    assert rec.converged and await pending(store, game) == []
    due, _ = await store.due_turns()
    assert game in due


async def running_on_a_clock(store: Store, pool: asyncpg.Pool, game: str):
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                           turn_interval=10), DEFAULTS)
    rec = await store.mark_starting(await store.get(game), rollback_image=None)
    await store.mark_running(rec, container_id="c1", image=IMAGE, probe=at(0))
    await overdue(pool, game)
    due, _ = await store.due_turns()
    assert game in due  # what the clock read
    return await store.get(game)


async def test_a_turn_submitted_after_a_pause_was_accepted_records_nothing(pool):
    """The clock reads the record unpaused, a pause is accepted (and answered), then the clock submits:
    the store decides again under the record's lock and the turn is skipped."""
    store = Store(pool)
    game = "clock-paused"
    await running_on_a_clock(store, pool, game)
    await store.submit(Job(kind=JobKind.PAUSE, game_id=game, source=OpSource.LOBBY), DEFAULTS)
    paused = await store.mark_running(await store.get(game), container_id="c1", image=IMAGE, probe=at(0))
    assert paused.paused and paused.converged and await pending(store, game) == []
    ops = len(await store.operations(game))

    outcome = await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "skip"
    assert await store.get(game) == paused  # no desired turn, no new generation
    assert len(await store.operations(game)) == ops  # no operation, so no result either
    # submit_many (the same decision step) skips it too
    [outcome] = await store.submit_many([Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER)], DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "skip"
    assert await store.get(game) == paused and len(await store.operations(game)) == ops


async def test_a_turn_submitted_after_a_forced_turn_is_not_one_too_many(pool):
    store = Store(pool)
    game = "clock-forced"
    await running_on_a_clock(store, pool, game)
    await store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id=game, source=OpSource.LOBBY), DEFAULTS)
    rec = await store.turn_requested(await store.get(game))
    # While the forced turn is asked for, the clock's turn is not due: it would only join it.
    outcome = await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "skip"
    rec = await store.mark_running(await store.get(game), container_id="c1", image=IMAGE, probe=at(1))
    assert rec.turn == 1 and rec.converged
    # The forced turn restarted the interval: the clock's late submit asks for nothing.
    outcome = await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "skip"
    assert (await store.get(game)).desired_turn == 1
    # Once the interval has passed again the clock's turn is taken as before.
    await overdue(pool, game)
    outcome = await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "change"
    assert (await store.get(game)).desired_turn == 2


async def test_a_game_at_the_largest_turn_is_never_due_and_a_forced_turn_fails_for_it_alone(pool):
    """Issue 21, defect 4: the turn columns are 32-bit; turn 2147483648 is no turn to ask for."""
    from desired.model import MAX_TURN, ErrorCode

    store = Store(pool)
    for game in ("clock-max", "clock-other"):
        await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                               turn_interval=10), DEFAULTS)
        rec = await store.mark_starting(await store.get(game), rollback_image=None)
        await store.mark_running(rec, container_id=f"c-{game}", image=IMAGE,
                                 probe=at(MAX_TURN if game == "clock-max" else 7))
        await overdue(pool, game)
    due, _ = await store.due_turns()
    assert "clock-other" in due
    assert "clock-max" not in due, "the clock would ask for a turn no column holds"

    outcome = await store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="clock-max", source=OpSource.LOBBY),
                                 DEFAULTS)
    assert outcome.decision is not None and outcome.decision.action == "reject"
    (op,) = [o for o in await store.operations("clock-max") if o.op.value == "force_next_turn"]
    assert op.status is OpStatus.FAILED and op.error_code == ErrorCode.GENERATION_FAILED.value
    rec = await store.get("clock-max")
    assert rec.turn == MAX_TURN and rec.desired_turn is None and rec.converged
    # The other game's turns go on.
    await store.submit(Job(kind=JobKind.TURN, game_id="clock-other", source=OpSource.SCHEDULER), DEFAULTS)
    assert (await store.get("clock-other")).desired_turn == 8


# ----------------------------------------------- the clock's one statement (issue 25: the turn's cost)
async def test_one_statement_asks_the_due_games_turns_and_says_when_the_next_is_due(pool):
    store = Store(pool)
    for game in ("tick-due", "tick-held", "tick-later", "tick-paused"):
        await running_on_a_clock(store, pool, game)
    await pool.execute("UPDATE runtime_records SET last_turn_at = now(), clock_from = now()"
                       " WHERE game_id = 'tick-later'")
    await pool.execute("UPDATE runtime_records SET paused = true WHERE game_id = 'tick-paused'")
    before = {g: await store.get(g) for g in ("tick-due", "tick-held", "tick-later")}

    asked, next_in, full = await store.ask_due_turns(200, ["tick-held"])

    assert asked == ["tick-due"] and not full
    assert next_in is not None and 9 < next_in <= 10  # tick-later's turn, its interval from now
    rec = await store.get("tick-due")
    assert rec.desired_turn == 1 and rec.generation == before["tick-due"].generation + 1 and not rec.converged
    (op,) = [o for o in await store.operations("tick-due") if o.op is JobKind.TURN]
    assert op.source is OpSource.SCHEDULER and op.status is OpStatus.QUEUED and op.generation == rec.generation
    for g in ("tick-held", "tick-later"):
        assert await store.get(g) == before[g] and await pending(store, g) == []
    # Asked: no longer due, so a second tick asks nothing (a game asks for one turn at a time).
    assert (await store.ask_due_turns(200, []))[0] == ["tick-held"]


async def test_a_pause_in_flight_passes_the_game_over_and_once_committed_leaves_it_out(pool):
    """The clock's statement reads its page, then locks the due games: a pause holding the record's lock
    makes the statement pass the game over (and look again soon), and once committed the game is not due."""
    store = Store(pool)
    await running_on_a_clock(store, pool, "tick-race")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE runtime_records SET paused = true WHERE game_id = 'tick-race'")
        asked, _, again = await asyncio.wait_for(store.ask_due_turns(200, []), 5)
        assert asked == [] and again
        await tx.commit()
    asked, _, again = await store.ask_due_turns(200, [])
    assert asked == [] and not again
    rec = await store.get("tick-race")
    assert rec.desired_turn is None and rec.converged and await pending(store, "tick-race") == []


async def test_a_record_the_statement_cannot_take_fails_that_game_alone(pool):
    """Hostile data (a restored or hand-edited database): a generation at the top of its column makes
    the clock's statement fail for the whole page. The clock asks game by game then: the other game
    gets its turn, the bad one is held back and left out of the next statements."""
    store = Store(pool)
    for game in ("tick-top", "tick-fine"):
        await running_on_a_clock(store, pool, game)
    await pool.execute("UPDATE runtime_records SET generation = 9223372036854775807,"
                       " observed_generation = 9223372036854775807 WHERE game_id = 'tick-top'")
    woken: list[str] = []
    clock = TurnClock(store=store, admission=Admission(store, DEFAULTS, wake=woken.append), metrics=Metrics(),
                      max_sleep=30.0)
    await clock.tick()
    assert (await store.get("tick-fine")).desired_turn == 1 and woken == ["tick-fine"]
    assert "tick-top" in clock.held and (await store.get("tick-top")).desired_turn is None
    await overdue(pool, "tick-fine")
    await pool.execute("UPDATE runtime_records SET observed_generation = generation, turn = 1"
                       " WHERE game_id = 'tick-fine'")  # turn 1 generated and answered
    await clock.tick()  # the statement again, without the held game
    assert (await store.get("tick-fine")).desired_turn == 2 and woken == ["tick-fine", "tick-fine"]


async def _blocked(task: asyncio.Task) -> bool:
    done, _ = await asyncio.wait({task}, timeout=0.7)
    return not done


async def test_the_clocks_statement_and_an_intake_batch_lock_in_one_order_and_never_deadlock(pool):
    """Found by review: the intake's batch took the advisory locks in game order but the rows in the
    table's order; the clock's statement takes rows in game order and no advisory lock. A transition
    holding the first game's row lined them up: the clock waited on a, the intake locked b then waited on
    a, and Postgres broke the deadlock by failing one of them (a second of backoff, a failing loop)."""
    from desired.errors import StoreUnavailable

    store = Store(pool)
    for g in ("dl-a", "dl-b"):
        await running_on_a_clock(store, pool, g)
    # dl-a's live row after dl-b's in the table (an update moves it): the table's order is b, a.
    await pool.execute("UPDATE runtime_records SET last_op_at = last_op_at WHERE game_id = 'dl-a'")
    gate = await pool.acquire()
    tx = gate.transaction()
    await tx.start()
    try:
        await gate.execute("SELECT 1 FROM runtime_records WHERE game_id = 'dl-a' FOR UPDATE")
        clock = asyncio.create_task(store.ask_due_turns(200, []))
        await asyncio.wait({clock}, timeout=0.7)  # it waited for dl-a (before the fix) or passed it over
        intake = asyncio.create_task(store.submit_many(
            [Job(kind=JobKind.PAUSE, game_id="dl-a", source=OpSource.LOBBY, stream="s", entry_id="1-0"),
             Job(kind=JobKind.PAUSE, game_id="dl-b", source=OpSource.LOBBY, stream="s", entry_id="1-1")], DEFAULTS))
        assert await _blocked(intake)
    finally:
        await tx.commit()
        await pool.release(gate)
    results = await asyncio.gather(clock, intake, return_exceptions=True)
    assert not any(isinstance(r, (StoreUnavailable, asyncpg.DeadlockDetectedError)) for r in results), results


async def test_a_locked_record_is_passed_over_and_holds_no_other_game(pool):
    """Found by review: the clock's statement waited for a record another transaction held, with the
    locks of the games before it held meanwhile (their probes' writes waited, and no game got its turn).
    It passes over a locked record, asks the others, and says to look again soon."""
    store = Store(pool)
    for g in ("st-a", "st-b"):
        await running_on_a_clock(store, pool, g)
    gate = await pool.acquire()
    tx = gate.transaction()
    await tx.start()
    try:
        await gate.execute("SELECT 1 FROM runtime_records WHERE game_id = 'st-b' FOR UPDATE")
        asked, _, again = await asyncio.wait_for(store.ask_due_turns(200, []), 5)
        assert asked == ["st-a"] and again
        # st-a's lock is not held by the clock any more: its probe's write goes through at once.
        rec_a = await store.get("st-a")
        await asyncio.wait_for(store.record_observation(rec_a, at(0, "generating"), unreachable_after=3,
                                                        generation_timeout=600), 5)
    finally:
        await tx.commit()
        await pool.release(gate)
    asked, _, again = await store.ask_due_turns(200, [])
    assert asked == ["st-b"] and not again


async def test_an_engine_gone_back_is_asked_for_no_lost_turn_and_the_clock_still_runs(pool):
    """An engine that lost its last saves reports a lower turn: the record takes it, desired state
    stops asking for the lost turns (written by the probe's write), and the clock asks for the next
    turn past the engine's at its time, as for any game."""
    store = Store(pool)
    game = "back-1"
    rec = await running_on_a_clock(store, pool, game)
    await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    rec = await store.turn_requested(await store.get(game))
    rec = await store.mark_running(rec, container_id="c1", image=IMAGE, probe=at(1))
    await pool.execute("UPDATE runtime_records SET turn = 5, desired_turn = 5 WHERE game_id = $1", game)
    rec = await store.get(game)
    assert rec.converged and rec.turn == 5 and await pending(store, game) == []
    rec = await store.record_observation(rec, at(2), unreachable_after=3, generation_timeout=600)
    stored = await store.get(game)
    assert (stored.turn, stored.desired_turn) == (2, 2) and stored.converged
    await overdue(pool, game)
    await store.submit(Job(kind=JobKind.TURN, game_id=game, source=OpSource.SCHEDULER), DEFAULTS)
    assert (await store.get(game)).desired_turn == 3


async def test_a_probe_older_than_the_recorded_turn_is_refused(pool):
    """A probe taken before the turn path recorded a newer turn, written late, takes nothing back."""
    from desired.errors import Conflict
    store = Store(pool)
    game = "back-2"
    read = await running_on_a_clock(store, pool, game)
    newer = await store.record_observation(read, at(1), unreachable_after=3, generation_timeout=600)
    assert newer.turn == 1
    with pytest.raises(Conflict):
        await store.record_observation(read, at(0), unreachable_after=3, generation_timeout=600)
    assert (await store.get(game)).turn == 1
