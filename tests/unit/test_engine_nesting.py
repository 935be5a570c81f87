"""An engine's answer nested deeper than Python's JSON decoder goes (a few thousand levels: 10 KB, well
under the client's 64 KiB limit) is a bad answer of that engine, as garbage is: never an exception that
the health round, the turn path or the check before a disruption does not expect (RecursionError)."""

from __future__ import annotations

from observed.errors import EngineError
from tests.unit.test_engine_keepalive import Server, client  # noqa: F401  (the fixture)

NESTED = b'{"turn": ' + b"[" * 5000 + b"]" * 5000 + b', "phase": "idle"}'


async def test_a_status_nested_past_the_decoders_depth_fails_as_a_bad_answer(client):  # noqa: F811
    s = Server(NESTED)
    host = f"127.0.0.1:{await s.start()}"
    try:
        try:
            await client.status(host)
        except EngineError as exc:
            assert "RecursionError" not in str(exc)
        else:
            raise AssertionError("a status nested 5,000 deep was taken")
        for turn in (0, 7):  # the turn request reads its answer the same way
            try:
                await client.request_turn(host, turn)
            except EngineError:
                pass
    finally:
        await s.stop()
