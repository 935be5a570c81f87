"""Turn operations on real Docker with the stub engine's admin API: the turn clock, pause and resume,
forced turns (exactly one, even twice at once), failed generations, engines without an admin API,
and control jobs interleaved with starts and stops on the streams."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support import eventually, settled
from tests.support.api import FAST, STUB_10, engine_turn, runtime


def slow(api, game: str, seconds: str) -> None:
    d = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "stub-control"
    d.mkdir(exist_ok=True)
    (d / "generation_seconds").write_text(seconds)


async def test_the_turn_clock_advances_a_game_and_pause_stops_it(api):
    await api.start(**FAST)
    game = "clock1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10, "turn_interval": 2})
    assert res["outcome"] == "success", res
    slow(api, game, "0.1")
    t0 = time.monotonic()
    await eventually(lambda: _turn_at_least(api, game, 2), 15, "two scheduled turns")
    elapsed = time.monotonic() - t0
    # About one turn per 2 s: not two turns in 2 s (a clock ticking too fast); at most what two turns
    # cost on a loaded machine. Each turn lands its latency after it is due (the clock's tick, the
    # request, the engine's generation, seeing it): 0.3-0.5 s idle, 1.1-1.4 s with the 2 cores busy
    # (issue 25 review), so 9 s (2.5 s a turn) failed once under a parallel CI run; the wait above is 15 s.
    assert 2.0 <= elapsed <= 13.0, elapsed
    status, res = await api.job(game, "pause")
    assert res["outcome"] == "success" and res["job"] == "pause", res
    paused_at = (await runtime(api, game))["turn"]
    await asyncio.sleep(4.5)  # more than two intervals: a paused clock must not tick
    assert (await runtime(api, game))["turn"] == paused_at
    status, res = await api.job(game, "resume")
    assert res["outcome"] == "success", res
    await eventually(lambda: _turn_at_least(api, game, paused_at + 1), 10, "the clock restarted")
    ops = {o["source"] for o in (await api.get(f"/api/v1/runtimes/{game}/operations"))[1]["operations"]
           if o["op"] == "turn"}
    assert ops == {"scheduler"}


async def _turn_at_least(api, game: str, turn: int) -> bool:
    body = await runtime(api, game)
    return body["turn"] is not None and body["turn"] >= turn


async def test_force_next_turn_advances_exactly_one_turn_even_sent_twice_at_once(api):
    ctl = await api.start(**FAST)
    game = "force1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    slow(api, game, "0.5")
    await eventually(lambda: _turn_at_least(api, game, 0), what="the engine's turn known")
    answers = await asyncio.gather(api.job(game, "force-next-turn"), api.job(game, "force-next-turn"))
    assert [a[1]["outcome"] for a in answers] == ["success", "success"], answers
    assert engine_turn(api, game) == 1 and (await runtime(api, game))["turn"] == 1
    await settled(ctl, horizon=5)  # nothing asks for another: no turn poll or retry planned
    assert engine_turn(api, game) == 1


async def test_a_failing_generation_answers_generation_failed_and_the_game_stays_up(api):
    await api.start(**FAST)
    game = "genfail1"
    status, res = await api.job(game, "start", {"image_ref": "galaxy/engine-stub:genfail"})
    assert res["outcome"] == "success", res
    await eventually(lambda: _turn_at_least(api, game, 0), what="the engine's turn known")
    status, res = await api.job(game, "force-next-turn")
    assert res["outcome"] == "failure" and res["error_code"] == "generation_failed", res
    body = await runtime(api, game)
    assert body["status"] == "generation_failed" and body["turn"] == 0 and len(api.containers(game)) == 1


async def test_turn_ops_on_an_engine_without_admin_api_are_engine_unsupported(api):
    await api.start(**FAST)
    game = "plain2"
    status, res = await api.job(game, "start", {"image_ref": "galaxy/engine-stub:plain"})
    assert res["outcome"] == "success", res
    status, res = await api.job(game, "force-next-turn")
    assert res["error_code"] == "engine_unsupported", res
    for op in ("pause", "resume"):
        status, res = await api.job(game, op)
        assert res["outcome"] == "success", res  # the clock is rtmanager's: it needs no admin API
    assert (await runtime(api, game))["status"] == "running"


async def test_control_jobs_interleaved_with_starts_and_stops_apply_in_entry_order(api):
    """Control entries share the intake's per-game order with the start and stop streams."""
    start_s, stop_s, control = (api.env[k] for k in ("RTMANAGER_START_STREAM", "RTMANAGER_STOP_STREAM",
                                                      "RTMANAGER_CONTROL_STREAM"))
    async def add(stream: str, fields: dict) -> str:
        await asyncio.sleep(0.003)  # entry ids of two streams order them only to the millisecond
        return await api.redis.xadd(stream, fields)

    entries = [
        ("start", await add(start_s, {"game_id": "ctl1", "image_ref": STUB_10})),
        ("pause", await add(control, {"game_id": "ctl1", "op": "pause"})),
        ("force_next_turn", await add(control, {"game_id": "ctl1", "op": "force_next_turn"})),
        ("stop", await add(stop_s, {"game_id": "ctl1", "reason": "cancelled"})),
        ("pause", await add(control, {"game_id": "ctl1", "op": "pause"})),  # after the stop: not running
        ("reconcile", await add(control, {"game_id": "ctl1", "op": "bogus"})),
    ]
    await api.start(**FAST)
    got = [await api.result(entry, job, timeout=60) for job, entry in entries]
    assert got[-2]["error_code"] == "invalid_request" and "not running" in got[-2]["error_message"], got[-2]
    assert got[-1]["error_code"] == "invalid_request" and "op" in got[-1]["error_message"], got[-1]
    assert got[3]["outcome"] == "success" and got[3]["error_code"] == "", got[3]
    ops = [o for o in (await api.get("/api/v1/runtimes/ctl1/operations"))[1]["operations"]
           if o["source"] == "lobby"][::-1]
    assert [o["entry_id"] for o in ops] == [e for _, e in entries]  # taken in entry order
    assert (await runtime(api, "ctl1"))["status"] == "stopped"


