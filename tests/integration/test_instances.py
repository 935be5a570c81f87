"""Two independent instances side by side on one Docker host (issue 25): each its own
RTMANAGER_INSTANCE, database, streams and state root, both on one engine network. Neither ever
stops, removes, restarts, adopts or counts the other's units, networks or state directories.

Unit names are the contract's (``galaxy-game-{game_id}``, the engine's hostname and endpoint), so
two instances can never both run one game id on a host; Lobby assigns ids, unique across the
platform. An instance asked for an id another instance runs refuses it, before any side effect."""

from __future__ import annotations

from pathlib import Path

import pytest

from desired.db.store import Store
from desired.model import Status
from desired.values import WrongInstance
from tests.support import Harness, eventually, settled

FAST = dict(resync_interval="0.5", cleanup_ttl="1", orphan_grace="1")


def _units(docker_client, env, game):
    return docker_client.containers.list(all=True, filters={"label": [
        f"com.galaxy.instance={env['RTMANAGER_INSTANCE']}", f"com.galaxy.game-id={game}"]})


def _resyncs(ctl) -> float:
    return ctl.metrics.resyncs.labels("ok")._value.get()


async def _record(store: Store, game: str, *, status: Status, crashes: int = 0):
    rec = await store.find(game)
    if rec and rec.status is status and rec.converged and rec.crash_count >= crashes:
        return rec
    return None


def _games(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


class Store_:
    """A pool and a Store on one instance's database."""

    def __init__(self, env: dict[str, str]) -> None:
        self.url = env["RTMANAGER_DATABASE_URL"]
        self.pool = None

    async def open(self) -> Store:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4)
        self.s = Store(self.pool)
        return self.s

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


async def _past_the_orphan_grace(ctl_a, ctl_b) -> None:
    """Three resyncs of each (every 0.5 s, an orphan grace of 1 s): neither counts a unit as unowned."""
    seen_a, seen_b = _resyncs(ctl_a), _resyncs(ctl_b)
    await eventually(lambda: _resyncs(ctl_a) >= seen_a + 3 and _resyncs(ctl_b) >= seen_b + 3,
                     what="three resyncs each")
    assert (ctl_a.resync.unowned, ctl_b.resync.unowned) == (0, 0)
    assert not ctl_a.reconciler.unowned and not ctl_b.reconciler.unowned


async def test_two_instances_on_one_host_never_touch_each_others_units(rtm_env, other_env, docker_client, unique):
    a, b = Harness(rtm_env, docker_client), Harness(other_env, docker_client)
    sa, sb = Store_(rtm_env), Store_(other_env)
    game_a, game_b = f"a-{unique}", f"b-{unique}"
    try:
        store_a, store_b = await sa.open(), await sb.open()
        ctl_a, ctl_b = await a.start(**FAST), await b.start(**FAST)
        res_a = await a.result(await a.submit_start(game_a))
        res_b = await b.result(await b.submit_start(game_b))
        assert (res_a["outcome"], res_b["outcome"]) == ("success", "success"), (res_a, res_b)
        [unit_a], [unit_b] = _units(docker_client, rtm_env, game_a), _units(docker_client, other_env, game_b)
        assert (unit_a.name, unit_b.name) == (f"galaxy-game-{game_a}", f"galaxy-game-{game_b}")  # the contract's
        assert res_b["engine_endpoint"] == f"http://galaxy-game-{game_b}:8080"
        network = rtm_env["RTMANAGER_DOCKER_NETWORK"]
        assert {n for n in unit_a.attrs["NetworkSettings"]["Networks"]} == {network}
        assert {n for n in unit_b.attrs["NetworkSettings"]["Networks"]} == {network}
        await _past_the_orphan_grace(ctl_a, ctl_b)
        assert await store_a.find(game_b) is None and await store_b.find(game_a) is None  # nobody adopted

        # A kill of A's engine: A starts it again; B does nothing (its engine runs on, the same one).
        started_b = unit_b.attrs["State"]["StartedAt"]
        unit_a.kill()
        await eventually(lambda: _record(store_a, game_a, status=Status.RUNNING, crashes=1), timeout=10,
                         what="A's engine started again")
        await settled(ctl_b, horizon=1.0)
        unit_b.reload()
        assert unit_b.status == "running" and unit_b.attrs["State"]["StartedAt"] == started_b
        assert (await store_b.get(game_b)).crash_count == 0 and await store_b.find(game_a) is None

        # B stops its game, its cleanup TTL removes the unit: A's engine runs on.
        [unit_a] = _units(docker_client, rtm_env, game_a)
        started_a = unit_a.attrs["State"]["StartedAt"]
        assert (await b.result(await b.submit_stop(game_b), job="stop"))["outcome"] == "success"
        await eventually(lambda: _record(store_b, game_b, status=Status.REMOVED), timeout=10, what="B's unit removed")
        assert _units(docker_client, other_env, game_b) == []
        await _past_the_orphan_grace(ctl_a, ctl_b)
        await settled(ctl_a, horizon=1.0)
        [unit_a] = _units(docker_client, rtm_env, game_a)
        assert unit_a.status == "running" and unit_a.attrs["State"]["StartedAt"] == started_a
        assert (await store_a.get(game_a)).status is Status.RUNNING
        # Each state root holds its own games' directories only, and is claimed for its instance.
        for env, games in ((rtm_env, [game_a]), (other_env, [game_b])):
            root = Path(env["RTMANAGER_STATE_ROOT"])
            assert _games(root) == games
            assert (root / ".rtmanager-instance").read_text() == env["RTMANAGER_INSTANCE"] + "\n"
    finally:
        for h in (a, b):
            await h.stop_all()
            await h.redis.aclose()
        await sa.close()
        await sb.close()


