"""The local operator commands (``rtmanager adopt``, ``dispose``, ``status``) against real Postgres and
Docker: red-team findings on what an operator's command may touch.

* ``adopt`` of a container whose image is no longer allowed made a record the controller then confirmed
  running as it was: an image nobody allows ran on.
* ``adopt --all`` stopped at the first container labelled with an id that is no game id.
* Pointed at another instance's database, ``dispose`` found every unit of this instance unowned and
  removed live games; a unit another database created is not provably unowned either.
* ``dispose`` of several games listed the unowned units once, then stopped them one after the other: a
  game given a record meanwhile (a start, an adoption) was removed all the same."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from controller.cli.local import adopt, dispose, status
from controller.config import Settings
from desired.db.store import Store
from tests.support import eventually

STUB = "galaxy/engine-stub:1.0"


def settings_of(env: dict[str, str], **over: str) -> Settings:
    return Settings.from_env({**env, "RTMANAGER_ENGINE_USER": f"{os.getuid()}:{os.getgid()}",
                              **{f"RTMANAGER_{k.upper()}": v for k, v in over.items()}})


def unit(docker_client, settings: Settings, game: str, *, database: str = "", sleeper: bool = False,
         epoch: int = 0, spec_hash: str = ""):
    """A container of this instance for ``game`` with no record, its state directory mounted as a
    controller would mount it; ``sleeper``: PID 1 is ``sleep``, which SIGTERM does not end."""
    state = settings.record_defaults.state_path(game)
    os.makedirs(state, exist_ok=True)
    labels = {"com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": settings.leadership.instance,
              "com.galaxy.game-id": game}
    if database:
        labels["com.galaxy.database"] = database
    if epoch:
        labels["com.galaxy.epoch"] = str(epoch)
    if spec_hash:
        labels["com.galaxy.spec-hash"] = spec_hash
    extra = {"entrypoint": ["/bin/sleep"], "command": ["60"]} if sleeper else {}
    return docker_client.containers.run(STUB, name=f"galaxy-game-{game}", labels=labels, detach=True,
                                        network_mode="none",
                                        volumes={state: {"bind": settings.engine.engine_state_dir, "mode": "rw"}},
                                        **extra)


async def claimed(pool, settings: Settings) -> str:
    return (await Store(pool).claim_identity(settings.leadership.instance)).uid


async def test_adopt_refuses_a_unit_whose_image_is_no_longer_allowed(rtm_env, docker_client, pool, capsys):
    settings = settings_of(rtm_env)
    c = unit(docker_client, settings, "banned-1")
    assert await adopt(settings_of(rtm_env, image_allowlist="galaxy/engine-stub:2.*"), ["banned-1"], False) == 1
    assert "not allowed" in capsys.readouterr().err
    assert await Store(pool).find("banned-1") is None
    c.reload()
    assert c.status == "running"


async def test_adopt_all_goes_past_a_unit_labelled_with_no_game_id(rtm_env, docker_client, pool, capsys):
    settings = settings_of(rtm_env)
    await claimed(pool, settings)
    unit(docker_client, settings, "good-1")
    docker_client.containers.run(STUB, name=f"odd-{settings.leadership.instance}", detach=True,
                                 network_mode="none", labels={
        "com.galaxy.managed-by": "rtmanager", "com.galaxy.instance": settings.leadership.instance,
        "com.galaxy.game-id": "Bad_Id"})
    assert await adopt(settings, [], True) == 1
    assert "'Bad_Id'" in capsys.readouterr().err
    assert (await Store(pool).get("good-1")).desired_image_ref == STUB
    # red-team, stop 44: the adoption's operation names the local user, as every change of the command does
    from controller.access import cli_actor
    [op] = await Store(pool).operations("good-1")
    assert op.actor == cli_actor() and op.params.get("event") == "adopt"


@pytest.mark.parametrize("command", ["status", "adopt", "dispose"])
async def test_a_database_of_another_instance_is_refused(rtm_env, docker_client, pool, capsys, command):
    settings = settings_of(rtm_env)
    await Store(pool).claim_identity("somebody-else")
    c = unit(docker_client, settings, "live-1")
    run = {"status": lambda: status(settings), "adopt": lambda: adopt(settings, ["live-1"], False),
           "dispose": lambda: dispose(settings, ["live-1"])}[command]
    assert await run() == 1
    assert "belongs to instance 'somebody-else'" in capsys.readouterr().err
    c.reload()
    assert c.status == "running"
    assert await Store(pool).find("live-1") is None


async def test_dispose_leaves_a_unit_another_database_created_unless_told(rtm_env, docker_client, pool, capsys):
    settings = settings_of(rtm_env)
    await claimed(pool, settings)
    c = unit(docker_client, settings, "foreign-1", database="00000000-0000-0000-0000-000000000001")
    assert await dispose(settings, ["foreign-1"]) == 1
    assert "another database" in capsys.readouterr().err
    c.reload()
    assert c.status == "running"
    assert await dispose(settings, ["foreign-1"], other_database=True) == 0
    assert not docker_client.containers.list(all=True, filters={"id": c.id})


async def test_dispose_looks_again_before_each_removal(rtm_env, docker_client, pool):
    settings = settings_of(rtm_env)
    uid = await claimed(pool, settings)
    slow = unit(docker_client, settings, "slow-1", database=uid, sleeper=True)  # its stop takes the grace (2 s)
    kept = unit(docker_client, settings, "kept-1", database=uid)
    since = int(time.time()) - 1
    task = asyncio.create_task(dispose(settings, ["slow-1", "kept-1"]))

    def signalled() -> bool:  # the first removal under way: its SIGTERM sent, the grace running
        return any(True for _ in docker_client.events(since=since, until=int(time.time()) + 1, decode=True,
                                                      filters={"container": slow.id, "event": "kill"}))

    await eventually(signalled, what="the first removal under way")
    assert not task.done()
    # Meanwhile the second game is given a record (an operator's adoption; a start job would do the same).
    await Store(pool).adopt("kept-1", STUB, settings.record_defaults, container_id=kept.id)
    assert await task == 1
    assert not docker_client.containers.list(all=True, filters={"id": slow.id})
    kept.reload()
    assert kept.status == "running"


async def test_migrate_says_when_the_schema_is_newer_than_itself(rtm_env, pool, capsys):
    """Review: ``rtmanager migrate`` against a schema a newer rtmanager migrated said "schema is up to date"
    and exited 0, while ``rtmanager run`` refuses that schema."""
    from controller.cli.local import migrate

    await pool.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', "
                       "'9999_from_the_future.sql', 'x')")
    assert await migrate(settings_of(rtm_env)) == 1
    err = capsys.readouterr().err
    assert "newer than this rtmanager" in err and "9999_from_the_future.sql" in err


async def test_dispose_gives_the_engine_its_versions_grace(rtm_env, docker_client, pool):
    """Red-team, stop 43: dispose stopped every unit with RTMANAGER_STOP_GRACE, overriding the grace its
    engine version registered (the create sets it as the container's own). An engine that needs 120 s to
    save was killed after 10, its state directory left half-written."""
    from desired import versions
    settings = settings_of(rtm_env)  # RTMANAGER_STOP_GRACE=2
    uid = await claimed(pool, settings)
    await Store(pool).create_version("1.0-slow-save", STUB, versions.VersionStatus.ACTIVE, "", stop_grace=6)
    slow = unit(docker_client, settings, "saves-1", database=uid, sleeper=True)  # SIGTERM does not end it
    t0 = time.monotonic()
    assert await dispose(settings, ["saves-1"]) == 0
    assert time.monotonic() - t0 >= 5.5  # the version's 6 s, not the global 2 s
    assert not docker_client.containers.list(all=True, filters={"id": slow.id})


async def test_dispose_leaves_a_unit_of_a_later_term_than_the_database_knows_unless_told(rtm_env, docker_client,
                                                                                        pool, capsys):
    """Red-team, stop 44: a unit labelled with this database but a later leadership term than the database knows
    was made after the backup the database was restored from: most likely a live game whose record the restore
    lost (``adopt`` keeps it). ``dispose`` stopped it mid-game without a word. It is left, saying why, unless
    --after-restore is given."""
    settings = settings_of(rtm_env)
    uid = await claimed(pool, settings)
    c = unit(docker_client, settings, "later-1", database=uid, epoch=7)  # the database knows no term yet
    assert await dispose(settings, ["later-1"]) == 1
    err = capsys.readouterr().err
    assert "later" in err and "adopt" in err and "--after-restore" in err
    c.reload()
    assert c.status == "running"
    assert await dispose(settings, ["later-1"], after_restore=True) == 0
    assert not docker_client.containers.list(all=True, filters={"id": c.id})


async def test_the_local_undrain_refuses_a_number_while_a_node_is_drained(rtm_env, pool, capsys):
    """Review, stop 44: the local `rtmanager undrain`, which does not know the nodes' hostnames, took any number
    for a drain id: with node 123 drained, `undrain 123` ended drain 123 (the host's, say). A number is
    refused while any node is drained, unless --id or --node says which."""
    import argparse

    from controller.cli.drains import drains
    from desired.drains import DrainRequest
    from desired.model import OpSource

    settings = settings_of(rtm_env)
    store = Store(pool)
    node = await store.create_drain(DrainRequest(node="k3x9abc", state_shared=True), OpSource.ADMIN)
    host = await store.create_drain(DrainRequest(node=None), OpSource.ADMIN)

    def undrain(target: str, **flags: bool) -> argparse.Namespace:
        return argparse.Namespace(command="undrain", target=target, host=False, node=flags.get("node", False),
                                  id=flags.get("id", False))

    assert await drains(settings, undrain(str(host.id))) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert (await store.get_drain(host.id))[0].status.value == "draining"
    assert await drains(settings, undrain(str(host.id), id=True)) == 0
    assert (await store.get_drain(host.id))[0].status.value != "draining"
    assert await drains(settings, undrain("k3x9abc", node=True)) == 0
    assert (await store.get_drain(node.id))[0].status.value != "draining"


async def test_adopt_keeps_the_unit_it_adopts_at_the_spec_revision_it_was_made_at(rtm_env, docker_client, pool,
                                                                                    capsys):
    """Red-team, stop 45: an adopted record was written at spec revision 0, so a unit made after a restart or
    a move (revision 1 or more) was not the unit the record asked for: the controller replaced it at once,
    with no image to roll back to (and, on a Swarm, unpinned: on another node, on an empty directory). The
    adoption now finds the revision the unit's spec hash was made at; a unit made from other settings is
    adopted and said to be replaced."""
    from controller.cli.local import adopted_revision
    from controller.spec import Specs

    settings = settings_of(rtm_env)
    await claimed(pool, settings)
    made_at = 3
    template = await _template(settings, "rev-1")
    want = Specs(settings).want_hash(template.replace(spec_revision=made_at))
    assert want and adopted_revision(settings, "rev-1", STUB, want) == made_at
    unit(docker_client, settings, "rev-1", spec_hash=want)
    unit(docker_client, settings, "rev-2", spec_hash="0123456789abcdef")
    assert await adopt(settings, ["rev-1", "rev-2"], False) == 0
    out, err = capsys.readouterr()
    kept = await Store(pool).get("rev-1")
    assert kept.spec_revision == made_at and Specs(settings).want_hash(kept) == want
    assert "rev-1" not in err and "schedule rev-1" in out
    other = await Store(pool).get("rev-2")
    assert other.spec_revision == 0 and "rev-2: its unit was not made from this controller's settings" in err


async def _template(settings: Settings, game: str):
    from datetime import UTC, datetime

    from desired.model import DesiredStatus, RuntimeRecord, Status
    now = datetime.now(UTC)
    d = settings.record_defaults
    return RuntimeRecord(game_id=game, status=Status.STARTING, current_container_id=None, current_image_ref=None,
                         engine_endpoint=d.endpoint(game), state_path=d.state_path(game),
                         docker_network=d.docker_network, started_at=None, stopped_at=None, removed_at=None,
                         last_op_at=now, created_at=now, desired_status=DesiredStatus.RUNNING,
                         desired_image_ref=STUB, generation=1, observed_generation=0)
