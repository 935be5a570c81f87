"""A Redis out of memory (maxmemory, noeviction: the setting Lobby's streams need) refuses the commands
that may grow it, not reads and acknowledgments (red-team, stop 43)."""

from __future__ import annotations

import pytest
import redis

from controller.streams import RedisStreams, StreamsUnavailable
from tests.support.services import RedisServer


@pytest.fixture
def full_redis(tmp_path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


async def test_a_full_redis_still_lets_the_intake_read_and_acknowledge_what_is_queued(full_redis):
    """Every pending pass of the intake begins with XGROUP CREATE, which Redis refuses when full (OOM)
    before it looks for the group, so BUSYGROUP never came back: the intake backed off and read nothing,
    for every game, for as long as Redis stayed full, although XREADGROUP and XACK still worked."""
    streams = RedisStreams(full_redis.url, group="rtmanager", consumer="c1")
    client = redis.Redis.from_url(full_redis.url)
    try:
        assert await streams.ensure_group("jobs") is True
        entry = client.xadd("jobs", {"game_id": "g1"}).decode()
        client.config_set("maxmemory", 1)
        with pytest.raises(StreamsUnavailable, match="OOM|OutOfMemory"):
            await streams.add_many([("results", {"x": "1"})])  # it is full
        assert await streams.ensure_group("jobs") is False  # the group is there: nothing to create
        got = await streams.read_new(["jobs"], 10, None)
        assert [(e.id, e.fields) for e in got] == [(entry, {b"game_id": b"g1"})]
        await streams.ack("jobs", entry)
        assert client.xpending("jobs", "rtmanager")["pending"] == 0
        # a group that is not there cannot be made while Redis is full: that stays an outage
        with pytest.raises(StreamsUnavailable):
            await streams.ensure_group("other")
    finally:
        client.config_set("maxmemory", 0)
        client.close()
        await streams.close()


async def test_entries_added_survives_trims_and_not_a_delete(full_redis):
    """What the relay's look for a deleted results stream reads (controller/relay.py ``check_server``)."""
    streams = RedisStreams(full_redis.url, group="rtmanager", consumer="c1")
    client = redis.Redis.from_url(full_redis.url)
    try:
        assert await streams.entries_added("results") == 0  # no such stream
        for i in range(5):
            client.xadd("results", {"i": str(i)})
        client.xtrim("results", maxlen=1)
        assert await streams.entries_added("results") == 5
        client.delete("results")
        client.xadd("results", {"i": "again"})
        assert await streams.entries_added("results") == 1
    finally:
        client.close()
        await streams.close()
