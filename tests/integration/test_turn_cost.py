"""What one turn of an up, converged game costs the controller: SQL statements, Docker inspects,
engine admin calls and CPU per forced turn, for a few running stub engines (issue 25).

Run it alone to read the figures (``-s`` prints them):
    pytest tests/integration/test_turn_cost.py -s
The health round and the resync are set far apart so that what is counted is the turn path
(intake, admission, reconciler, relay); the turn is seen by the turn path's own status poll."""

from __future__ import annotations

import asyncio
import os
import time

from tests.support import eventually
from tests.support.api import STUB_10, runtime
from tests.support.statements import Counter

GAMES = 3
TURNS = int(os.environ.get("TURN_COST_TURNS", "5"))  # forced turns per game

# Statements of loops that run on their own clock, not per turn: how many fall in the window depends on
# its length (the lease's renewal, the drain loop's tick). Printed, not held to the bound.
PERIODIC = ("UPDATE leader_leases SET renewed_at", "SELECT * FROM drains WHERE")
# The bound of what a turn costs today (issue 25: 52 statements before the turn's own path; the goal is
# 6). A forced turn of an up, idle game with an admin API: admission (one transaction, shared by the
# entries the intake reads together), the claim (one statement), the request (one statement: a
# compare-and-swap on the row's version with the generation_started snapshot), the poll (a read, a
# status call), the generated turn (a read of its jobs and one statement: the record, their answers, the
# snapshot and their results), the relay's reads and marks. A poll more (the engine slower), or an
# intake that reads the entries one by one, costs a few statements: the bound leaves room for them.
# Measured: 15.1-16.1 (22.3 before the one-statement swaps).
MAX_STATEMENTS_PER_TURN = 18
# A scheduled turn (the turn clock's): no stream entry to admit from. The clock's tick is one statement
# (its due query and the games' turn jobs); no transaction is opened. Measured: 12.9-14.1 (27.4-28.6
# before).
MAX_STATEMENTS_PER_SCHEDULED_TURN = 16
SCHEDULED_WINDOW = 9.0  # seconds of scheduled turns counted (one a second per game)


def metric(ctl, name: str, **labels: str) -> float:
    total = 0.0
    for fam in ctl.metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def _up_games(api, prefix: str):
    """A controller (slow periodic loops) with GAMES stub engines up and their turns known."""
    ctl = await api.start(engine_admin_path="/cgi-bin/admin/v1", health_interval="60", resync_interval="120")
    games = [f"{prefix}{i}" for i in range(GAMES)]
    answers = await asyncio.gather(*(api.job(g, "start", {"image_ref": STUB_10}) for g in games))
    assert all(a[1]["outcome"] == "success" for a in answers), answers
    for g in games:
        await eventually(lambda g=g: _turn_known(api, g), what="the engine's turn known")
    return ctl, games


async def test_the_cost_of_a_turn_of_an_up_converged_game(api):
    ctl, games = await _up_games(api, "cost")
    await asyncio.sleep(1.0)  # let the starts' own work settle
    stream = api.env["RTMANAGER_CONTROL_STREAM"]
    with Counter() as sql:
        sql.reset()
        i0 = metric(ctl, "rtmanager_docker_api_calls_total", operation="inspect")
        e0 = {op: metric(ctl, "rtmanager_engine_status_calls_total", call=op) for op in ("status", "turns")}
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(TURNS):
            entries = [await api.redis.xadd(stream, {"game_id": g, "op": "force_next_turn"}) for g in games]
            got = [await api.result(e, "force_next_turn", timeout=30) for e in entries]
            assert all(r["outcome"] == "success" for r in got), got
        c1, t1 = time.process_time(), time.perf_counter()
        inspects = metric(ctl, "rtmanager_docker_api_calls_total", operation="inspect") - i0
        engine = {op: metric(ctl, "rtmanager_engine_status_calls_total", call=op) - e0[op] for op in e0}
        turns = TURNS * GAMES
        periodic = report(f"forced turns of {GAMES} games", sql, turns, t1 - t0, c1 - c0, inspects, engine)
        stmts = sql.total
    # What can be counted deterministically is held: no inspect, the engine asked exactly once a turn
    # (its compare-and-swap guards a repeat, but none is made), and a bound on the statements.
    assert inspects == 0
    assert engine["turns"] == turns
    assert (stmts - periodic) / turns <= MAX_STATEMENTS_PER_TURN, sql.queries.most_common(40)
    for g in games:
        assert (await runtime(api, g))["turn"] == TURNS


