"""The HTTP surface of an in-process controller: probes, metrics, auth, the REST jobs, the OpenAPI document.

Every test runs a real ``Controller`` (real Postgres, Redis and Docker, isolated
by the conftest's ``rtm_env``) serving HTTP on a free port of 127.0.0.1 and talks
to it with aiohttp, as an operator's tool would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import yarl

from tests.support import eventually
from tests.support.api import STUB_10, STUB_11

RESULT_FIELDS = {"game_id", "outcome", "container_id", "engine_endpoint", "error_code", "error_message", "job",
                 "job_entry_id", "result_id"}


def assert_result_shape(body: dict[str, Any], *, with_operation: bool = True) -> None:
    expected = RESULT_FIELDS | ({"operation_id"} if with_operation else set())
    assert set(body) == expected, body
    for k in RESULT_FIELDS:
        assert isinstance(body[k], str), (k, body)
    if with_operation:
        assert isinstance(body["operation_id"], int) and body["operation_id"] > 0, body


def sample(metrics_text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample line of ``name`` in a Prometheus text exposition."""
    out = []
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        metric = series.split("{", 1)[0]
        if metric == name:
            out.append((series[len(name):], float(value)))
    return out


# --------------------------------------------------------------------------- probes, metrics


async def test_healthz_readyz_and_metrics(api):
    await api.start()
    status, body = await api.get("/healthz", auth=False)
    assert status == 200 and body == {"status": "ok"}

    status, body = await api.get("/readyz", auth=False)
    assert status == 200, body
    assert body["ready"] is True and body["leader"] is True
    assert body["checks"] == {"postgres": "ok", "redis": "ok", "docker": "ok", "relay": "ok", "state_storage": "ok",
                              "loops": "ok"}

    status, text, resp = await api.request("GET", "/metrics", auth=False)
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE rtmanager_leader gauge" in text
    assert "rtmanager_leader 1.0" in text.splitlines()
    assert "rtmanager_ready 1.0" in text.splitlines()  # set by the /readyz call above
    for family in ("rtmanager_reconcile_total", "rtmanager_reconcile_duration_seconds", "rtmanager_workqueue_depth",
                   "rtmanager_workqueue_adds_total", "rtmanager_workqueue_retries_total",
                   "rtmanager_jobs_received_total", "rtmanager_results_published_total",
                   "rtmanager_job_convergence_seconds", "rtmanager_job_phase_seconds",
                   "rtmanager_docker_api_calls_total", "rtmanager_engine_probes_total", "rtmanager_outbox_pending",
                   "rtmanager_runtime_records"):
        assert f"# HELP {family} " in text, family


# --------------------------------------------------------------------------- auth


async def test_api_needs_the_exact_bearer_token(api):
    await api.start()
    path = "/api/v1/runtimes"
    status, body = await api.get(path, auth=False)
    assert status == 401 and "error" in body
    for bad in (f"Bearer {'0' * 32}",            # wrong token of the right length
                f"Bearer {api.token[:-1]}",       # a prefix of the right one
                f"Bearer {api.token[:16]}",       # a shorter prefix
                f"Bearer {api.token}x",           # the right one and more
                f"bearer{api.token}",
                api.token,                        # without the scheme
                f"Basic {api.token}",
                "Bearer "):
        status, body = await api.get(path, auth=False, headers={"Authorization": bad})
        assert status == 401, (bad, status, body)
        assert body == {"error": "missing or wrong bearer token"}
    # every /api/v1 route is behind the token, POSTs included, and a refused POST changes nothing
    for method, p in (("GET", "/api/v1/runtimes/g1"), ("GET", "/api/v1/runtimes/g1/operations"),
                      ("GET", "/api/v1/openapi.json"), ("POST", "/api/v1/runtimes/g1/start")):
        status, _, _ = await api.request(method, p, auth=False, json={"image_ref": STUB_10})
        assert status == 401, (method, p)
    assert api.containers("g1") == []
    # spellings of an API path sent as-is on the wire: none reaches a handler without the token
    for raw in ("/%61pi/v1/runtimes", "//api/v1/runtimes", "/healthz/../api/v1/runtimes", "/./api/v1/runtimes",
                "/api/v1/runtimes/", "/API/v1/runtimes", "/api/v1/runtimes%2F", "/api/v1/runtimes/g1%2Fstart"):
        async with api.session.get(yarl.URL(f"{api.base}{raw}", encoded=True)) as resp:
            assert resp.status in (401, 404), (raw, resp.status, await resp.text())
    status, body = await api.get("/api/v1/runtimes/g1")
    assert status == 404, body
    # the probes need no token
    assert (await api.get("/healthz", auth=False))[0] == 200
    assert (await api.get(path))[0] == 200


