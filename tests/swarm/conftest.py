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

from pathlib import Path

import pytest

from tests.support import separate_tier
from tests.swarm.nodes import STUBS, Cluster

HEARTBEAT = 2.0  # seconds: a dead node is down to the manager after about three

pytest_ignore_collect = separate_tier(Path(__file__).resolve().parent, "RTM_SWARM_TESTS")


@pytest.fixture
def rtm_env(rtm_env):
    """The tests' environment, with its state root made: an operator makes it on every node (Swarm does
    not make a bind source, so a game's state directory cannot be made in a root that does not exist)."""
    Path(rtm_env["RTMANAGER_STATE_ROOT"]).mkdir(parents=True, exist_ok=True)
    return rtm_env


@pytest.fixture(scope="session")
def swarm1(docker_client, stub_images):
    """A one-node swarm (its manager in a namespace of its own) with the stub engines, for the session."""
    with Cluster(1) as cluster:
        cluster.load_images(*STUBS)
        yield cluster


@pytest.fixture
def cluster2(docker_client, stub_images, rtm_env):
    """Two nodes, each with a state disk of its own at the state root."""
    with Cluster(2, state_root=rtm_env["RTMANAGER_STATE_ROOT"], heartbeat=HEARTBEAT) as cluster:
        cluster.load_images(*STUBS)
        yield cluster


@pytest.fixture
def shared2(docker_client, stub_images):
    """Two nodes that see the host's state root: shared storage."""
    with Cluster(2, heartbeat=HEARTBEAT) as cluster:
        cluster.load_images(*STUBS)
        yield cluster
