"""Red-team, stop 45: a Docker stop truncated a fractional grace (int()) while a create rounded it up
(StopTimeout, math.ceil): RTMANAGER_STOP_GRACE=0.5 sent t=0, a SIGKILL at once, and 29.9 gave 29 s. A stop
gives at least the grace asked, as the create does."""

from __future__ import annotations

import asyncio

import pytest

from observed.docker import DockerBackend


class _Api:
    def __init__(self) -> None:
        self.timeouts: list[int] = []

    def stop(self, container_id: str, timeout: int) -> None:
        self.timeouts.append(timeout)


class _Client:
    def __init__(self) -> None:
        self.api = _Api()

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("grace", "sent"), [(0.5, 1), (29.9, 30), (10.0, 10), (0, 0)])
def test_a_stop_gives_at_least_the_grace_asked(grace: float, sent: int) -> None:
    backend = DockerBackend(instance="prod", network="unused", pool_size=1)  # no daemon contacted
    client = _Client()
    backend._client = client  # type: ignore[assignment]
    try:
        asyncio.run(backend.stop("c" * 64, grace))
    finally:
        backend.close()
    assert client.api.timeouts == [sent]