async def test_no_token_configured_disables_the_api(api):
    api.env["RTMANAGER_API_TOKEN"] = ""
    await api.start()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {api.token}"}):
        status, body = await api.get("/api/v1/runtimes", auth=False, headers=headers)
        assert status == 503, (headers, body)
        assert "RTMANAGER_API_TOKEN" in body["error"]
    status, body = await api.job("g2", "start", {"image_ref": STUB_10}, auth=False)
    assert status == 503
    assert (await api.get("/healthz", auth=False))[0] == 200
    assert (await api.get("/readyz", auth=False))[0] == 200


async def test_a_standby_refuses_jobs_with_503_and_retry_after(api, caplog):
    caplog.set_level("INFO", logger="rtmanager.leadership")
    await api.start()
    standby = await api.start(leader=False)
    standby_port = standby.settings.http.http_port
    for _ in range(200):  # it has campaigned and lost, and says so
        if "standing by" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert not standby.is_leader
    status, body = await api.get("/readyz", port=standby_port, auth=False)
    assert status == 200 and body["leader"] is False
    status, body, resp = await api.request("POST", "/api/v1/runtimes/sb-1/start", port=standby_port,
                                           json={"image_ref": STUB_10})
    assert status == 503, body
    assert resp.headers.get("Retry-After") == "2"
    status, body = await api.get("/api/v1/runtimes/sb-1", port=standby_port)
    assert status == 404  # the standby wrote nothing
    status, text, _ = await api.request("GET", "/metrics", port=standby_port, auth=False)
    assert "rtmanager_leader 0.0" in text.splitlines()


# --------------------------------------------------------------------------- jobs over REST


