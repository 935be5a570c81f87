"""In-process controllers on one isolated test environment, a reader of its results stream, and a
wait until a controller has nothing left to do (``settled``)."""

from __future__ import annotations

import asyncio
import time

import docker
import redis.asyncio as aioredis

from controller.app import Controller
from controller.config import Settings
from tests.support.waits import eventually


class Harness:
    """Starts and stops in-process controllers on one isolated environment."""

    def __init__(self, env: dict[str, str], docker_client: docker.DockerClient) -> None:
        self.env = env
        self.docker = docker_client
        self.running: list[tuple[Controller, asyncio.Task]] = []
        self.redis = aioredis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
        self.last_result = "0-0"
        self.results: list[dict[str, str]] = []

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env({**self.env, **{f"RTMANAGER_{k.upper()}": v for k, v in overrides.items()}})

    async def start(self, **overrides: str) -> Controller:
        # Replicas of one instance need names of their own (a replica takes back a lease held under
        # its own name at once); a controller started again after stop_all is a new replica.
        self.started = getattr(self, "started", 0) + 1
        overrides.setdefault("consumer_name", f"replica-{self.started}")
        ctl = Controller(self.settings(**overrides))
        await ctl.start()
        task = asyncio.create_task(ctl.run_until_stopped(handle_signals=False))
        self.running.append((ctl, task))
        return ctl

    async def stop_all(self) -> None:
        for ctl, task in reversed(self.running):
            ctl.stopping.set()
            assert await asyncio.wait_for(task, 40) == 0
        self.running.clear()

    async def submit_start(self, game: str, image: str = "galaxy/engine-stub:1.0") -> str:
        return await self.redis.xadd(self.env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": image})

    async def submit_stop(self, game: str, reason: str = "cancelled") -> str:
        return await self.redis.xadd(self.env["RTMANAGER_STOP_STREAM"], {"game_id": game, "reason": reason})

    async def result(self, entry_id: str, job: str = "start", timeout: float = 30) -> dict[str, str]:
        return await self.stream_result(lambda r: r["job_entry_id"] == entry_id and r["job"] == job, timeout,
                                        f"{job} result for {entry_id}")

    async def stream_result(self, predicate, timeout: float = 30, what: str = "result") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.results:
                if predicate(r):
                    return r
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the results stream in {timeout}s; got {self.results}")
            reply = await self.redis.xread({self.env["RTMANAGER_RESULTS_STREAM"]: self.last_result}, block=200)
            for _, entries in reply or []:
                for eid, fields in entries:
                    self.last_result = eid
                    self.results.append(fields)

    def containers(self, game: str) -> list[docker.models.containers.Container]:
        return self.docker.containers.list(all=True, filters={"label": f"com.galaxy.game-id={game}"})


async def settled(ctl: Controller, *, horizon: float, timeout: float = 30.0) -> None:
    """Until ``ctl``'s reconciler has nothing left to do within ``horizon`` seconds: no key queued,
    none being worked on, no retry or poll timer due sooner. Until a new trigger (a job, an event,
    a resync, a health round), nothing changes by the controller's own doing, so a test can assert
    at once that something did not happen, instead of sleeping and hoping it would have by then."""
    queue = ctl.queue
    loop = asyncio.get_running_loop()

    def idle() -> bool:
        soon = [t for t in queue._timers.values() if t.when() - loop.time() < horizon]
        return len(queue) == 0 and queue.processing == 0 and not soon

    await eventually(idle, timeout, f"the reconciler idle for {horizon:g}s",
                     detail=lambda: f"queued {len(queue)}, processing {queue.processing}, "
                                    f"timers {sorted(t.when() - loop.time() for t in queue._timers.values())}")
