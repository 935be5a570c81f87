"""The admin client reads the whole answer (up to its 64 KiB bound), not one buffer: aiohttp's
``read(n)`` returns what has arrived, so a valid status written in two pieces was taken for garbage,
and a valid first piece was believed whatever followed (found by a red-team reading)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from observed.engine import ADMIN_BODY_LIMIT, EngineClient
from observed.errors import EngineUnreachable
from tests.support.http import serve_local


async def serve(*pieces: bytes):
    async def handler(request):
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    return await serve_local("/admin/v1/status", handler)


async def status_of(*pieces: bytes):
    runner, port = await serve(*pieces)
    client = EngineClient(port=port, path="/healthz")
    try:
        return await client.status("127.0.0.1")
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_status_written_in_pieces_is_read_whole():
    st = await status_of(b'{"turn": 7, ', b'"phase": "idle", ', b'"last_generation": null}')
    assert (st.turn, st.phase) == (7, "idle")


async def test_a_valid_first_piece_followed_by_garbage_is_not_believed():
    with pytest.raises(EngineUnreachable):
        await status_of(b'{"turn": 7, "phase": "idle", "last_generation": null}', b"garbage")


async def test_an_answer_over_the_bound_in_pieces_is_refused():
    with pytest.raises(EngineUnreachable, match="larger than"):
        await status_of(b'{"turn": 7, "phase": "idle", "last_generation": null, "x": "',
                        b"y" * (ADMIN_BODY_LIMIT // 2), b"y" * (ADMIN_BODY_LIMIT // 2), b'"}')