async def test_rest_jobs_through_a_whole_lifecycle(api):
    await api.start()
    game = "rest-1"

    # start: the job-result shape, a running container, a healthy record
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["error_code"] == "" and res["error_message"] == ""
    assert res["game_id"] == game and res["job"] == "start" and res["job_entry_id"] == ""
    assert len(res["container_id"]) == 64 and res["result_id"]
    assert res["engine_endpoint"] == f"http://galaxy-game-{game}:8080"
    first = res
    [c] = api.containers(game)
    assert c.id == first["container_id"] and c.status == "running"
    assert c.attrs["Config"]["Image"] == STUB_10

    status, rec = await api.get(f"/api/v1/runtimes/{game}")
    assert status == 200, rec
    assert rec["status"] == "running" and rec["health"] == "healthy"
    assert rec["current_container_id"] == first["container_id"] and rec["current_image_ref"] == STUB_10
    assert rec["desired_status"] == "running" and rec["generation"] == rec["observed_generation"] == 1
    first_revision = rec["spec_revision"]

    status, body = await api.get(f"/api/v1/runtimes/{game}/operations")
    assert status == 200
    [op] = [o for o in body["operations"] if o["id"] == first["operation_id"]]
    assert op["op"] == "start" and op["source"] == "admin" and op["status"] == "succeeded"
    assert op["params"] == {"image_ref": STUB_10}
    assert op["entry_id"] in (None, "") and op["stream"] in (None, "")

    status, body = await api.get("/api/v1/runtimes")
    assert status == 200 and [r["game_id"] for r in body["runtimes"]] == [game]
    status, body = await api.get("/api/v1/runtimes?status=running")
    assert status == 200 and [r["game_id"] for r in body["runtimes"]] == [game]
    status, body = await api.get("/api/v1/runtimes?status=stopped")
    assert status == 200 and body["runtimes"] == []

    # the same result was published on the results stream too, with an empty job_entry_id
    published = await api.stream_result(lambda r: r["result_id"] == first["result_id"], what="the REST start result")
    assert published == {k: v for k, v in first.items() if k != "operation_id"}

    # the start went through the reconciler: the metrics show it
    status, text, _ = await api.request("GET", "/metrics", auth=False)
    assert "rtmanager_leader 1.0" in text.splitlines()
    reconciles = sample(text, "rtmanager_reconcile_total")
    assert reconciles and sum(v for _, v in reconciles) >= 1, reconciles
    assert any('result="ok"' in labels for labels, _ in reconciles), reconciles

    async def start_convergence_counted() -> bool:
        _, text, _ = await api.request("GET", "/metrics", auth=False)
        counts = sample(text, "rtmanager_job_convergence_seconds_count")
        return sum(v for lbl, v in counts if 'kind="start"' in lbl) >= 1

    await eventually(start_convergence_counted, what="the start's convergence in the metrics")

    # start again with the same image: a replay
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["error_code"] == "replay_no_op"
    assert res["container_id"] == first["container_id"] and res["operation_id"] != first["operation_id"]

    # restart: a new container, a new spec revision
    status, res = await api.job(game, "restart")
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["job"] == "restart", res
    assert res["container_id"] and res["container_id"] != first["container_id"]
    restarted = res
    status, rec = await api.get(f"/api/v1/runtimes/{game}")
    assert rec["spec_revision"] == first_revision + 1 and rec["current_container_id"] == restarted["container_id"]
    assert [x.id for x in api.containers(game)] == [restarted["container_id"]]

    # patch within the repository: the image changes
    status, res = await api.job(game, "patch", {"image_ref": STUB_11})
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["job"] == "patch", res
    [c] = api.containers(game)
    assert c.id == res["container_id"] and c.attrs["Config"]["Image"] == STUB_11
    status, rec = await api.get(f"/api/v1/runtimes/{game}")
    assert rec["current_image_ref"] == STUB_11 and rec["status"] == "running"

    # patch to another repository (allowed by the allowlist): it reaches decide and is refused there
    status, res = await api.job(game, "patch", {"image_ref": "galaxy/engine:2"})
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "failure" and res["error_code"] == "invalid_request", res
    assert "image_ref" in res["error_message"]
    assert [x.attrs["Config"]["Image"] for x in api.containers(game)] == [STUB_11]

    # stop
    status, res = await api.job(game, "stop")
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["error_code"] == "" and res["job"] == "stop", res
    [c] = api.containers(game)
    assert c.status == "exited"
    status, rec = await api.get(f"/api/v1/runtimes/{game}")
    assert rec["status"] == "stopped" and rec["stop_reason"] == "admin_request"

    # cleanup
    status, res = await api.job(game, "cleanup")
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "success" and res["job"] == "cleanup", res
    assert api.containers(game) == []
    status, rec = await api.get(f"/api/v1/runtimes/{game}")
    assert rec["status"] == "removed" and rec["removed_at"]

    # a removed game_id cannot be started again
    status, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert status == 200, res
    assert_result_shape(res)
    assert res["outcome"] == "failure" and res["error_code"] == "invalid_request", res
    assert api.containers(game) == []

    # every REST job is in the operation log, as admin
    status, body = await api.get(f"/api/v1/runtimes/{game}/operations")
    ops = [o for o in body["operations"] if o["source"] == "admin"]
    assert [o["op"] for o in reversed(ops)] == ["start", "start", "restart", "patch", "patch", "stop", "cleanup",
                                                "start"]


