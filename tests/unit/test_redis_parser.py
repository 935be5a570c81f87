"""The Redis adapter reads replies with hiredis, redis-py's C parser.

A flood is tens of thousands of stream entries read back: with redis-py's pure-Python parser,
reading 20,000 job entries costs about 0.9 s of CPU on this machine, with hiredis about 0.03 s
(bench/README.md, "The flood"). A dependency that silently went missing would bring the flood's
rate back down without failing anything else, so its absence fails here.
"""

from __future__ import annotations

from redis._parsers import _AsyncHiredisParser

from controller.streams import RedisStreams


def test_the_adapter_parses_replies_with_hiredis():
    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="c")  # never connects
    connection = streams.client.connection_pool.make_connection()
    assert isinstance(connection._parser, _AsyncHiredisParser)
