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

from tests.e2e.test_walking_skeleton import migrate
from tests.support import ControllerProcess, ResultReader

pytestmark = pytest.mark.e2e


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
