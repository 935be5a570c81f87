"""Leader election with two real ``rtmanager run`` processes: kill -9 and SIGSTOP / SIGCONT of the leader."""

from __future__ import annotations

import functools
import json
import signal
import time
import urllib.request

import redis

from tests.support import ControllerProcess, ResultReader, eventually_sync, free_port, migrate

TTL = 2.0


def leads(port: int) -> bool | None:
    """True / False from /readyz, None when the process does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as resp:
            return json.load(resp)["leader"]
    except Exception:  # noqa: BLE001 - not answering (paused, dead, starting)
        return None


wait_until = functools.partial(eventually_sync, interval=0.2)


def test_one_leader_and_take_over_on_kill_and_on_pause(rtm_env, tmp_path, docker_client, unique):
    migrate(rtm_env)
    base = {**rtm_env, "RTMANAGER_LEASE_TTL": str(TTL)}
    procs: dict[str, tuple[ControllerProcess, int]] = {}

    def spawn(name: str) -> None:
        port = free_port()
        env = {**base, "RTMANAGER_HTTP_PORT": str(port), "RTMANAGER_CONSUMER_NAME": f"replica-{name}"}
        procs[name] = (ControllerProcess(env, tmp_path / f"{name}.log").start(), port)

    def leaders() -> list[str]:
        return [n for n, (_, port) in procs.items() if leads(port)]

    r = redis.Redis.from_url(rtm_env["RTMANAGER_REDIS_URL"], decode_responses=True)
    results = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])

    def start_game(game: str) -> dict[str, str]:
        entry = r.xadd(rtm_env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": "galaxy/engine-stub:1.0"})
        return results.for_entry(entry, timeout=30)

    try:
        spawn("a")
        spawn("b")
        first = wait_until(lambda: leaders() if len(leaders()) == 1 else None, 15, "exactly one leader")[0]
        time.sleep(TTL)  # the standby keeps standing by
        assert leaders() == [first]
        assert start_game(f"lead-{unique}-1")["outcome"] == "success"

        # kill -9 of the leader: the standby takes over within about the TTL.
        killed_at = time.monotonic()
        procs[first][0].kill9()
        del procs[first]
        second = wait_until(lambda: leaders()[0] if leaders() else None, TTL + 5, "take-over after kill -9")
        assert time.monotonic() - killed_at < TTL + 5
        assert start_game(f"lead-{unique}-2")["outcome"] == "success"

        # SIGSTOP of the leader: a new standby takes over; woken with SIGCONT, the old leader
        # finds its term over, steps down without writing, and stands by (it does not exit).
        spawn("c")
        time.sleep(1)
        paused, _ = procs[second]
        paused.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: leads(procs["c"][1]), TTL + 6, "take-over after SIGSTOP")
        assert start_game(f"lead-{unique}-3")["outcome"] == "success"
        paused.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "lost leadership" in paused.log(), 15, "the woken leader steps down")
        assert paused.proc.poll() is None, paused.log()[-2000:]
        time.sleep(TTL)
        assert leaders() == ["c"]  # one leader; the woken one stands by
        assert leads(procs[second][1]) is False
        for i in (1, 2, 3):
            label = f"com.galaxy.game-id=lead-{unique}-{i}"
            containers = docker_client.containers.list(all=True, filters={"label": label})
            assert len(containers) == 1 and containers[0].status == "running"
    finally:
        for ctl, _ in procs.values():
            if ctl.proc.poll() is None:
                ctl.proc.send_signal(signal.SIGCONT)
            ctl.stop()
        r.close()
        results.close()
