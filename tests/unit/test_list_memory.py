"""What a resync's container list costs in memory while it is read (observed/docker.py ``list_managed``).

At 100,000 units the daemon's answer is over 100 MiB of JSON. Decoded into one dict per container first
and turned into units after, every entry's dict (about 5 KiB each: names, networks, mounts, labels)
was alive at once: a resync's peak was about 7 KiB a container over what it keeps, and the process
held that peak (over 1 GiB at 100,000 simulated games) long after. Each entry is now turned into its
unit as soon as it is decoded, so the answer's text is the only large thing alive with the units.

The figures are tracemalloc's (Python's allocations), from the same answer each run: deterministic.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import requests

from observed import model as m
from observed.docker import DockerBackend

ROOT = Path(__file__).resolve().parents[2]
NETWORK = "galaxy-games"
N = 3000


def entry(i: int) -> dict:
    """One ``GET /containers/json`` entry of a running engine, as dockerd 20.10 writes it."""
    cid = secrets.token_hex(32)
    labels = {m.LABEL_MANAGED_BY: m.MANAGED_BY, m.LABEL_INSTANCE: "prod", m.LABEL_GAME_ID: f"game-{i}",
              m.LABEL_SPEC_HASH: "3f9a0c1b2d4e5f60", m.LABEL_GENERATION: "1", m.LABEL_DATABASE: "1d0c6e3a-7b2f",
              m.LABEL_EPOCH: "1", "org.opencontainers.image.title": "galaxy engine"}
    return {
        "Id": cid, "Names": [f"/galaxy-game-game-{i}"], "Image": "galaxy/engine:1.4.2",
        "ImageID": "sha256:" + "0" * 64, "Command": "/bin/engine", "Created": 1796460979, "Ports": [],
        "Labels": labels, "State": "running", "Status": "Up 3 hours", "HostConfig": {"NetworkMode": NETWORK},
        "NetworkSettings": {"Networks": {NETWORK: {
            "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": "a" * 64, "EndpointID": cid,
            "Gateway": "10.0.0.1", "IPAddress": f"10.0.{i >> 8 & 255}.{i & 255}", "IPPrefixLen": 16,
            "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
            "MacAddress": "02:42:0a:00:00:02", "DriverOpts": None}}},
        "Mounts": [{"Type": "bind", "Source": f"/var/lib/galaxy/games/game-{i}", "Destination": "/data",
                    "Mode": "", "RW": True, "Propagation": "rprivate"}],
    }


class Api:
    """docker-py's low-level client as far as the list call uses it: the answer's bytes, as they came."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def _url(self, path: str) -> str:
        return "http+docker://localhost/v1.41" + path

    def _get(self, url: str, **kwargs) -> requests.Response:
        res = requests.Response()
        res.status_code, res.url, res._content = 200, url, self.raw
        return res

    def _raise_for_status(self, res: requests.Response) -> None:
        res.raise_for_status()


class Client:
    def __init__(self, raw: bytes) -> None:
        self.api = Api(raw)

    def close(self) -> None:
        pass


def measured_list(raw: bytes) -> tuple[list, int, int]:
    """(the units, the list's peak of allocations over what was there before, what its result holds)."""
    backend = DockerBackend(instance="prod", network=NETWORK, pool_size=1)
    backend._client = Client(raw)
    try:
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            units = asyncio.run(backend.list_managed())
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        backend.close()
    return units, peak - base, current - base


def measured_in_a_fresh_process() -> dict:
    """The measure in a process of its own: tracemalloc counts every thread's allocations and the
    process's caches, so in the test process what ran before would move the figures."""
    code = ("import json; from tests.unit.test_list_memory import report; print(json.dumps(report()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report() -> dict:
    raw = json.dumps([entry(i) for i in range(N)]).encode()
    units, peak, kept = measured_list(raw)
    a, b = units[1], units[2]
    return {
        "units": len(units), "raw": len(raw), "peak": peak, "kept": kept,
        "game_7": units[7].game_id, "address_7": units[7].address,
        "shared": sorted(k for k in a.labels if next(k2 for k2 in b.labels if k2 == k) is k),
        "labels": sorted(a.labels), "image_shared": a.image is b.image, "state_shared": a.state is b.state,
        "instance_shared": a.labels[m.LABEL_INSTANCE] is b.labels[m.LABEL_INSTANCE],
        "has_dict": hasattr(a, "__dict__"),
    }


@pytest.fixture(scope="module")
def measured() -> dict:
    return measured_in_a_fresh_process()


def test_a_list_answer_is_read_an_entry_at_a_time(measured):
    m = measured
    assert m["units"] == N and m["game_7"] == "game-7" and m["address_7"] == "10.0.0.7"
    # The answer's text (a copy of its bytes) and the units, and little else: an answer decoded whole
    # first holds every entry's dict too (five times the answer's size).
    transient = m["peak"] - m["kept"]
    assert transient < 1.5 * m["raw"], (
        f"reading a list of {N} containers peaked {transient / N:.0f} bytes a container over what it keeps "
        f"(the answer is {m['raw'] / N:.0f} bytes a container)")


def test_a_unit_from_the_list_holds_no_copy_of_what_every_unit_shares(measured):
    m = measured
    # The label names, the image and the state are one string for all units, not one per unit.
    assert m["shared"] == m["labels"]
    assert m["image_shared"] and m["state_shared"] and m["instance_shared"]
    assert not m["has_dict"], "a unit has slots, not a dict of its fields"
    assert m["kept"] / N < 1100, f"a unit from the list keeps {m['kept'] / N:.0f} bytes"
