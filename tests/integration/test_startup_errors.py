"""Start-up stops with one line naming what is wrong, never a traceback (red-team, stop 43)."""

from __future__ import annotations

import socket

from tests.support.services import cli


def test_a_port_already_taken_stops_start_up_with_one_line(rtm_env):
    """An HTTP port another process holds (a second copy started by mistake, a stale one) ended start-up
    with a 30-line traceback from inside aiohttp."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        out = cli({**rtm_env, "RTMANAGER_HTTP_PORT": str(port), "RTMANAGER_HTTP_HOST": "127.0.0.1"}, "run")
    finally:
        held.close()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if "RTMANAGER_HTTP_PORT" in line]
    assert len(lines) == 1 and f"127.0.0.1 port {port}" in lines[0], out.stderr


def test_a_database_url_the_driver_refuses_stops_start_up_at_once_with_one_line(rtm_env):
    """``sslmode=bogus`` was taken for Postgres being away: start-up waited for it, then said it could not
    reach it."""
    url = rtm_env["RTMANAGER_DATABASE_URL"] + "?sslmode=bogus"
    out = cli({**rtm_env, "RTMANAGER_DATABASE_URL": url}, "run")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "cannot reach" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if "RTMANAGER_DATABASE_URL" in line]
    assert len(lines) == 1 and "sslmode" in lines[0], out.stderr