async def test_schedule_is_set_through_rest_and_validated(api):
    await api.start(**FAST)
    game = "sched1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    status, body, _ = await api.request("PUT", f"/api/v1/runtimes/{game}/schedule", json={"turn_interval": 1})
    assert status == 200 and body["turn_interval"] == 1
    slow(api, game, "0.1")
    await eventually(lambda: _turn_at_least(api, game, 1), 10, "a scheduled turn")
    for bad in ({"turn_interval": -1}, {"turn_interval": "5"}, {"turn_interval": True}, {}, [1]):
        status, body, _ = await api.request("PUT", f"/api/v1/runtimes/{game}/schedule", json=bad)
        assert status == 400, (bad, body)
    status, _, _ = await api.request("PUT", "/api/v1/runtimes/nope/schedule", json={"turn_interval": 1})
    assert status == 404


async def test_a_long_generation_whose_engine_does_not_answer_is_not_engine_unreachable(api):
    """Issue 21 #9: one status timeout during a long generation failed the forced turn
    engine_unreachable, then the engine published the turn; a retry in between must not ask for two."""
    from tests.support.api import control, snapshots

    ctl = await api.start(**FAST, start_timeout="1", unreachable_after="2")
    game = "slowst1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    slow(api, game, "10")
    await eventually(lambda: _turn_at_least(api, game, 0), what="the engine's turn known")
    stream = api.env["RTMANAGER_CONTROL_STREAM"]
    first = await api.redis.xadd(stream, {"game_id": game, "op": "force_next_turn"})
    await eventually(lambda: _status(api, game, "generation_in_progress"), what="generating")
    mute = control(api, game, "mute")  # health and admin requests hang while it generates
    errors = ctl.metrics.engine_calls.labels("status", "error")
    polls = errors._value.get()
    await eventually(lambda: errors._value.get() >= polls + 2, 20, "two status polls timed out")
    retry = await api.redis.xadd(stream, {"game_id": game, "op": "force_next_turn"})
    await eventually(lambda: engine_turn(api, game) == 1, 20, "the turn generated")
    mute.unlink()
    got = [await api.result(e, "force_next_turn", timeout=30) for e in (first, retry)]
    assert [(r["outcome"], r["error_code"]) for r in got] == [("success", "")] * 2, got
    assert engine_turn(api, game) == 1 and (await runtime(api, game))["turn"] == 1
    reasons = [s["reason"] for s in await snapshots(api, game)]
    assert "engine_unreachable" not in reasons, reasons


