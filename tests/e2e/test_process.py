"""The ``rtmanager`` process: configuration errors, graceful shutdown mid-action, no secrets in logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support import ControllerProcess, ResultReader, migrate


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("variable, value", [
    ("RTMANAGER_ENGINE_PORT", "http"),
    ("RTMANAGER_CONCURRENCY", "0"),
    ("RTMANAGER_IMAGE_ALLOWLIST", " , "),
    ("RTMANAGER_STATE_ROOT", "relative/path"),
    ("RTMANAGER_START_TIMEOUT", "soon"),
])
def test_a_bad_value_stops_start_up_with_one_line_naming_it(variable, value):
    out = cli("run", env={variable: value})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], out.stderr


def test_secrets_never_reach_the_output(rtm_env, tmp_path):
    password, token = "s3cr3t-pa55word", "tok-" + "x" * 28
    bad = cli("status", env={"RTMANAGER_DATABASE_URL": f"mysql://rtm:{password}@db/x"})
    assert bad.returncode == 2 and password not in bad.stderr
    bad = cli("run", env={"RTMANAGER_API_TOKEN": "short-secret"})
    assert bad.returncode == 2 and "short-secret" not in bad.stderr

    dsn = rtm_env["RTMANAGER_DATABASE_URL"].replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    env = {**rtm_env, "RTMANAGER_DATABASE_URL": dsn, "RTMANAGER_API_TOKEN": token, "RTMANAGER_LOG_LEVEL": "DEBUG",
           "RTMANAGER_LOG_FORMAT": "json"}
    migrate(env)
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    results = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    try:
        results.for_entry(r.xadd(env["RTMANAGER_STOP_STREAM"], {"game_id": "nobody", "reason": "cancelled"}))
    finally:
        assert ctl.stop() == 0
        r.close()
        results.close()
    log = ctl.log()
    assert '"msg": "starting"' in log and "***@" in log
    assert password not in log and token not in log
    doctor = cli("doctor", env=env)
    assert password not in doctor.stdout + doctor.stderr


def test_sigterm_mid_action_exits_zero_and_the_next_run_finishes_the_job(rtm_env, tmp_path, docker_client):
    env = {**rtm_env, "RTMANAGER_START_TIMEOUT": "4", "RTMANAGER_LEASE_TTL": "2"}
    migrate(env)
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    results = ResultReader(env["RTMANAGER_REDIS_URL"], env["RTMANAGER_RESULTS_STREAM"])
    r = redis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    try:
        # An engine that never answers keeps a worker busy in its health wait.
        entry = r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": "term-1", "image_ref": "galaxy/engine-stub:mute"})
        deadline = time.monotonic() + 20
        while not docker_client.containers.list(filters={"name": "galaxy-game-term-1"}):
            assert time.monotonic() < deadline, ctl.log()[-2000:]
            time.sleep(0.1)
        t0 = time.monotonic()
        assert ctl.stop(signal.SIGTERM, timeout=30) == 0, ctl.log()[-2000:]
        assert time.monotonic() - t0 < 20  # bounded: SHUTDOWN_DRAIN plus closing
        ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
        res = results.for_entry(entry, timeout=40)
        assert res["outcome"] == "failure" and res["error_code"] == "engine_unhealthy"
        assert len(docker_client.containers.list(all=True, filters={"name": "galaxy-game-term-1"})) == 1
    finally:
        ctl.stop()
        r.close()
        results.close()


def test_env_lists_every_variable():
    out = cli("env")
    assert out.returncode == 0
    names = [line.split("=", 1)[0] for line in out.stdout.splitlines()]
    from controller.config import VARIABLES
    assert names == [v.name for v in VARIABLES]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [n for n in names if n not in readme and n.replace("RTMANAGER_", "_") not in readme]
    assert not missing, f"variables not documented in the README: {missing}"


def test_a_database_of_another_instance_is_refused(rtm_env, tmp_path):
    migrate(rtm_env)
    first = ControllerProcess(rtm_env, tmp_path / "first.log").start()
    deadline = time.monotonic() + 30
    while "elected leader" not in first.log():  # it has claimed the database for its instance
        assert time.monotonic() < deadline, first.log()[-2000:]
        time.sleep(0.1)
    assert first.stop() == 0, first.log()[-2000:]
    other = {**rtm_env, "RTMANAGER_INSTANCE": rtm_env["RTMANAGER_INSTANCE"] + "-other", "RTMANAGER_LOG_FORMAT": "text"}
    out = subprocess.run([sys.executable, "-m", "controller.cli", "run"], env={**os.environ, **other},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"belongs to instance '{rtm_env['RTMANAGER_INSTANCE']}'" in out.stderr
    assert "RTMANAGER_INSTANCE" in out.stderr



def test_a_state_root_of_another_instance_is_refused(rtm_env):
    """A state root claimed by another instance (its .rtmanager-instance): exit 2, one line naming the
    variable and the owner; the claim is left as it was."""
    migrate(rtm_env)
    root = Path(rtm_env["RTMANAGER_STATE_ROOT"])
    root.mkdir(parents=True, exist_ok=True)
    (root / ".rtmanager-instance").write_text("someone-else\n")
    out = subprocess.run([sys.executable, "-m", "controller.cli", "run"],
                         env={**os.environ, **rtm_env, "RTMANAGER_LOG_FORMAT": "text"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = [x for x in out.stderr.splitlines() if "belongs to instance someone-else" in x]
    assert "RTMANAGER_INSTANCE" in line
    assert (root / ".rtmanager-instance").read_text() == "someone-else\n"

# Issue 21, defect 11: a SIGTERM that came before the handler was installed killed the process
# (exit status -15). The handlers are the first thing the process installs, before the heavy
# imports and the event loop; a signal that comes meanwhile is honoured once start-up can stop.
EARLY_SIGNAL = """
import os, signal, sys
at = sys.argv[1]
class SignalDuringImport:
    def find_spec(self, name, path=None, target=None):
        if name == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, SignalDuringImport())
