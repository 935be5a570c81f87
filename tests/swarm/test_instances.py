"""Two independent instances on one swarm (issue 25): each its own RTMANAGER_INSTANCE, database,
streams and state root, one engine network. A kill, a stop and a cleanup in one leave the other's
service alone, neither counts the other's services as its own, and a game id one instance runs is
refused by the other before it makes anything (no state directory, no helper, no service)."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from desired.db.store import Store
from desired.model import Status
from tests.support import Harness, eventually, settled


def _swarm(env: dict[str, str]) -> dict[str, str]:
    Path(env["RTMANAGER_STATE_ROOT"]).mkdir(parents=True, exist_ok=True)  # Swarm does not make a bind source
    return {**env, "RTMANAGER_BACKEND": "swarm", "RTMANAGER_PROBE_ADDRESS": "published",
            "RTMANAGER_HEALTH_INTERVAL": "1", "RTMANAGER_RESYNC_INTERVAL": "0.5", "RTMANAGER_ORPHAN_GRACE": "1",
            "RTMANAGER_CLEANUP_TTL": "1"}


def _services(client, env: dict[str, str], game: str) -> list[dict]:
    return client.api.services(filters={"label": [f"com.galaxy.instance={env['RTMANAGER_INSTANCE']}",
                                                  f"com.galaxy.game-id={game}"]})


def _running_task(client, svc: dict) -> dict | None:
    tasks = [t for t in client.api.tasks(filters={"service": svc["ID"]}) if t["Status"]["State"] == "running"]
    return tasks[0] if len(tasks) == 1 else None


def _resyncs(ctl) -> float:
    return ctl.metrics.resyncs.labels("ok")._value.get()


async def _past_the_orphan_grace(ctl_a, ctl_b) -> None:
    seen_a, seen_b = _resyncs(ctl_a), _resyncs(ctl_b)
    await eventually(lambda: _resyncs(ctl_a) >= seen_a + 3 and _resyncs(ctl_b) >= seen_b + 3,
                     what="three resyncs each, past the orphan grace")
    assert (ctl_a.resync.unowned, ctl_b.resync.unowned) == (0, 0)
    assert not ctl_a.reconciler.unowned and not ctl_b.reconciler.unowned


async def test_two_instances_share_a_swarm(swarm1, rtm_env, other_env, docker_client, monkeypatch, unique):
    monkeypatch.setenv("DOCKER_HOST", swarm1.manager.host)  # the backend's client follows DOCKER_HOST
    env_a, env_b = _swarm(rtm_env), _swarm(other_env)
    a, b = Harness(env_a, docker_client), Harness(env_b, docker_client)
    client = swarm1.manager_client()
    node = swarm1.manager.client()
    pool_a = await asyncpg.create_pool(env_a["RTMANAGER_DATABASE_URL"], min_size=1, max_size=2)
    pool_b = await asyncpg.create_pool(env_b["RTMANAGER_DATABASE_URL"], min_size=1, max_size=2)
    store_a, store_b = Store(pool_a), Store(pool_b)
    game_a, game_b = f"a-{unique}", f"b-{unique}"
    try:
        ctl_a, ctl_b = await a.start(), await b.start()
        res_a = await a.result(await a.submit_start(game_a))
        res_b = await b.result(await b.submit_start(game_b))
        assert (res_a["outcome"], res_b["outcome"]) == ("success", "success"), (res_a, res_b)
        [svc_a], [svc_b] = _services(client, env_a, game_a), _services(client, env_b, game_b)
        assert (svc_a["Spec"]["Name"], svc_b["Spec"]["Name"]) == (f"galaxy-game-{game_a}", f"galaxy-game-{game_b}")
        assert res_b["engine_endpoint"] == f"http://galaxy-game-{game_b}:8080"
        task_b = _running_task(client, svc_b)
        assert task_b is not None

        # B asked for A's game id: refused naming A, before B made anything for it.
        res = await b.result(await b.submit_start(game_a))
        assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed", res
        assert f"instance {env_a['RTMANAGER_INSTANCE']}" in res["error_message"], res
        assert not Path(env_b["RTMANAGER_STATE_ROOT"], game_a).exists()  # no helper ran for it
        assert _services(client, env_b, game_a) == []

        # A's engine killed: A starts it again; B's task runs on, the same task.
        [engine_a] = node.containers.list(filters={"label": [f"com.galaxy.instance={env_a['RTMANAGER_INSTANCE']}",
                                                             f"com.galaxy.game-id={game_a}"]})
        engine_a.kill()

        async def back():
            rec = await store_a.find(game_a)
            return rec if rec and rec.crash_count >= 1 and rec.status is Status.RUNNING and rec.converged else None

        await eventually(back, timeout=20, what="A's engine started again")
        assert (_running_task(client, svc_b) or {}).get("ID") == task_b["ID"]
        assert (await store_b.get(game_b)).crash_count == 0
        task_a = _running_task(client, svc_a)
        assert task_a is not None

        # B stops its games, its cleanup TTL removes its service: A's engine runs on, the same task.
        assert (await b.result(await b.submit_stop(game_b), job="stop"))["outcome"] == "success"
        assert (await b.result(await b.submit_stop(game_a), job="stop"))["outcome"] == "success"

        async def b_removed():
            rec = await store_b.find(game_b)
            return rec is not None and rec.status is Status.REMOVED and not _services(client, env_b, game_b)

        await eventually(b_removed, timeout=15, what="B's service removed")
        await _past_the_orphan_grace(ctl_a, ctl_b)
        await settled(ctl_a, horizon=1.0)
        assert (_running_task(client, svc_a) or {}).get("ID") == task_a["ID"]
        rec_a = await store_a.get(game_a)
        assert rec_a.status is Status.RUNNING and rec_a.current_container_id == svc_a["ID"]
        assert await store_a.find(game_b) is None
    finally:
        for h in (a, b):
            await h.stop_all()
            await h.redis.aclose()
        await pool_a.close()
        await pool_b.close()
        for env in (env_a, env_b):
            for svc in client.api.services(filters={"label": f"com.galaxy.instance={env['RTMANAGER_INSTANCE']}"}):
                client.api.remove_service(svc["ID"])
        labels = [f"com.galaxy.instance={e['RTMANAGER_INSTANCE']}" for e in (env_a, env_b)]
        await eventually(lambda: not any(client.api.tasks(filters={"label": label}) for label in labels),
                         timeout=20, what="the engines gone")
        for n in client.networks.list(names=[env_a["RTMANAGER_DOCKER_NETWORK"]]):
            n.remove()
        node.close()
        client.close()
