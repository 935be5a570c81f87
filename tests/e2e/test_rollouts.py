"""Rolling engine-version rollouts with real ``rtmanager run`` processes.

* 20 games with turns running move from 1.0 to 1.1, three at a time after one canary, with a
  kill -9 of the leader in the middle: the standby takes the rollout over from the rows, every game
  ends on 1.1, each engine was stopped once, inside its own patch, never in a generation (the stub
  engine logs a cut generation as "interrupted"), its turn only went up, and the rollout completes
  after the failover.
* A rollout to an engine that never answers pauses itself after its failure budget, and every game
  runs on 1.0 (the failed ones rolled back by their patch).
"""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import redis

from tests.support import ROOT, ControllerProcess, ResultReader, cli, eventually_sync, free_port, migrate

TTL = 2.0
TOKEN = "rollout-test-token-0123456789"
OLD, NEW, MUTE = "galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1", "galaxy/engine-stub:mute"
wait_until = functools.partial(eventually_sync, interval=0.2)


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def leads(port: int) -> bool | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as resp:
            return json.load(resp)["leader"]
    except Exception:  # noqa: BLE001 - not answering (dead, starting)
        return None


def base_env(rtm_env: dict[str, str]) -> dict[str, str]:
    return {**rtm_env, "RTMANAGER_LEASE_TTL": str(TTL), "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1",
            "RTMANAGER_HEALTH_INTERVAL": "0.5", "RTMANAGER_ROLLOUT_INTERVAL": "0.5", "RTMANAGER_API_TOKEN": TOKEN,
            "RTMANAGER_HTTP_HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}


def start_games(env: dict[str, str], games: list[str], interval: int | None) -> None:
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    results = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    try:
        fields = {"turn_interval": str(interval)} if interval else {}
        entries = [r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": g, "image_ref": OLD, **fields}) for g in games]
        for e in entries:
            assert results.for_entry(e, timeout=60)["outcome"] == "success"
    finally:
        r.close()
        results.close()


def events(state_root: Path, game: str) -> list[tuple[str, datetime]]:
    out = []
    for line in (state_root / game / "events").read_text().splitlines():
        parts = line.split()
        out.append((" ".join(parts[:-1]), datetime.fromisoformat(parts[-1].replace("Z", "+00:00"))))
    return out


class TurnWatch(threading.Thread):
    """Reads every game's engine turn (its status file) every 0.1 s: a turn that goes down is a cut."""

    def __init__(self, state_root: Path, games: list[str]) -> None:
        super().__init__(daemon=True)
        self.files = {g: state_root / g / "engine" / "status.json" for g in games}
        self.last: dict[str, int] = {}
        self.went_down: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for g, f in self.files.items():
                try:
                    turn = json.loads(f.read_text())["turn"]
                except (OSError, ValueError, KeyError):
                    continue  # between two writes
                if turn < self.last.get(g, 0):
                    self.went_down.append(f"{g}: {self.last[g]} -> {turn}")
                self.last[g] = max(turn, self.last.get(g, 0))
            time.sleep(0.1)


def test_a_rollout_of_20_games_survives_a_kill_9_of_the_leader(rtm_env, tmp_path, unique):
    env = base_env(rtm_env)
    migrate(env)
    state_root = Path(env["RTMANAGER_STATE_ROOT"])
    games = [f"ro-{unique}-{n:02d}" for n in range(20)]
    procs: dict[str, tuple[ControllerProcess, int]] = {}

    def spawn(name: str) -> None:
        port = free_port()
        penv = {**env, "RTMANAGER_HTTP_PORT": str(port), "RTMANAGER_CONSUMER_NAME": f"replica-{name}"}
        procs[name] = (ControllerProcess(penv, tmp_path / f"{name}.log").start(), port)

    def leader() -> str | None:
        found = [n for n, (_, port) in procs.items() if leads(port)]
        return found[0] if len(found) == 1 else None

    watch = TurnWatch(state_root, games)
    try:
        spawn("a")
        spawn("b")
        first = wait_until(leader, 20, "one leader")
        port = procs[first][1]
        for version, image in (("1.0", OLD), ("1.1", NEW)):
            assert call(port, "POST", "/api/v1/admin/engine-versions", {"version": version, "image_ref": image})[0] \
                == 201
        start_games(env, games, interval=1)
        watch.start()
        wait_until(lambda: all(watch.last.get(g, 0) >= 1 for g in games), 30, "every game generated a turn")

        status, rollout = call(port, "POST", "/api/v1/rollouts", {
            "target_version": "1.1", "source_version": "1.0", "max_parallel": 3, "canary": 1, "canary_hold": 2,
            "failure_budget": 1})
        assert status == 201, rollout
        assert len(rollout["games"]) == 20 and rollout["games_by_state"]["waiting"] == 20
        rid = rollout["id"]
        # a second rollout over the same games is refused, naming the conflict
        status, body = call(port, "POST", "/api/v1/rollouts", {"target_version": "1.0", "game_ids": [games[5]]})
        assert status == 409 and games[5] in body["error"] and f"rollout {rid}" in body["error"], body

        def progress(p: int) -> dict:
            return call(p, "GET", f"/api/v1/rollouts/{rid}")[1]

        # The canary goes alone; the rest wait for its hold.
        first_view = wait_until(lambda: (v := progress(port))["games_by_state"]["in_progress"] >= 1 and v, 20,
                                "the canary starts")
        assert [g["canary"] for g in first_view["games"] if g["state"] == "in_progress"] == [True]
        # kill -9 of the leader in the middle of the rollout
        wait_until(lambda: progress(port)["games_by_state"]["done"] >= 5, 60, "five games done")
        before_kill = progress(port)["games_by_state"]
        procs[first][0].kill9()
        del procs[first]
        second = wait_until(leader, TTL + 10, "the standby takes over")
        port = procs[second][1]
        final = wait_until(lambda: (v := progress(port))["state"] == "completed" and v, 90, "the rollout completes")
        assert final["games_by_state"] == {"waiting": 0, "in_progress": 0, "done": 20, "failed": 0,
                                           "rolled_back": 0, "skipped": 0}, final
        assert before_kill["done"] < 20, before_kill  # the rollout finished after the failover
        watch.halt.set()
        watch.join()
        assert watch.went_down == []

        for g in games:
            view = call(port, "GET", f"/api/v1/runtimes/{g}")[1]
            assert view["current_image_ref"] == NEW and view["engine_version"] == "1.1", view
            assert view["status"] in ("running", "generation_in_progress"), view
            ev = events(state_root, g)
            assert not any(e.startswith("interrupted") for e, _ in ev), (g, ev)  # no generation was cut
            stops = [t for e, t in ev if e == "sigterm"]
            boots = [t for e, t in ev if e == "boot"]
            assert len(stops) == 1 and len(boots) == 2, (g, ev)  # taken down once, by its patch
            ops = [o for o in call(port, "GET", f"/api/v1/runtimes/{g}/operations")[1]["operations"]
                   if o["op"] == "patch"]
            assert len(ops) == 1 and ops[0]["status"] == "succeeded" and ops[0]["source"] == "admin", ops
            began = datetime.fromisoformat(ops[0]["created_at"]).replace(microsecond=0)
            ended = datetime.fromisoformat(ops[0]["finished_at"])
            # down from the old engine's SIGTERM to the new engine's boot: inside its own patch
            assert began <= stops[0] <= boots[1] <= ended, (g, ev, ops[0])
    finally:
        watch.halt.set()
        for ctl, _ in procs.values():
            ctl.stop()


def test_a_rollout_to_an_engine_that_never_answers_pauses_after_its_budget(rtm_env, tmp_path, unique):
    env = {**base_env(rtm_env), "RTMANAGER_START_TIMEOUT": "3"}
    migrate(env)
    games = [f"rm-{unique}-{n}" for n in range(4)]
    port = free_port()
    ctl = ControllerProcess({**env, "RTMANAGER_HTTP_PORT": str(port)}, tmp_path / "ctl.log").start()
    try:
        wait_until(lambda: leads(port), 20, "the controller leads")
        for version, image in (("1.0", OLD), ("mute", MUTE)):
            assert cli(env, "versions", "add", version, image).returncode == 0
        start_games(env, games, interval=None)
        out = cli(env, "rollout", "start", "--to", "mute", "--from", "1.0", "--max-parallel", "2",
                  "--failure-budget", "2", "--json")
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["id"]

        def view() -> dict:
            res = cli(env, "rollout", "status", str(rid), "--json")
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout)

        paused = wait_until(lambda: (v := view())["state"] == "paused" and v, 60, "the rollout pauses itself")
        assert paused["state_reason"].startswith("failure budget spent"), paused
        counts = paused["games_by_state"]
        # Two failures spend the budget; a slot the first one freed may have started a third patch.
        assert counts["rolled_back"] >= 2 and counts["waiting"] >= 1 and counts["done"] == 0, paused
        # Paused, the patch in flight still finishes and is recorded; no new one starts.
        settled = wait_until(lambda: (v := view())["games_by_state"]["in_progress"] == 0 and v, 20,
                             "the patch in flight is recorded")
        waiting = settled["games_by_state"]["waiting"]
        assert settled["games_by_state"]["rolled_back"] + waiting == 4, settled
        for g in settled["games"]:
            if g["state"] == "rolled_back":
                assert "engine_unhealthy" in g["reason"], g

        def all_on_old() -> bool:
            views = [call(port, "GET", f"/api/v1/runtimes/{g}")[1] for g in games]
            return all(v["current_image_ref"] == OLD and v["status"] == "running"
                       and v["generation"] == v["observed_generation"] for v in views)
        wait_until(all_on_old, 30, "every game runs on 1.0")
        time.sleep(1.5)  # paused: no new patch starts
        assert view()["games_by_state"]["waiting"] == waiting
        # Abort: the waiting games are skipped and the rollout ends.
        status, body = call(port, "POST", f"/api/v1/rollouts/{rid}/abort")
        assert status == 200 and body["state"] == "aborted", body
        ended = wait_until(lambda: (v := view())["finished_at"] and v, 10, "the aborted rollout is finished")
        assert ended["games_by_state"]["skipped"] == waiting
        assert call(port, "POST", f"/api/v1/rollouts/{rid}/resume")[0] == 409
        assert all_on_old()
    finally:
        assert ctl.stop() == 0, ctl.log()[-3000:]