sys.argv = [os.path.join(os.path.dirname(sys.executable), "rtmanager"), "run"]
from controller.cli import main
main()
"""


@pytest.mark.parametrize("during", ["asyncio", "controller.config", "desired.jobs", "controller.logs",
                                    "controller.app", "asyncpg", "aiohttp", "docker"])
def test_a_sigterm_during_the_imports_of_start_up_exits_0(rtm_env, during):
    out = subprocess.run([sys.executable, "-c", EARLY_SIGNAL, during], env={**os.environ, **rtm_env},
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True  # it ended: its exit status tells
    caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_a_sigterm_as_early_as_the_process_can_catch_it_exits_0_every_time(rtm_env, tmp_path):
    """SIGTERM right after spawn: as soon as the process has a handler (polled in /proc), and at a
    few moments later in start-up (imports, Postgres, the first campaign). Exit status 0 each time.
    (A signal during the interpreter's own bootstrap, before any of rtmanager's code runs, is
    beyond any program's reach.)"""
    migrate(rtm_env)
    for n, extra in enumerate([0.0, 0.0, 0.0, 0.0, 0.01, 0.03, 0.1, 0.3]):
        ctl = ControllerProcess(rtm_env, tmp_path / f"early-{n}.log").start()
        assert ctl.proc is not None
        deadline = time.monotonic() + 20
        while not _catches_sigterm(ctl.proc.pid):
            assert time.monotonic() < deadline, "no SIGTERM handler within 20 s"
            time.sleep(0.0005)
        if extra:
            time.sleep(extra)  # the moment to signal, not a wait for a condition
        code = ctl.stop(timeout=30)
        assert code == 0, (n, extra, code, ctl.log()[-2000:])