async def test_stop_with_a_reason_and_restart_or_patch_of_unknown_games(api):
    await api.start()
    status, res = await api.job("unknown-1", "stop", {"reason": "finished"})
    assert status == 200 and res["outcome"] == "success" and res["error_code"] == "replay_no_op", res
    for kind, body in (("restart", None), ("patch", {"image_ref": STUB_11})):
        status, res = await api.job("unknown-1", kind, body)
        assert status == 200, (kind, res)
        assert_result_shape(res)
        assert res["outcome"] == "failure" and res["error_code"] == "invalid_request", res
    status, res = await api.job("unknown-1", "cleanup")
    assert status == 200 and res["outcome"] == "success" and res["error_code"] == "replay_no_op", res
    status, res = await api.job("unknown-1", "stop", {"reason": "bogus"})
    assert status == 400 and res["error_code"] == "invalid_request" and "reason" in res["error_message"], res


async def test_bad_input_is_refused_before_it_reaches_desired_state(api):
    await api.start()

    # an invalid game_id in the path: the result shape, HTTP 400
    for bad in ("Bad_Game", "-lead", "x" * 52):
        status, res = await api.job(bad, "start", {"image_ref": STUB_10})
        assert status == 400, (bad, res)
        assert_result_shape(res, with_operation=False)
        assert res["outcome"] == "failure" and res["error_code"] == "invalid_request" and res["job"] == "start"
        assert "game_id" in res["error_message"] and res["game_id"] == bad[:64]
    status, body = await api.get("/api/v1/runtimes/Bad_Game")
    assert status == 400 and "error" in body
    status, body = await api.get("/api/v1/runtimes/Bad_Game/operations")
    assert status == 400 and "error" in body
    status, body = await api.get("/api/v1/runtimes?status=bogus")
    assert status == 400 and "error" in body

    # an image the allowlist does not allow
    status, res = await api.job("bad-1", "start", {"image_ref": "nginx:latest"})
    assert status == 400, res
    assert_result_shape(res, with_operation=False)
    assert res["outcome"] == "failure" and res["error_code"] == "image_rejected" and res["game_id"] == "bad-1"
    # an image reference that is not one
    status, res = await api.job("bad-1", "start", {"image_ref": "galaxy/engine-stub:NOT VALID"})
    assert status == 400 and res["error_code"] == "invalid_request", res
    # image_ref missing, empty, not a string
    for body in ({}, {"image_ref": ""}, {"image_ref": 5}, {"image_ref": None}, {"image_ref": ["a"]}, None):
        status, res = await api.job("bad-1", "start", body)
        assert status == 400, (body, res)
        assert res.get("error_code") == "invalid_request" and "image_ref" in res["error_message"], (body, res)
    # a body that is not JSON, or not a JSON object
    for raw in (b"not json", b"{", b"\xff\xfe", b"[1, 2]", b'"image_ref"', b"null"):
        status, res, _ = await api.request("POST", "/api/v1/runtimes/bad-1/start", data=raw,
                                           headers={"Content-Type": "application/json"})
        assert status == 400, (raw, res)
        assert isinstance(res, dict) and ("error" in res or res.get("error_code") == "invalid_request"), (raw, res)
    # wait out of range or not a number
    for wait in ("-1", "301", "abc", "nan", "inf", ""):
        status, res, _ = await api.request("POST", "/api/v1/runtimes/bad-1/start", params={"wait": wait},
                                           json={"image_ref": STUB_10})
        assert status == 400, (wait, res)
        assert "wait" in res["error"]

    # none of that changed anything
    status, body = await api.get("/api/v1/runtimes")
    assert status == 200 and body["runtimes"] == []
    assert api.containers("bad-1") == []


