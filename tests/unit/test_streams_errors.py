"""The Redis adapter's own word on redis-py's errors: a Redis that refuses writes for a while
(a failed background save, too few replicas, a replica, a server loading or busy, out of memory)
is unavailable, not a bug; those come back from redis-py as plain ``ResponseError``."""

from __future__ import annotations

import pytest
import redis.exceptions

from controller.streams import GroupMissing, RedisStreams, StreamsError, StreamsUnavailable, _translate

REFUSALS = [
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "NOREPLICAS Not enough good replicas to write.",
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
]


@pytest.mark.parametrize("message", REFUSALS)
def test_a_redis_that_refuses_writes_is_unavailable(message):
    assert isinstance(_translate(redis.exceptions.ResponseError(message)), StreamsUnavailable)


@pytest.mark.parametrize("message", REFUSALS)
def test_a_refusal_inside_a_pipeline_is_unavailable_too(message):
    """redis-py rewrites a pipeline's error: ``... of pipeline caused error: ('NOREPLICAS ...',)``."""
    exc = redis.exceptions.ResponseError(message)
    exc.args = (f"Command # 1 (XADD runtime:job_results * game_id g1) of pipeline caused error: {exc.args}",)
    assert isinstance(_translate(exc), StreamsUnavailable)


@pytest.mark.parametrize("message", REFUSALS)
def test_a_transaction_refused_at_exec_is_unavailable_too(message):
    """The relay's batch is a MULTI/EXEC: a refusal that comes between the queueing and the EXEC is the
    EXEC's ``EXECABORT Transaction discarded because of: CODE ...`` (what Redis 7 answers)."""
    exc = redis.exceptions.ExecAbortError(f"Transaction discarded because of: {message}")
    assert isinstance(_translate(exc), StreamsUnavailable)
    assert isinstance(_translate(redis.exceptions.ExecAbortError("Transaction discarded because of previous "
                                                                 "errors.")), StreamsError)


def test_a_busygroup_or_an_unknown_error_is_not_an_outage():
    assert not isinstance(_translate(redis.exceptions.ResponseError("BUSYGROUP Consumer Group name already exists")),
                          StreamsUnavailable)
    assert isinstance(_translate(redis.exceptions.ResponseError("ERR syntax error")), StreamsError)
    assert isinstance(_translate(redis.exceptions.ResponseError("NOGROUP No such key")), GroupMissing)


def test_a_field_value_that_looks_like_a_code_does_not_make_an_outage():
    exc = redis.exceptions.ResponseError("ERR bad")
    exc.args = (f"Command # 1 (XADD s * reason NOREPLICAS) of pipeline caused error: {exc.args}",)
    assert isinstance(_translate(exc), StreamsError)


class ScriptRefusingClient:
    """A redis-py client whose EVAL answers with ``error``; XRANGE answers with two entries."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.evals = 0

    async def eval(self, *args):
        self.evals += 1
        raise redis.exceptions.ResponseError(self.error)

    async def xrange(self, stream, min="-", max="+", count=None):
        return [(b"1-0", {b"a": b"1"}), (b"2-0", {b"a": b"2"})]


@pytest.mark.parametrize("message", REFUSALS)
async def test_a_redis_refusing_for_a_while_is_an_outage_not_a_refusal_of_scripts(message):
    """A Redis that refuses commands for a while (BUSY with another script, LOADING, MASTERDOWN; the
    write refusals where scripts count as writes) refuses EVAL too: that is an outage (retry), and the
    scripts are used again once it is over, not given up for the rest of the process. Before, every
    refusal but a ReadOnlyError (which redis-py raises for READONLY) gave them up."""
    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="c")
    streams.client = ScriptRefusingClient(message)
    with pytest.raises(StreamsUnavailable):
        await streams.range_ids("s", "-")
    with pytest.raises(StreamsUnavailable):
        await streams.recent_field("s", 10, "result_id")
    assert streams._scripts and streams.client.evals == 2


async def test_a_server_that_refuses_scripts_gets_plain_reads_from_then_on():
    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="c")
    streams.client = ScriptRefusingClient("NOPERM this user has no permissions to run the 'eval' command")
    assert await streams.range_ids("s", "-") == ["1-0", "2-0"]
    assert await streams.range_ids("s", "-") == ["1-0", "2-0"]
    assert streams.client.evals == 1  # refused once: not asked again


async def _refusing_redis(refuse_on_first: bytes):
    """A RESP server on 127.0.0.1: the first connection answers ``refuse_on_first`` to every command but a
    handshake's (a primary demoted to a replica behind the same name); later ones answer as a primary would
    for a read of nothing. Returns the server and the list of connections it took."""
    import asyncio
    conns: list[int] = []

    async def handle(reader, writer):
        conns.append(1)
        first = len(conns) == 1
        while line := await reader.readline():
            args = []
            for _ in range(int(line[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2])
            cmd = args[0].upper()
            if cmd == b"PING":
                writer.write(b"+PONG\r\n")
            elif cmd == b"HELLO":  # RESP3
                writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            elif cmd in (b"CLIENT", b"SELECT"):
                writer.write(b"+OK\r\n")
            elif first:
                writer.write(refuse_on_first)
            else:
                writer.write(b"_\r\n")  # XREADGROUP: nothing new
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, conns


@pytest.mark.parametrize("refusal", [b"-READONLY You can't write against a read only replica.\r\n",
                                     b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is "
                                     b"set to 'no'.\r\n"])
async def test_a_demoted_primary_is_left_for_a_new_connection(refusal):
    """Red-team, stop 43: after a fail-over that moves the Redis name to the new primary (a managed Redis,
    a hand-run REPLICAOF), the old primary lives on as a replica. Its refusals are answers, not a broken
    connection, so the client kept its pooled connections to it and every read, acknowledgment and
    publication was refused until someone restarted the controller. A refusal that says the server is
    no primary now drops the pooled connections, so the next command resolves the name again."""
    server, conns = await _refusing_redis(refusal)
    port = server.sockets[0].getsockname()[1]
    streams = RedisStreams(f"redis://127.0.0.1:{port}/0", group="g", consumer="c")
    try:
        with pytest.raises(StreamsUnavailable):
            await streams.read_new(["a"], 10, None)
        assert await streams.read_new(["a"], 10, None) == []
        assert len(conns) == 2
    finally:
        await streams.close()
        server.close()
