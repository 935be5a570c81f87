"""The engine admin token: new with each unit, recorded before the unit is created, carried by every
admin call of that unit, and shown nowhere (repr, REST answers, snapshots, labels, logs)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from aiohttp import web

from controller.http import record_json
from controller.spec import build_spec
from desired import snapshots
from desired.model import ErrorCode, JobKind, Status
from observed.engine import EngineClient
from observed.errors import EngineRefused
from observed.model import ADMIN_TOKEN_ENV, from_inspect
from tests.fakes import FakeContainer
from tests.support.world import IMG, IMG2, World

GAME = "g1"


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


async def _started(w):
    await w.job(JobKind.START, GAME, IMG)
    rec = await w.sync(GAME)
    assert rec.status is Status.RUNNING and rec.converged
    return rec


async def test_each_unit_gets_a_new_token_recorded_before_it_is_created_and_sent_with_every_admin_call(w):
    seen: list[tuple[str, str]] = []
    real_create = w.backend.create

    async def create(spec):
        seen.append((spec.admin_token, w.store.records[GAME].admin_token))  # recorded before the create
        return await real_create(spec)

    w.backend.create = create  # type: ignore[method-assign]
    rec = await _started(w)
    first = w.backend.containers[rec.current_container_id]
    assert rec.admin_token and len(rec.admin_token) >= 32
    assert first.admin_token == rec.admin_token and seen == [(rec.admin_token, rec.admin_token)]
    assert all(rec.admin_token not in v for v in first.labels.values())
    assert w.engine.tokens and set(w.engine.tokens) == {rec.admin_token}

    await w.job(JobKind.RESTART, GAME)  # a new unit: a new token
    rec2 = await w.sync(GAME)
    second = w.backend.containers[rec2.current_container_id]
    assert second.admin_token == rec2.admin_token and rec2.admin_token not in (rec.admin_token, "")
    calls = len(w.backend.calls)
    await w.sync(GAME)  # the token is not part of what the plan compares: nothing to recreate
    assert [c[0] for c in w.backend.calls[calls:]] == ["inspect"]
    await w.job(JobKind.FORCE_NEXT_TURN, GAME)
    await w.sync(GAME)
    await w.sync(GAME)
    assert w.results(GAME)[-1] == ("force_next_turn", "success", "")
    assert w.engine.tokens[-1] == rec2.admin_token


def test_the_spec_hash_does_not_include_the_token(w):
    rec = _record(w)
    a = build_spec(w.settings, rec)
    assert a.spec_hash == build_spec(w.settings, rec.replace(admin_token="x" * 43)).spec_hash
    import dataclasses
    b = dataclasses.replace(a, admin_token="secret-token-value")
    assert b.spec_hash == a.spec_hash and b.engine_env()[ADMIN_TOKEN_ENV] == "secret-token-value"
    assert ADMIN_TOKEN_ENV not in a.engine_env()
    assert "secret-token-value" not in repr(b) and "secret-token-value" not in str(b.all_labels())


async def test_a_unit_an_earlier_attempt_created_is_adopted_with_the_token_it_carries(w):
    """The name was taken when this attempt created (an earlier create went through after its caller
    gave up): the unit runs with the earlier token, which is what must be recorded."""
    await w.job(JobKind.START, GAME, IMG)
    rec = w.store.records[GAME]
    spec = build_spec(w.settings, rec, database="db-1", epoch=1)
    w.backend.containers["c-earlier"] = FakeContainer(id="c-earlier", name=spec.name, image=IMG,
                                                     labels=spec.all_labels(), admin_token="earlier-token")
    real_inspect = w.backend.inspect
    hidden = [True]

    async def inspect(name_or_id):  # the earlier create was not visible yet when this sync looked
        if hidden and name_or_id == spec.name:
            hidden.clear()
            return None
        return await real_inspect(name_or_id)

    w.backend.inspect = inspect  # type: ignore[method-assign]
    rec = await w.sync(GAME)
    assert rec.current_container_id == "c-earlier" and rec.status is Status.RUNNING
    assert rec.admin_token == "earlier-token"
    await w.job(JobKind.FORCE_NEXT_TURN, GAME)
    await w.sync(GAME)
    await w.sync(GAME)
    assert w.results(GAME)[-1] == ("force_next_turn", "success", "")


async def test_an_engine_refusing_the_recorded_token_is_engine_refused_not_a_crash(w, caplog):
    """A database restored from an older backup: the recorded token is not the unit's."""
    rec = await _started(w)
    unit_token = rec.admin_token
    w.store.records[GAME] = rec = rec.replace(admin_token="stale")
    c = w.backend.containers[rec.current_container_id]
    with caplog.at_level(logging.INFO):
        await w.reconciler.observe(rec, w.backend.ip_of(c))
    rec = w.store.records[GAME]
    assert rec.status is Status.RUNNING and rec.crash_count == 0 and rec.admin_api is True
    assert rec.last_error_code is ErrorCode.ENGINE_REFUSED and "401" in (rec.last_error_message or "")
    assert "refused" in caplog.text
    await w.job(JobKind.FORCE_NEXT_TURN, GAME)
    rec = await w.sync(GAME)
    assert w.results(GAME)[-1] == ("force_next_turn", "failure", "engine_refused")
    assert rec.status is Status.RUNNING and rec.current_container_id == c.id and c.state == "running"
    assert unit_token not in caplog.text and "stale" not in caplog.text


async def test_the_token_is_in_no_answer_snapshot_or_repr(w):
    await _started(w)
    await w.job(JobKind.PATCH, GAME, IMG2)
    rec = await w.sync(GAME)
    token = rec.admin_token
    assert token
    assert "admin_token" not in record_json(rec) and token not in str(record_json(rec))
    assert token not in repr(rec)
    fields = snapshots.fields(rec, previous=None, reason="started", snapshot_id="s", now=datetime.now(UTC))
    assert token not in str(fields)
    assert token not in str(w.store.results_for(GAME)) and token not in str([o.params for o in w.store.ops])