async def test_a_json_body_nested_past_the_decoders_depth_or_in_an_unknown_charset_is_a_400(api):
    """Python's JSON decoder raises RecursionError, not ValueError, on an array nested a few thousand deep:
    200 KB, well under the body limit. Before, every route that reads a body answered it with a 500."""
    await api.start()
    nested = b'{"image_ref": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for method, path in (("POST", "/api/v1/runtimes/bad-1/start"), ("PUT", "/api/v1/runtimes/bad-1/schedule"),
                         ("POST", "/api/v1/admin/engine-versions"), ("PATCH", "/api/v1/admin/engine-versions/1.0"),
                         ("POST", "/api/v1/drains"), ("POST", "/api/v1/rollouts")):
        status, res, _ = await api.request(method, path, data=nested, headers={"Content-Type": "application/json"})
        assert status == 400, (method, path, status, res)
        # and a charset Python does not know (aiohttp's text() raises LookupError; found by review)
        status, res, _ = await api.request(method, path, data=b'{"image_ref": "x"}',
                                           headers={"Content-Type": "application/json; charset=nope"})
        assert status == 400, (method, path, status, res)
    status, body = await api.get("/api/v1/runtimes")
    assert status == 200 and body["runtimes"] == []


async def test_the_path_game_id_cannot_be_overridden_by_the_body(api):
    """POST /runtimes/A/start with {"game_id": "B"} must act on A (or be refused), never start B."""
    await api.start()
    status, res = await api.job("path-a", "start", {"image_ref": STUB_10, "game_id": "body-b"})
    assert api.containers("body-b") == [], "a body field started a game the URL did not name"
    status_b, _ = await api.get("/api/v1/runtimes/body-b")
    assert status_b == 404, "a body field created a record for a game the URL did not name"
    assert status in (200, 400), res
    if status == 200:
        assert res["game_id"] == "path-a" and res["outcome"] == "success", res


async def test_wait_zero_answers_202_and_the_result_comes_later(api):
    await api.start()
    game = "later-1"
    status, body = await api.job(game, "start", {"image_ref": STUB_10}, wait=0)
    assert status == 202, body
    assert set(body) == {"operation_id", "status", "game_id", "job"}
    assert isinstance(body["operation_id"], int) and body["status"] in ("queued", "running")
    assert body["game_id"] == game and body["job"] == "start"
    published = await api.stream_result(lambda r: r["game_id"] == game and r["job"] == "start",
                                        what="the result of the 202 start")
    assert published["outcome"] == "success" and published["job_entry_id"] == "" and published["container_id"]
    [c] = api.containers(game)
    assert c.id == published["container_id"] and c.status == "running"
    status, ops = await api.get(f"/api/v1/runtimes/{game}/operations")
    [op] = [o for o in ops["operations"] if o["id"] == body["operation_id"]]
    assert op["status"] == "succeeded" and op["source"] == "admin"
    # a replay is answered at once, whatever the wait
    status, body = await api.job(game, "start", {"image_ref": STUB_10}, wait=0.5)
    assert status == 200 and body["error_code"] == "replay_no_op", body


async def test_concurrent_rest_starts_of_a_new_game_all_join(api):
    """Identical starts of a new game at once: one creates the record, the others join it; all succeed alike."""
    await api.start()
    games = ["conc-1a", "conc-1b", "conc-1c"]
    per_game = 6
    answers = await asyncio.gather(*(api.job(g, "start", {"image_ref": STUB_10}) for _ in range(per_game)
                                     for g in games))
    assert [s for s, _ in answers] == [200] * len(answers), [a for a in answers if a[0] != 200][:2]
    for game in games:
        bodies = [b for _, b in answers if b["game_id"] == game]
        assert len(bodies) == per_game
        assert {b["outcome"] for b in bodies} == {"success"}, bodies
        assert len({b["container_id"] for b in bodies}) == 1, bodies
        assert len({b["operation_id"] for b in bodies}) == per_game
        assert len({b["result_id"] for b in bodies}) == per_game
        assert [c.id for c in api.containers(game)] == [bodies[0]["container_id"]]
        status, rec = await api.get(f"/api/v1/runtimes/{game}")
        assert rec["generation"] == 1, rec


