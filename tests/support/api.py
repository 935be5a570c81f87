"""The REST API of in-process controllers: ``Api`` (a ``Harness`` with an HTTP client), the stub
images' names, and small helpers the integration tests share (a runtime's REST view, the stub
engine's own turn and control files, a game's snapshots)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import docker

from controller.app import Controller
from tests.support.harness import Harness
from tests.support.net import free_port

STUB_10 = "galaxy/engine-stub:1.0"
STUB_11 = "galaxy/engine-stub:1.1"
FAST = dict(engine_admin_path="/cgi-bin/admin/v1", health_interval="0.3", resync_interval="1")


class Api(Harness):
    """In-process controllers of one isolated environment, and an HTTP client for them."""

    def __init__(self, env: dict[str, str], docker_client: docker.DockerClient) -> None:
        self.token = secrets.token_hex(16)  # 32 characters
        assert len(self.token) == 32
        super().__init__({**env, "RTMANAGER_HTTP_HOST": "127.0.0.1", "RTMANAGER_API_TOKEN": self.token,
                          "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*,galaxy/engine:*"}, docker_client)
        self.port = 0
        self.session: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def start(self, leader: bool = True, **overrides: str) -> Controller:
        """A controller on a fresh free port; with ``leader`` wait until it leads."""
        port = free_port()
        ctl = await super().start(http_port=str(port), **overrides)
        task = self.running[-1][1]
        if not self.port:
            self.port = port
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        if leader:
            deadline = time.monotonic() + 15
            while not ctl.is_leader:
                assert time.monotonic() < deadline, "the controller did not become leader within 15s"
                assert not task.done(), f"the controller stopped: {task.result()}"
                await asyncio.sleep(0.05)
        return ctl

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.redis.aclose()

    async def request(self, method: str, path: str, *, port: int | None = None, auth: bool = True,
                      headers: dict[str, str] | None = None, **kwargs) -> tuple[int, Any, aiohttp.ClientResponse]:
        hdrs = {**(self.auth if auth else {}), **(headers or {})}
        url = f"http://127.0.0.1:{port or self.port}{path}"
        async with self.session.request(method, url, headers=hdrs, **kwargs) as resp:
            raw = await resp.read()
            body: Any = raw.decode()
            if resp.content_type == "application/json":
                body = json.loads(raw)
            return resp.status, body, resp

    async def get(self, path: str, **kwargs) -> tuple[int, Any]:
        status, body, _ = await self.request("GET", path, **kwargs)
        return status, body

    async def job(self, game: str, kind: str, body: Any = None, *, wait: float | None = None,
                  **kwargs) -> tuple[int, Any]:
        params = {"wait": str(wait)} if wait is not None else None
        status, resp_body, _ = await self.request("POST", f"/api/v1/runtimes/{game}/{kind}", json=body,
                                                  params=params, **kwargs)
        return status, resp_body


async def runtime(api: Api, game: str) -> dict:
    status, body = await api.get(f"/api/v1/runtimes/{game}")
    assert status == 200, body
    return body


def events(api: Api, game: str) -> list[str]:
    """What the stub engine recorded of its life in its state directory (boot, generated, interrupted, ...),
    the first word of each line."""
    path = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "events"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def engine_turn(api: Api, game: str) -> int:
    """The turn the engine itself keeps in its state directory."""
    raw = (Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "engine" / "status.json").read_text()
    return json.loads(raw)["turn"]


def control(api: Api, game: str, name: str, content: str = "") -> Path:
    """Write one of the stub engine's control files (its fault modes) into the game's state directory."""
    d = Path(api.env["RTMANAGER_STATE_ROOT"]) / game / "stub-control"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    (d / name).write_text(content)
    return d / name


async def snapshots(api: Api, game: str) -> list[dict[str, str]]:
    stream = api.env["RTMANAGER_SNAPSHOT_STREAM"]
    return [f for _, f in await api.redis.xrange(stream) if f["game_id"] == game]
