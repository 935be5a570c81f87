"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


class ResultReader:
    """Reads the results stream from the start, as Lobby would."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.stream = stream
        self.last = "0-0"
        self.seen: list[dict[str, str]] = []

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "result") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for fields in self.seen:
            if predicate(fields):
                return fields
        while time.monotonic() < deadline:
            reply = self.r.xread({self.stream: self.last}, count=100, block=200)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    self.seen.append(fields)
                    if predicate(fields):
                        return fields
        raise AssertionError(f"no {what} within {timeout}s; results so far: {self.seen}")

    def for_entry(self, entry_id: str, timeout: float = 30.0) -> dict[str, str]:
        return self.wait_for(lambda f: f.get("job_entry_id") == entry_id, timeout, f"result for {entry_id}")

    def close(self) -> None:
        self.r.close()


class ControllerProcess:
    """``rtmanager run`` as a subprocess, with its log kept for failure messages."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> ControllerProcess:
        exe = Path(sys.executable).with_name("rtmanager")
        cmd = [str(exe), "run"] if exe.exists() else [sys.executable, "-m", "controller.cli", "run"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)
