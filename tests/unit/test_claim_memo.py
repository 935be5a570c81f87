"""The claim memo (controller/reconciler.py ``_claimed``, branch g25-turn3): a generation's queued operations
are claimed once per (term, generation) and again after every admission of a job of the game. Review of
g25-turn3: an operation that joins the generation must still be claimed (status ``running``) at a later sync."""

from __future__ import annotations

import asyncio

from controller.triggers import Resync
from desired.model import JobKind, OpStatus
from tests.support.world import IMG, World, started


def turns(w: World, game: str) -> list[OpStatus]:
    return [o.status for o in w.store.ops if o.game_id == game and o.op is JobKind.FORCE_NEXT_TURN]


async def _pending_turn(w: World) -> None:
    w.engine.admin[IMG] = "slow"  # the turn stays generating: the generation stays pending
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await asyncio.wait_for(w.sync("g1"), 30)
    assert turns(w, "g1") == [OpStatus.RUNNING]
    assert not w.store.records["g1"].converged


async def test_a_job_admitted_while_the_claim_is_in_flight_is_claimed_at_the_next_sync(tmp_path):
    """The admission commits after the claim's statement took its snapshot and its wake
    (``job_admitted``) runs before the claim's answer is handled: the memo is set after the wake
    cleared it, so no later sync of the generation claims the new operation."""
    w = World(tmp_path)
    await _pending_turn(w)
    w.reconciler.forget_claims(["g1"])  # as the resync's fallback does: the next look claims
    look = w.store.find_and_claim

    async def racing(game_id: str):
        out = await look(game_id)  # the statement's snapshot: before the admission's commit
        await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # joins the generation (the same turn, still generating)
        w.reconciler.job_admitted("g1")  # admission's wake, handled before the claim's answer
        return out

    w.store.find_and_claim = racing
    await asyncio.wait_for(w.sync("g1"), 30)
    w.store.find_and_claim = look
    # The memo the look set was cleared by the wake: the same sync's step claims again.
    assert turns(w, "g1") == [OpStatus.RUNNING, OpStatus.RUNNING]


async def test_a_job_that_joins_the_generation_without_a_wake_is_claimed_at_the_next_sync(tmp_path):
    """A replica (CLI, operator tool, standby REST) admits a job that JOINs the generation: desired state
    does not change, so desired/db/submissions.py sends no NOTIFY (only CHANGEs are notified), and a lost
    NOTIFY has the same effect: only the resync's (or the poll's) sync looks at the game again, and it
    skips the claim (memo unchanged). Before the branch every sync claimed."""
    w = World(tmp_path)
    await _pending_turn(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # no job_admitted: nothing woke the leader's memo
    assert turns(w, "g1") == [OpStatus.RUNNING, OpStatus.QUEUED]
    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue,
                    metrics=w.reconciler.metrics, interval=30, retention_days=7, ready_check=_ready)
    await resync.once()  # the fallback for every missed wake
    await asyncio.wait_for(w.sync("g1"), 30)
    assert turns(w, "g1") == [OpStatus.RUNNING, OpStatus.RUNNING]


def looks_counted(w: World) -> list[str]:
    """The store's reads and claims of a game, by name, in the order the reconciler calls them."""
    calls: list[str] = []
    for name in ("find", "claim", "find_and_claim"):
        real = getattr(w.store, name)

        async def counted(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return await _real(*args, **kw)

        setattr(w.store, name, counted)
    return calls


async def _ready() -> bool:
    return True


async def test_a_resync_forgets_only_the_claims_of_games_with_a_queued_operation(tmp_path):
    """Issue 25: at 1,000 games a generated turn cost two claims, as every resync forgot every game's
    claim and each game with a turn in flight claimed again at its next poll (a statement each, with
    nothing to claim). The resync's fallback for a lost wake asks the store which games have a queued
    operation (one statement) and forgets those claims only."""
    w = World(tmp_path)
    w.engine.admin[IMG] = "slow"
    for game in ("g1", "g2", "g3"):
        await started(w, game)
        await w.job(JobKind.FORCE_NEXT_TURN, game)
        await asyncio.wait_for(w.sync(game), 30)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # joins g1's generation; its wake is lost
    claims: list[str] = []
    claim, look = w.store.claim, w.store.find_and_claim

    async def counted(game_id: str, generation: int):
        claims.append(game_id)
        return await claim(game_id, generation)

    async def counted_look(game_id: str):
        claims.append(game_id)
        return await look(game_id)

    w.store.claim, w.store.find_and_claim = counted, counted_look
    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue,
                    metrics=w.reconciler.metrics, interval=30, retention_days=7, ready_check=_ready)
    await resync.once()
    for game in ("g1", "g2", "g3"):
        await asyncio.wait_for(w.sync(game), 30)  # each one's poll
    assert claims == ["g1"]
    assert turns(w, "g1") == [OpStatus.RUNNING, OpStatus.RUNNING]


async def test_the_first_look_at_a_woken_game_reads_and_claims_in_one_call(tmp_path):
    """Issue 25: a woken game's sync read its record, then claimed its generation's queued operations: two
    statements a turn (and a start) where one does both. A poll of the same generation only reads."""
    w = World(tmp_path)
    w.engine.admin[IMG] = "slow"
    await started(w)
    calls = looks_counted(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    w.reconciler.job_admitted("g1")
    await asyncio.wait_for(w.sync("g1"), 30)
    assert calls == ["find_and_claim"]
    assert turns(w, "g1") == [OpStatus.RUNNING]
    calls.clear()
    await asyncio.wait_for(w.sync("g1"), 30)  # a poll
    assert calls == ["find"]


async def test_a_look_at_a_game_no_job_woke_only_reads(tmp_path):
    """Review: a converged game looked at for another reason (an event of its unit, the health round)
    has nothing to claim: its look is a plain read, not a fenced write."""
    w = World(tmp_path)
    await started(w)
    assert w.store.records["g1"].converged
    calls = looks_counted(w)
    await asyncio.wait_for(w.sync("g1"), 30)
    assert calls == ["find"]
