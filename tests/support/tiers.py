"""Tiers that run as steps of their own (tests/swarm, tests/deploy)."""

from __future__ import annotations

import os
from pathlib import Path


def separate_tier(folder: Path, env_var: str):
    """A ``pytest_ignore_collect`` hook for a tier that runs as a step of its own.

    A run over the whole of tests/ leaves ``folder`` out; naming the folder or a file in
    it on the command line, or ``env_var=1``, runs it.
    """

    def asked_for(config) -> bool:
        if os.environ.get(env_var) == "1":
            return True
        base = config.invocation_params.dir
        for arg in config.args:
            path = (base / arg.split("::", 1)[0]).resolve()
            if path == folder or folder in path.parents:
                return True
        return False

    def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
        if collection_path.name == "conftest.py" or collection_path == folder:
            return None
        return None if asked_for(config) else True

    return pytest_ignore_collect
