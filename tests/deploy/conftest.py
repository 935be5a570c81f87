"""The deploy tier: deploy/compose.yaml brought up for real (deploy/test-deploy.sh).

It needs images built on this host (deploy/images/build.sh, minutes the first
time) and a compose tool that deploy/test.sh does not install, so it is a step
of its own: `bash deploy/test-deploy.sh`. A run over the whole of tests/
(deploy/test.sh) leaves it out; naming this folder or a file in it
(`pytest tests/deploy`), or RTM_DEPLOY_TESTS=1, runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get("RTM_DEPLOY_TESTS") == "1":
        return True
    base = config.invocation_params.dir
    for arg in config.args:
        path = (base / arg.split("::", 1)[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name == "conftest.py" or collection_path == HERE:
        return None
    return None if _asked_for(config) else True
