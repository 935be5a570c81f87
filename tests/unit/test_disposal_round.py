"""The storage round's disposal of removed games' state directories looks at a page of candidates a round,
oldest first. Candidates it cannot dispose of (a restore that cannot be finished, an archive refused) stayed
the oldest: a page of them kept every later removed game's directory on disk for ever."""

from __future__ import annotations

import dataclasses

from controller import storage as storage_module
from controller.metrics import Metrics
from controller.storage import StorageRound
from desired.model import JobKind
from observed import statedir
from observed.errors import Refused
from tests.support.world import World, started


async def removed_games(w: World, games: list[str]) -> None:
    for game in games:
        await started(w, game)
        await w.job(JobKind.STOP, game)
        await w.sync(game)
        await w.job(JobKind.CLEANUP, game)
        rec = await w.sync(game)
        assert rec.status.value == "removed"
        w.store.clock.advance(1)  # each removed a second after the one before


async def test_candidates_that_cannot_be_disposed_of_do_not_hold_back_the_others(tmp_path, monkeypatch):
    w = World(tmp_path)
    stuck, free = ["g1", "g2", "g3"], ["g4", "g5"]
    await removed_games(w, stuck + free)
    monkeypatch.setattr(storage_module, "DISPOSE_BATCH", 3)
    real_dispose = statedir.dispose

    def dispose(root, state_path, archive, name):
        if name.split("-")[0] in stuck:
            raise Refused("the archive refuses it")
        return real_dispose(root, state_path, archive, name)

    monkeypatch.setattr(statedir, "dispose", dispose)
    config = dataclasses.replace(w.settings.storage, state_archive_dir=str(tmp_path / "archive"))
    storage_round = StorageRound(config=config, store=w.store, backend=w.backend, reconciler=w.reconciler,
                                 keeper=w.reconciler.states, metrics=Metrics())
    w.store.clock.advance(config.state_retention + 60)
    for _ in range(3):
        w.reconciler.dispose_budget = 10
        await storage_round.dispose_removed()
    assert set(w.store.disposed) == set(free)
    # the refused ones are looked at again (round robin), not forgotten: once the archive takes them, they go
    monkeypatch.setattr(statedir, "dispose", real_dispose)
    for _ in range(3):
        w.reconciler.dispose_budget = 10
        await storage_round.dispose_removed()
    assert set(w.store.disposed) == set(stuck + free)


async def test_a_spent_budget_does_not_skip_the_candidate_it_stopped_at(tmp_path, monkeypatch):
    w = World(tmp_path)
    games = ["g1", "g2", "g3", "g4"]
    await removed_games(w, games)
    monkeypatch.setattr(storage_module, "DISPOSE_BATCH", 3)
    storage_round = StorageRound(config=w.settings.storage, store=w.store, backend=w.backend,
                                 reconciler=w.reconciler, keeper=w.reconciler.states, metrics=Metrics())
    w.store.clock.advance(w.settings.storage.state_retention + 60)
    for done in (["g1"], ["g1", "g2"], ["g1", "g2", "g3"], games):
        w.reconciler.dispose_budget = 1
        await storage_round.dispose_removed()
        assert sorted(w.store.disposed) == done


async def test_a_game_another_process_works_on_is_passed_over_for_now(tmp_path, monkeypatch):
    """A removed game whose directory another process holds (a replica that lost its leadership, its
    archive still running) is passed over without spending a removal, and the round goes on."""
    from observed.errors import StateBusy

    w = World(tmp_path)
    await removed_games(w, ["g1", "g2"])
    real_dispose = statedir.dispose
    busy = {"g1"}

    def dispose(root, state_path, archive, name):
        if name.split("-")[0] in busy:
            raise StateBusy("the state directory of g1 is busy")
        return real_dispose(root, state_path, archive, name)

    monkeypatch.setattr(statedir, "dispose", dispose)
    storage_round = StorageRound(config=w.settings.storage, store=w.store, backend=w.backend,
                                 reconciler=w.reconciler, keeper=w.reconciler.states, metrics=Metrics())
    w.store.clock.advance(w.settings.storage.state_retention + 60)
    w.reconciler.dispose_budget = 2
    await storage_round.dispose_removed()
    assert w.store.disposed == {"g2"} and w.reconciler.dispose_budget == 1
    busy.clear()
    await storage_round.dispose_removed()
    assert w.store.disposed == {"g1", "g2"}
