"""The test harness signals a private dockerd by the pid in its pidfile only while that pid is still that
dockerd (tests/support/services.py): a stale pidfile's number may be any process's by then."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.support.services import pid_running


def test_a_pid_is_taken_only_while_it_runs_the_command_it_was_written_for():
    needle = "/run/rtm-dockerd-test/docker.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--pidfile", needle])
    try:
        deadline = time.monotonic() + 10
        while pid_running(proc.pid, needle) is None:  # until the child has exec'd its command
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        assert pid_running(os.getpid(), needle) is None  # the number, reused by another process
    finally:
        proc.kill()
        proc.wait()
    assert pid_running(proc.pid, needle) is None  # gone