async def test_the_cost_of_a_scheduled_turn_of_an_up_converged_game(api):
    """The turn clock's turn: no stream entry, no admission from the intake and no result to relay; the
    clock's due query, the clock's own admission, the reconciler's request and convergence."""
    ctl, games = await _up_games(api, "costsched")
    for g in games:
        status, body, _ = await api.request("PUT", f"/api/v1/runtimes/{g}/schedule", json={"turn_interval": 1})
        assert status == 200, body
    await eventually(lambda: _all_turned(api, games, 1), 15, "a first scheduled turn of every game")
    before = {g: (await runtime(api, g))["turn"] for g in games}
    with Counter() as sql:
        i0 = metric(ctl, "rtmanager_docker_api_calls_total", operation="inspect")
        e0 = {op: metric(ctl, "rtmanager_engine_status_calls_total", call=op) for op in ("status", "turns")}
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(SCHEDULED_WINDOW)
        c1, t1 = time.process_time(), time.perf_counter()
        inspects = metric(ctl, "rtmanager_docker_api_calls_total", operation="inspect") - i0
        engine = {op: metric(ctl, "rtmanager_engine_status_calls_total", call=op) - e0[op] for op in e0}
    after = {g: (await runtime(api, g))["turn"] for g in games}
    turns = sum(after[g] - before[g] for g in games)
    assert turns >= GAMES * (SCHEDULED_WINDOW // 2), (before, after)  # about one a second each
    periodic = report(f"scheduled turns of {GAMES} games (interval 1 s)", sql, turns, t1 - t0, c1 - c0,
                      inspects, engine)
    assert inspects == 0
    # A turn at the window's edge may be asked for inside it and generated after it (or the other way
    # round): a turn more or less in the count.
    assert (sql.total - periodic) / turns <= MAX_STATEMENTS_PER_SCHEDULED_TURN, sql.queries.most_common(40)


def report(what: str, sql: Counter, turns: int, wall: float, cpu: float, inspects: float,
           engine: dict[str, float]) -> int:
    """Print the figures of a window of ``turns`` turns; return the periodic loops' statements."""
    stmts = sql.total
    tx = sum(c for q, c in sql.queries.items() if q.split()[0].rstrip(";").upper() in ("BEGIN", "COMMIT", "ROLLBACK"))
    print(f"\nturn cost over {turns} {what} ({wall:.1f}s):")
    print(f"  SQL statements / turn     {stmts / turns:.1f} ({(stmts - tx) / turns:.1f} without BEGIN/COMMIT)")
    print(f"  Docker inspects / turn    {inspects / turns:.1f}")
    print("  engine calls / turn       " + ", ".join(f"{k} {v / turns:.1f}" for k, v in engine.items()))
    print(f"  process CPU ms / turn     {1000 * cpu / turns:.1f} (controller and test client)")
    for q, c in sql.queries.most_common(40):
        print(f"    {c / turns:5.2f}  {q}")
    periodic = sum(c for q, c in sql.queries.items() if q.startswith(PERIODIC))
    print(f"  of which periodic loops   {periodic / turns:.1f} (not counted below)")
    return periodic


async def _all_turned(api, games: list[str], turn: int) -> bool:
    for g in games:
        if ((await runtime(api, g))["turn"] or 0) < turn:
            return False
    return True


async def _turn_known(api, game: str) -> bool:
    body = await runtime(api, game)
    return body["turn"] is not None and body["status"] == "running"
