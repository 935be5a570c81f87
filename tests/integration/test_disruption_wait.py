"""Never cut a turn in half, on real Docker with the stub engine: a stop, a restart or a patch sent
while the engine generates a turn lets the turn finish first; ``force`` cuts it at once; a wait
limit shorter than the generation goes ahead after the limit and says so. The stub engine records a
cut generation as "interrupted <turn>" in its events file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.support import eventually
from tests.support.api import STUB_10, STUB_11

FAST = dict(engine_admin_path="/cgi-bin/admin/v1", health_interval="0.3", resync_interval="1")
GENERATION = 15  # seconds a generation takes


def state_dir(api, game: str) -> Path:
    return Path(api.env["RTMANAGER_STATE_ROOT"]) / game


def engine_status(api, game: str) -> dict:
    return json.loads((state_dir(api, game) / "engine" / "status.json").read_text())


def events(api, game: str) -> list[str]:
    path = state_dir(api, game) / "events"
    return [line.split()[0] + (" " + line.split()[1] if line.startswith("interrupted") else "")
            for line in path.read_text().splitlines()] if path.exists() else []


def cut(api, game: str) -> bool:
    """Turn 1 was cut: the stub says so in its events, or (a stub image built before it did) its state
    was left generating turn 1 by a stopped engine, or a restarted engine found it so."""
    st = engine_status(api, game)
    return ("interrupted 1" in events(api, game) or (st["turn"] == 0 and st["phase"] == "generating")
            or (st["turn"] == 0 and (st["last_generation"] or {}).get("error") == "interrupted by restart"))


async def start_generating(api, game: str, image: str = STUB_10) -> None:
    """A game whose engine is generating turn 1, which takes GENERATION seconds."""
    status, res = await api.job(game, "start", {"image_ref": image}, wait=60)
    assert res["outcome"] == "success", res
    d = state_dir(api, game) / "stub-control"
    d.mkdir(exist_ok=True)
    (d / "generation_seconds").write_text(str(GENERATION))
    await eventually(lambda: _admin_known(api, game), what=f"{game}: the engine's admin API known")
    status, res = await api.job(game, "force-next-turn", wait=0)
    assert status == 202, res
    await eventually(lambda: engine_status(api, game)["phase"] == "generating", 20,
                     f"{game}: the engine generating turn 1")


async def _admin_known(api, game: str) -> bool:
    _, body = await api.get(f"/api/v1/runtimes/{game}")
    return body.get("admin_api") is True and body.get("turn") == 0


async def disrupt(api, game: str, kind: str, body: dict | None = None) -> tuple[dict, float]:
    t0 = time.monotonic()
    status, res = await api.job(game, kind, body, wait=90)
    assert status == 200, res
    return res, time.monotonic() - t0


async def test_stop_restart_and_patch_during_a_generation_let_the_turn_finish_and_force_cuts_it(api):
    await api.start(**FAST)
    games = {"dw-stop": ("stop", None), "dw-restart": ("restart", None), "dw-patch": ("patch", {"image_ref": STUB_11}),
             "dw-force": ("stop", {"force": True})}
    await asyncio.gather(*(start_generating(api, g) for g in games))
    before = {g: api.containers(g)[0].id for g in games}
    answers = await asyncio.gather(*(disrupt(api, g, kind, body) for g, (kind, body) in games.items()))
    results = dict(zip(games, answers, strict=True))
    for game, (res, _took) in results.items():
        assert res["outcome"] == "success" and res["error_code"] == "" and res["error_message"] == "", (game, res)
    # the forced stop cut the generation at once
    res, took = results["dw-force"]
    assert took < GENERATION - 5, took
    assert cut(api, "dw-force"), (events(api, "dw-force"), engine_status(api, "dw-force"))
    # the others waited for turn 1, then stopped or replaced the engine
    for game in ("dw-stop", "dw-restart", "dw-patch"):
        ev = events(api, game)
        assert not any(e.startswith("interrupted") for e in ev) and not cut(api, game), (game, ev)
        assert "sigterm" in ev, (game, ev)
        st = engine_status(api, game)
        assert st["turn"] == 1 and st["last_generation"]["ok"] is True, (game, st)
    _, stopped = await api.get("/api/v1/runtimes/dw-stop")
    assert stopped["status"] == "stopped" and stopped["turn"] == 1, stopped
    for game, image in (("dw-restart", STUB_10), ("dw-patch", STUB_11)):
        await eventually(lambda g=game: _turn_known(api, g, 1), what=f"{game}: the new engine at turn 1")
        (c,) = api.containers(game)
        assert c.id != before[game] and c.attrs["Config"]["Image"] == image, (game, c.attrs["Config"]["Image"])
    ops = (await api.get("/api/v1/runtimes/dw-force/operations"))[1]["operations"]
    assert any(o["op"] == "stop" and o["params"].get("force") is True for o in ops), ops


async def _turn_known(api, game: str, turn: int) -> bool:
    _, body = await api.get(f"/api/v1/runtimes/{game}")
    return body.get("status") == "running" and body.get("turn") == turn


async def test_a_wait_limit_shorter_than_the_generation_goes_ahead_after_it_and_says_so(api):
    await api.start(disruption_wait="3", **FAST)
    game = "dw-limit"
    await start_generating(api, game)
    res, took = await disrupt(api, game, "stop")
    assert res["outcome"] == "success" and res["error_code"] == "", res
    assert "RTMANAGER_DISRUPTION_WAIT" in res["error_message"], res
    assert 2.5 <= took < GENERATION - 3, took
    assert cut(api, game), (events(api, game), engine_status(api, game))
    ops = (await api.get(f"/api/v1/runtimes/{game}/operations"))[1]["operations"]
    (stop,) = [o for o in ops if o["op"] == "stop"]
    assert stop["params"]["disruption"] == "stop" and stop["params"]["disruption_waited_seconds"] >= 2.5, stop
    assert "RTMANAGER_DISRUPTION_WAIT" in stop["params"]["disruption_note"], stop


async def test_a_restart_of_the_controller_does_not_reset_the_wait_limit(api):
    """The wait began before the controller stopped; its successor counts from the same moment."""
    await api.start(disruption_wait="8", **FAST)
    game = "dw-failover"
    await start_generating(api, game)
    t0 = time.monotonic()
    status, res = await api.job(game, "stop", wait=0)
    assert status == 202, res
    await eventually(lambda: _waiting(api, game), 10, "the stop waiting for the generation")
    await eventually(lambda: time.monotonic() - t0 >= 5, 10, "five seconds of waiting")
    await api.stop_all()
    api.port = 0  # the next controller serves the API on a port of its own
    await api.start(disruption_wait="8", **FAST)
    await eventually(lambda: _status_is(api, game, "stopped"), 30, "the stop after the limit")
    took = time.monotonic() - t0
    assert took < 12.5, took  # a limit counted again from the restart would stop it after 13 s or more
    assert cut(api, game), (events(api, game), engine_status(api, game))
    ops = (await api.get(f"/api/v1/runtimes/{game}/operations"))[1]["operations"]
    (stop,) = [o for o in ops if o["op"] == "stop"]
    assert stop["status"] == "succeeded" and stop["params"]["disruption_waited_seconds"] >= 7.5, stop


async def _waiting(api, game: str) -> bool:
    _, body = await api.get(f"/api/v1/runtimes/{game}")
    return body.get("disruption_wait_since") is not None


async def _status_is(api, game: str, status: str) -> bool:
    _, body = await api.get(f"/api/v1/runtimes/{game}")
    return body.get("status") == status