async def _status(api, game: str, status: str) -> bool:
    return (await runtime(api, game))["status"] == status


async def test_a_pause_and_a_reconcile_during_a_long_turn_are_answered_before_it(api):
    """A pause, resume or reconcile never touches the engine: it was answered only when the turn in progress
    was (after a long turn as long, never for an engine generating for ever). Now at once, the turn after."""
    await api.start(**FAST)
    game = "ctlturn1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    slow(api, game, "15")
    await eventually(lambda: _turn_at_least(api, game, 0), what="the engine's turn known")
    stream = api.env["RTMANAGER_CONTROL_STREAM"]
    forced = await api.redis.xadd(stream, {"game_id": game, "op": "force_next_turn"})
    await eventually(lambda: _status(api, game, "generation_in_progress"), what="generating")
    entries = [await api.redis.xadd(stream, {"game_id": game, "op": op}) for op in ("pause", "reconcile")]
    got = [await api.result(e, op, timeout=10) for e, op in zip(entries, ("pause", "reconcile"), strict=True)]
    assert [(r["outcome"], r["error_code"]) for r in got] == [("success", "")] * 2, got
    assert engine_turn(api, game) == 0  # answered while the engine still generates
    body = await runtime(api, game)
    assert body["paused"] is True and body["status"] == "generation_in_progress", body
    turn = await api.result(forced, "force_next_turn", timeout=40)
    assert (turn["outcome"], turn["error_code"]) == ("success", ""), turn
    assert engine_turn(api, game) == 1 and (await runtime(api, game))["turn"] == 1


async def test_a_force_next_turn_sent_again_under_its_idempotency_key_asks_for_no_second_turn(api):
    """A retry after a lost answer (the CLI's exit 3) asked the engine for another turn: REST jobs had no
    idempotency key. The same key again is the same job: its first operation is answered, replayed, and the
    engine generates one turn; another request under that key is a 422; a malformed key a 400."""
    ctl = await api.start(**FAST)
    game = "idem1"
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res
    await eventually(lambda: _turn_at_least(api, game, 0), what="the engine's turn known")
    key = {"Idempotency-Key": "3f6c1d2e-9a41-4b7e-8d0e-5c2a7b9e1f00"}
    first, replays = await api.job(game, "force-next-turn", headers=key), []
    assert first[0] == 200 and first[1]["outcome"] == "success", first
    for _ in range(2):  # sent again after its answer came (and was lost on the way)
        status, body, resp = await api.request("POST", f"/api/v1/runtimes/{game}/force-next-turn",
                                               headers={"Idempotency-Key": f'"{key["Idempotency-Key"]}"'})
        replays.append((status, body, resp.headers.get("Idempotent-Replayed")))
    assert [(s, b["operation_id"], b["result_id"], h) for s, b, h in replays] == [
        (200, first[1]["operation_id"], first[1]["result_id"], "true")] * 2, replays
    await settled(ctl, horizon=3)
    assert engine_turn(api, game) == 1 and (await runtime(api, game))["turn"] == 1
    ops = [o for o in (await api.get(f"/api/v1/runtimes/{game}/operations"))[1]["operations"]
           if o["op"] == "force_next_turn"]
    assert [o["id"] for o in ops] == [first[1]["operation_id"]], ops
    status, body = await api.job(game, "pause", headers=key)  # the key of another request
    assert status == 422 and "another request" in body["error"], body
    status, body = await api.job(game, "force-next-turn", {"force": False}, headers={"Idempotency-Key": "a b"})
    assert status == 400 and "Idempotency-Key" in body["error_message"], body
    status, res = await api.job(game, "force-next-turn", headers={"Idempotency-Key": "another-key"})
    assert res["outcome"] == "success" and res["operation_id"] != first[1]["operation_id"], res
    assert engine_turn(api, game) == 2  # a new key is a new job