async def test_a_game_id_another_instance_runs_is_refused_before_any_side_effect(rtm_env, other_env, docker_client,
                                                                                 unique):
    """Lobby assigns game ids, unique across instances: B asked for A's game is a mistake. B answers
    container_start_failed naming A, and has made nothing: no state directory, no network change;
    A's unit runs on untouched, and B's resyncs never count it, nor does B's stop of the game touch it."""
    a, b = Harness(rtm_env, docker_client), Harness(other_env, docker_client)
    sa, sb = Store_(rtm_env), Store_(other_env)
    game = f"g1-{unique}"
    network = rtm_env["RTMANAGER_DOCKER_NETWORK"]
    try:
        store_a, store_b = await sa.open(), await sb.open()
        ctl_a, ctl_b = await a.start(**FAST), await b.start(**FAST)
        assert (await a.result(await a.submit_start(game)))["outcome"] == "success"
        [unit_a] = _units(docker_client, rtm_env, game)
        before = unit_a.attrs["State"]["StartedAt"], docker_client.networks.get(network).attrs["Containers"].keys()

        res = await b.result(await b.submit_start(game))
        assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed", res
        assert f"instance {rtm_env['RTMANAGER_INSTANCE']}" in res["error_message"], res
        assert f"galaxy-game-{game}" in res["error_message"], res
        assert not Path(other_env["RTMANAGER_STATE_ROOT"], game).exists()
        assert _units(docker_client, other_env, game) == []
        await _past_the_orphan_grace(ctl_a, ctl_b)
        await settled(ctl_b, horizon=1.0)
        # B's stop of the game converges without touching A's unit.
        assert (await b.result(await b.submit_stop(game), job="stop"))["outcome"] == "success"
        await _past_the_orphan_grace(ctl_a, ctl_b)
        await settled(ctl_b, horizon=1.0)
        unit_a.reload()
        assert unit_a.status == "running"
        assert (unit_a.attrs["State"]["StartedAt"],
                docker_client.networks.get(network).attrs["Containers"].keys()) == before
        rec_a = await store_a.get(game)
        assert rec_a.status is Status.RUNNING and rec_a.crash_count == 0 and rec_a.current_container_id == unit_a.id
        assert not Path(other_env["RTMANAGER_STATE_ROOT"], game).exists()
        assert (await store_b.get(game)).current_container_id is None
    finally:
        for h in (a, b):
            await h.stop_all()
            await h.redis.aclose()
        await sa.close()
        await sb.close()


async def test_an_instance_refuses_a_state_root_another_instance_uses(rtm_env, other_env, docker_client):
    """Two instances on one state root would share one directory for a game id: the second instance
    does not start (its engines would run on the other's saves, its removals would delete them)."""
    a = Harness(rtm_env, docker_client)
    b = Harness({**other_env, "RTMANAGER_STATE_ROOT": rtm_env["RTMANAGER_STATE_ROOT"]}, docker_client)
    try:
        await a.start()
        with pytest.raises(WrongInstance, match=f"state root .* instance {rtm_env['RTMANAGER_INSTANCE']}"):
            await b.start()
        assert not b.running
    finally:
        for h in (a, b):
            await h.stop_all()
            await h.redis.aclose()