async def test_a_rest_start_still_converging_is_superseded_by_another_image(api):
    await api.start()
    status, first = await api.job("conc-2", "start", {"image_ref": STUB_10}, wait=0)
    assert status == 202, first
    status, second = await api.job("conc-2", "start", {"image_ref": STUB_11})
    assert status == 200 and second["outcome"] == "success", second
    [c] = api.containers("conc-2")
    assert c.id == second["container_id"] and c.attrs["Config"]["Image"] == STUB_11
    status, ops = await api.get("/api/v1/runtimes/conc-2/operations")
    [op] = [o for o in ops["operations"] if o["id"] == first["operation_id"]]
    # the second start came milliseconds after the first, long before an engine can be healthy
    assert op["status"] == "failed" and op["error_code"] == "superseded", op
    superseded = await api.stream_result(lambda r: r["game_id"] == "conc-2" and r["result_id"] != second["result_id"],
                                         what="the first start's result")
    assert superseded["job_entry_id"] == "" and superseded["job"] == "start"
    assert superseded["outcome"] == "failure" and superseded["error_code"] == "superseded", superseded


async def test_a_waiting_rest_caller_hears_at_once_that_its_job_was_superseded(api):
    """The superseded result is written when the newer job is accepted; the older caller must get it then,
    not when something else happens to write a result. Dry run keeps the reconciler from writing any
    (as a worker busy with a long image pull, or backing off while Docker is away, would)."""
    await api.start(dry_run="1")
    game = "conc-3"
    waiting = asyncio.create_task(api.job(game, "start", {"image_ref": STUB_10}, wait=6))

    async def accepted() -> bool:
        status, body = await api.get(f"/api/v1/runtimes/{game}/operations")
        return status == 200 and len(body["operations"]) == 1

    deadline = time.monotonic() + 10
    while not await accepted():
        assert time.monotonic() < deadline, "the first start was not accepted"
        await asyncio.sleep(0.01)
    status, body = await api.job(game, "start", {"image_ref": STUB_11}, wait=0)
    assert status == 202, body
    superseded_at = time.monotonic()
    status, first = await asyncio.wait_for(waiting, 30)
    took = time.monotonic() - superseded_at
    assert status == 200 and first["outcome"] == "failure" and first["error_code"] == "superseded", first
    assert took < 3, f"the superseded caller was answered only {took:.1f}s after its result was written"
    assert api.containers(game) == []  # dry run


# --------------------------------------------------------------------------- the OpenAPI document


async def test_openapi_document_covers_every_api_route(api):
    ctl = await api.start()
    status, doc, resp = await api.request("GET", "/api/v1/openapi.json")
    assert status == 200 and resp.content_type == "application/json"
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    registered = set()
    for route in ctl.http.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD":
            continue  # aiohttp's automatic HEAD for every GET
        registered.add((route.method, path))
    api_routes = {(m, p) for m, p in registered if p.startswith("/api/")}
    # the document describes the API; it need not describe itself
    api_routes.discard(("GET", "/api/v1/openapi.json"))
    assert api_routes, registered
    assert api_routes - documented == set(), "routes the OpenAPI document does not describe"
    assert documented - api_routes == set(), "documented paths the server does not route"
    # the probes are outside /api and stay there
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")} <= registered
    # every documented operation answers something other than 404 / 405 when called with the token
    for method, path in sorted(documented):
        url = (path.replace("{game_id}", "doc-1").replace("{version}", "doc-1").replace("{drain_id}", "1")
               .replace("{rollout_id}", "1"))
        params = {"wait": "0"} if method == "POST" else {"follow": "0"} if path == "/api/v1/events" else None
        status, body, _ = await api.request(method, url, params=params, json={} if method == "POST" else None)
        assert status not in (404, 405) or (
            path.endswith(("{game_id}", "/engine/status")) and status == 404
            and body == {"error": "no runtime for game doc-1"}) or (
            path.endswith("{version}") and status == 404 and body == {"error": "no engine version doc-1"}) or (
            "{drain_id}" in path and status == 404 and body == {"error": "no drain 1"}) or (
            "{rollout_id}" in path and status == 404 and body == {"error": "no rollout 1"}), (
            method, path, status)
