"""The health round's per-probe cost: N cheap local engines, one round = every engine probed once
(its admin status, as the health round does for an engine with an admin API), HEALTH_CONCURRENCY
at a time, through observed.engine.EngineClient.

    .venv/bin/python bench/probes.py --engines 1000 --rounds 5

The engines are one child process serving N ports on 127.0.0.1 (a minimal HTTP/1.1 server that
keeps connections alive, answers GET /healthz and GET /admin/v1/status), so their CPU is not the
controller's. Each row is one client configuration measured in this run, side by side: wall
seconds and controller CPU seconds per round (median over the rounds after a first, warm-up one),
and CPU microseconds per probe.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BODY = b'{"turn": 3, "phase": "idle", "last_generation": null}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


class Engine(asyncio.Protocol):
    accepted = 0

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        Engine.accepted += 1
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            close = b"connection: close" in head.lower()
            self.t.write(ANSWER)
            if close:
                self.t.close()
                return


async def serve(base: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    for i in range(n):
        await loop.create_server(Engine, "127.0.0.1", base + i, backlog=256)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def one_round(client, hosts: list[str], conc: int) -> None:  # type: ignore[no-untyped-def]
    sem = asyncio.Semaphore(conc)

    async def probe(h: str) -> None:
        async with sem:
            await client.status(h)

    await asyncio.gather(*(probe(h) for h in hosts))


async def measure(name: str, client, hosts: list[str], rounds: int, conc: int) -> dict:  # type: ignore[no-untyped-def]
    walls, cpus = [], []
    for r in range(rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        await one_round(client, hosts, conc)
        if r:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    await client.close()
    return {"name": name, "wall": statistics.median(walls), "cpu": statistics.median(cpus)}


async def main(args: argparse.Namespace) -> None:
    from controller.triggers import HEALTH_CONCURRENCY
    from observed.engine import EngineClient

    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve", "--engines", str(args.engines),
                                                "--base-port", str(args.base_port), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        await proc.stdout.readline()
        hosts = [f"127.0.0.1:{args.base_port + i}" for i in range(args.engines)]
        rows = []
        for _ in range(args.repeat):
            for keepalive in (False, True):
                client = EngineClient(port=0, path="/healthz", probe_keepalive=keepalive)
                rows.append(await measure("keep-alive" if keepalive else "new connection per probe", client, hosts,
                                          args.rounds, HEALTH_CONCURRENCY))
        print(f"{args.engines} engines, {args.rounds} rounds (+1 warm-up), concurrency {HEALTH_CONCURRENCY}")
        print(f"{'client':<28}{'wall s/round':>14}{'CPU s/round':>13}{'CPU us/probe':>14}")
        for r in rows:
            print(f"{r['name']:<28}{r['wall']:>14.3f}{r['cpu']:>13.3f}{r['cpu'] / args.engines * 1e6:>14.0f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="measure both clients this many times, interleaved")
    ap.add_argument("--base-port", type=int, default=47000)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    gc.collect()
    asyncio.run(serve(a.base_port, a.engines) if a.serve else main(a))