def test_the_docker_adapter_reads_the_token_back_from_the_units_environment():
    attrs = {"Id": "x", "Name": "/galaxy-game-g1", "State": {"Status": "running"},
             "Config": {"Image": IMG, "Labels": {}, "Env": ["GAME_ID=g1", f"{ADMIN_TOKEN_ENV}=abc=def"]}}
    c = from_inspect(attrs)
    assert c.admin_token == "abc=def" and "abc=def" not in repr(c)
    assert from_inspect({**attrs, "Config": {"Env": ["GAME_ID=g1"]}}).admin_token == ""


# ---------------------------------------------------------------- the engine client, over real HTTP
@pytest.fixture
async def engine_server():
    """An admin API on 127.0.0.1 that wants the token "right-token" and records what it got."""
    got: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        got.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer right-token":
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.method == "POST":
            return web.json_response({"turn": 0, "phase": "generating"}, status=202)
        return web.json_response({"turn": 4, "phase": "idle", "last_generation": None})

    app = web.Application()
    app.router.add_route("*", "/admin/v1/{what}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, got
    finally:
        await runner.cleanup()


async def test_the_engine_client_sends_the_bearer_token_and_never_shows_it(engine_server, caplog):
    port, got = engine_server
    client = EngineClient(port=port, path="/healthz")
    caplog.set_level(logging.DEBUG)
    try:
        assert (await client.status("127.0.0.1", token="right-token")).turn == 4
        assert await client.request_turn("127.0.0.1", 0, token="right-token") is True
        assert got == ["Bearer right-token", "Bearer right-token"]
        for token in ("wrong-token-value", ""):
            with pytest.raises(EngineRefused) as refused:
                await client.status("127.0.0.1", token=token)
            assert "401" in refused.value.message and (not token or token not in refused.value.message)
            with pytest.raises(EngineRefused):
                await client.request_turn("127.0.0.1", 0, token=token)
        assert got[2:] == ["Bearer wrong-token-value"] * 2 + [None, None]  # no token: no header at all
    finally:
        await client.close()
    assert "right-token" not in caplog.text and "wrong-token-value" not in caplog.text


def _record(w):
    from desired.model import DesiredStatus, RuntimeRecord
    from tests.fakes import T0
    return RuntimeRecord(game_id=GAME, status=Status.STARTING, current_container_id=None, current_image_ref=None,
                         engine_endpoint="http://galaxy-game-g1:8080",
                         state_path=str(w.settings.storage.state_root) + "/g1",
                         docker_network="galaxy-net", started_at=None, stopped_at=None, removed_at=None,
                         last_op_at=T0, created_at=T0, desired_status=DesiredStatus.RUNNING, desired_image_ref=IMG,
                         generation=1, observed_generation=0)


def test_off_game_network_binds_every_local_address_but_those_on_the_game_network():
    from controller.http import addresses_off, local_ipv4_addresses
    local = local_ipv4_addresses()
    assert "127.0.0.1" in local
    # The same list for both: interfaces come and go while other tests make Docker networks.
    assert set(addresses_off([], local)) == set(local)
    off = addresses_off(["127.0.0.0/8", "fd00::/8"], local)
    assert "127.0.0.1" not in off and set(off) == {a for a in local if not a.startswith("127.")}


async def test_a_unit_started_again_runs_with_the_token_it_carries_even_when_the_record_forgot_it(w):
    """A stopped unit is started again as it is: when the record does not hold its token (a database
    restored from an older backup), the token is read back from the unit before it runs."""
    rec = await _started(w)
    unit = w.backend.containers[rec.current_container_id]
    await w.job(JobKind.STOP, GAME)
    rec = await w.sync(GAME)
    assert rec.status is Status.STOPPED and unit.state == "exited"
    w.store.records[GAME] = rec.replace(admin_token="older-token")
    await w.job(JobKind.START, GAME, IMG)
    rec = await w.sync(GAME)
    assert rec.status is Status.RUNNING and rec.current_container_id == unit.id  # the same unit, started
    assert rec.admin_token == unit.admin_token and rec.last_error_code is not ErrorCode.ENGINE_REFUSED
    await w.job(JobKind.FORCE_NEXT_TURN, GAME)
    await w.sync(GAME)
    await w.sync(GAME)
    assert w.results(GAME)[-1] == ("force_next_turn", "success", "")


async def test_a_change_accepted_while_the_token_is_recorded_is_not_converged_by_the_older_spec(w):
    """Recording the token re-reads the record: a newer generation accepted just before must make the
    sync plan again, not let the unit built for the older one answer the newer jobs."""
    await w.job(JobKind.START, GAME, IMG)
    real = w.store.set_admin_token
    changed: list[bool] = []

    async def a_new_image_lands_first(rec, token):
        if not changed:
            changed.append(True)
            await w.job(JobKind.START, GAME, IMG2)
        return await real(rec, token)

    w.store.set_admin_token = a_new_image_lands_first  # type: ignore[method-assign]
    for _ in range(3):
        rec = await w.sync(GAME)
    assert changed
    [up] = w.running(GAME)
    assert up.image == IMG2 and rec.current_image_ref == IMG2 and rec.converged
    res = w.store.results_for(GAME)
    assert [(r["job"], r["outcome"], r["error_code"]) for r in res] == [
        ("start", "failure", "superseded"), ("start", "success", "")]
    assert res[-1]["container_id"] == up.id and rec.admin_token == up.admin_token
