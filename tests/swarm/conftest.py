"""The Swarm tier: the Swarm backend on swarms of the tests' own (deploy/test-swarm.sh).

Every swarm here runs on private dockerds in network namespaces of their own
(tests/swarm/nodes.py), never on the machine's main dockerd. The tier needs
root, iproute2 and nsenter, the stub engine images, and for the end-to-end test
the images of deploy/images/build.sh; it takes minutes, so it is a step of its
own: a run over all of tests/ (deploy/test.sh) leaves it out; naming this folder
or a file in it (`pytest tests/swarm`), or RTM_SWARM_TESTS=1, runs it. Nothing
here skips: what is missing fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.swarm.nodes import Cluster

HERE = Path(__file__).resolve().parent
STUBS = ("galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1", "galaxy/engine-stub:crash", "galaxy/engine-stub:mute")


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get("RTM_SWARM_TESTS") == "1":
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


@pytest.fixture(scope="session")
def swarm1(docker_client, stub_images):
    """A one-node swarm (its manager in a namespace of its own) with the stub engines, for the session."""
    cluster = Cluster(1)
    try:
        cluster.up()
        cluster.load_images(*STUBS)
        yield cluster
    finally:
        problems = cluster.down()
        assert not problems, f"test swarm {cluster.id} left things behind: {problems}"
