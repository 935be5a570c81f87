"""Schemathesis against the OpenAPI document a live in-process controller serves.

The controller runs on the test's event loop; the schemathesis cases (sync,
``requests``) run in a worker thread, so the server answers while they call it.
Every case is sent with the bearer token and checked for: no 5xx, a documented
status code, the documented content type and headers, a body matching the
response schema, and that the token is really enforced (``ignored_auth``).
Negative cases (data that breaks the schema) must be refused with a 4xx.
POST jobs are sent with ``wait=0`` so that none of them holds a case for long;
the containers a valid start creates carry the test's instance label and are
removed by the ``rtm_env`` fixture.
"""

from __future__ import annotations

import asyncio
import collections
import time

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from controller.openapi import openapi_document
from tests.support.api import STUB_10, STUB_11

CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
               response_schema_conformance, ignored_auth]
GET_EXAMPLES = 15
POST_EXAMPLES = 6
BUDGET = 90.0


def run_schemathesis(base: str, token: str) -> tuple[dict[str, collections.Counter], dict[str, str]]:
    """Every operation, positive and negative.

    Returns the status codes seen and the failure found (if any) per operation and mode; one
    operation's failure does not stop the others from being exercised.
    """
    auth = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json", headers=auth, timeout=10)
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: dict[str, str] = {}
    session = requests.Session()
    started = time.monotonic()

    def exercise(operation, mode: GenerationMode, examples: int, label: str, **fixed) -> None:
        checks = CONFORMANCE + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def one(case) -> None:
            response = case.call_and_validate(base_url=base, session=session, headers=auth, checks=checks,
                                              timeout=15)
            seen[label][response.status_code] += 1

        try:
            one()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported all together by the test
            failures[label] = str(exc)[:3000]

    operations = [result.ok() for result in schema.get_all_operations()]
    documented = openapi_document()["paths"]
    assert len(operations) == sum(len(item) for item in documented.values()), [op.label for op in operations]
    for op in operations:
        post = op.method.upper() == "POST"
        fixed = {"query": {"wait": 0}} if post and "/runtimes/" in op.path else {}
        if op.path == "/api/v1/events":
            fixed = {"query": {"follow": "0"}}  # what is there, then the end: no case holds a stream open
        examples = POST_EXAMPLES if post else GET_EXAMPLES
        exercise(op, GenerationMode.POSITIVE, examples, f"{op.label} positive", **fixed)
        exercise(op, GenerationMode.NEGATIVE, examples, f"{op.label} negative", **fixed)
    # Bodies the allowlist accepts, so that start and patch also reach desired state and the reconciler.
    for op in operations:
        if op.path.endswith("/start") or op.path.endswith("/patch"):
            image = STUB_10 if op.path.endswith("/start") else STUB_11
            exercise(op, GenerationMode.POSITIVE, 3, f"{op.label} valid image",
                     query={"wait": 0}, body={"image_ref": image})
        if op.path == "/api/v1/admin/engine-versions" and op.method.upper() == "POST":
            exercise(op, GenerationMode.POSITIVE, 3, f"{op.label} valid image", body={
                "version": "9.9.9", "image_ref": STUB_11})
    session.close()
    assert time.monotonic() - started < BUDGET, f"schemathesis took more than {BUDGET}s"
    return seen, failures


async def test_the_served_api_conforms_to_its_openapi_document(api):
    await api.start()
    seen, failures = await asyncio.to_thread(run_schemathesis, api.base, api.token)
    assert not failures, "schemathesis failures:\n\n" + "\n\n".join(f"== {k}\n{v}" for k, v in failures.items())

    # the run really exercised the server, and saw the answers the document promises
    for label, statuses in seen.items():
        assert sum(statuses.values()) > 0, label
        assert all(s < 500 for s in statuses), (label, statuses)
    assert seen["GET /api/v1/runtimes positive"][200] > 0, seen
    assert seen["GET /api/v1/runtimes/{game_id} positive"][404] > 0, seen
    assert seen["GET /api/v1/runtimes/{game_id} negative"][400] > 0, seen
    assert seen["POST /api/v1/runtimes/{game_id}/start positive"][400] > 0, seen  # random images: refused
    assert set(seen["POST /api/v1/runtimes/{game_id}/start valid image"]) <= {200, 202}, seen
    assert seen["POST /api/v1/runtimes/{game_id}/stop positive"][200] > 0, seen
    assert seen["POST /api/v1/admin/engine-versions valid image"][201] == 1, seen  # then 409: it exists
    assert seen["GET /api/v1/events positive"][200] > 0, seen
    assert seen["GET /api/v1/events negative"][400] > 0, seen
    # the valid starts reached desired state
    status, body = await api.get("/api/v1/runtimes")
    assert status == 200 and body["runtimes"], body
    # and the controller survived it all
    status, body = await api.get("/readyz", auth=False)
    assert status == 200 and body["ready"] and body["leader"], body
