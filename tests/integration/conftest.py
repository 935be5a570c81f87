"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.support.api import Api


@pytest.fixture
async def api(rtm_env, docker_client):
    a = Api(rtm_env, docker_client)
    try:
        yield a
    finally:
        try:
            await a.stop_all()
        finally:
            await a.close()
