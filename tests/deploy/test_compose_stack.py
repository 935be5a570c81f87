"""deploy/compose.yaml brought up for real, with the images deploy/images/build.sh makes here.

One stack of its own (compose project, RTMANAGER_INSTANCE, engine network and state root
all named ``rtm-deploy-<random>``; ports published on 127.0.0.1 only): a start job sent
through the stack's Redis becomes a running engine container and a success result,
Prometheus in the stack scrapes rtmanager, rtmanager runs as uid 10001 with the Docker
socket's group and no capabilities, and a stop job stops the engine. Everything the test
created (engine containers, the stack with its volumes and networks, the state root) is
removed in any case; the images are kept (build.sh caches them).

Run by ``deploy/test-deploy.sh``, which installs what is needed first. The test takes about
25 s with the images built (the build script it calls is then a no-op), plus about 2.5 min
when the images are built from nothing. Nothing here skips: a missing tool or image fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import docker
import pytest

from tests.support import ROOT, free_port, wait_for, xrange_json_results

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
BUILD_SCRIPT = ROOT / "deploy" / "images" / "build.sh"
STUB_IMAGE = "galaxy/engine-stub:1.0"
RTM_UID = 10001
IMAGES = ("rtmanager:0.1.0", "rtmanager-postgres:15", "rtmanager-redis:7", "rtmanager-prometheus:2.42")


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) when present, else Debian's docker-compose 1.29."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed: run deploy/test-deploy.sh "
                "(it installs Debian's docker-compose)", pytrace=False)


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", url  # loopback only
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def reachable_from(container, host: str, port: int) -> bool:
    """A TCP connection from inside ``container`` (busybox nc) to ``host:port`` succeeds."""
    code, _ = container.exec_run(["sh", "-c", 'nc -w 2 "$1" "$2" </dev/null >/dev/null 2>&1', "sh", host, str(port)])
    return code == 0


class Stack:
    def __init__(self) -> None:
        self.name = f"rtm-deploy-{secrets.token_hex(4)}"
        self.compose = compose_command()
        # Not under /tmp (the rtmanager container has a tmpfs there).
        self.workdir = Path("/var/tmp") / self.name
        self.state_root = self.workdir / "games"
        self.docker_gid = os.stat("/var/run/docker.sock").st_gid
        self.http_port, self.prom_port = free_port(), free_port()
        self.token = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "DOCKER_GID": str(self.docker_gid),
            "RTMANAGER_API_TOKEN": self.token,
            "POSTGRES_PASSWORD": secrets.token_hex(12),
            "RTMANAGER_STATE_ROOT": str(self.state_root),
            "RTMANAGER_DOCKER_NETWORK": f"{self.name}-games",
            "RTMANAGER_INSTANCE": self.name,
            "RTMANAGER_HTTP_PUBLISH": f"127.0.0.1:{self.http_port}",
            "PROMETHEUS_PUBLISH": f"127.0.0.1:{self.prom_port}",
            "RTMANAGER_LOG_LEVEL": "DEBUG",
        }
        self.env.pop("COMPOSE_PROJECT_NAME", None)
        self.env.pop("COMPOSE_FILE", None)
        self.client = docker.from_env()

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.compose, "-p", self.name, "-f", str(COMPOSE_FILE), *args], env=self.env,
                             capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and out.returncode != 0:
            pytest.fail(f"compose {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}",
                        pytrace=False)
        return out

    def container(self, service: str):
        found = self.client.containers.list(all=True, filters={
            "label": [f"com.docker.compose.project={self.name}", f"com.docker.compose.service={service}"]})
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def redis_cli(self, *args: str) -> str:
        out = subprocess.run(["docker", "exec", self.container("redis").id, "redis-cli", *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def results(self) -> list[dict[str, str]]:
        """The whole results stream, read through the stack's Redis."""
        return xrange_json_results(self.redis_cli("--json", "XRANGE", "runtime:job_results", "-", "+"))

    def result_for(self, entry_id: str, timeout: float) -> dict[str, str]:
        return wait_for(f"result of job entry {entry_id}",
                        lambda: next((r for r in self.results() if r.get("job_entry_id") == entry_id), None),
                        timeout, detail=self.logs)

    def prom_value(self, query: str) -> str | None:
        status, body = http_get(f"http://127.0.0.1:{self.prom_port}/api/v1/query?"
                                + urllib.parse.urlencode({"query": query}))
        data = json.loads(body) if status == 200 else {}
        result = data.get("data", {}).get("result", [])
        return result[0]["value"][1] if result else None

    def logs(self) -> str:
        out = self.run("logs", "--no-color", "--tail", "40", check=False, timeout=60)
        return (out.stdout + out.stderr)[-6000:]

    def engines(self):
        return self.client.containers.list(all=True, filters={"label": f"com.galaxy.instance={self.name}"})

    def teardown(self) -> list[str]:
        """Remove everything this stack made; returns what could not be removed."""
        problems: list[str] = []
        # The controller first, so that it recreates no engine while they are removed.
        self.run("stop", "-t", "30", "rtmanager", check=False)
        for c in self.engines():
            try:
                c.remove(force=True)
            except docker.errors.APIError as exc:
                problems.append(f"engine {c.name}: {exc}")
        down = self.run("down", "-v", "--remove-orphans", "-t", "30", check=False, timeout=180)
        if down.returncode != 0:
            problems.append(f"compose down: {down.stderr[-2000:]}")
        for net in self.client.networks.list(names=[self.env["RTMANAGER_DOCKER_NETWORK"]]):
            if net.name == self.env["RTMANAGER_DOCKER_NETWORK"]:
                try:
                    net.remove()
                except docker.errors.APIError as exc:
                    problems.append(f"network {net.name}: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.client.close()
        return problems


@pytest.fixture
def stack():
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("dockerd does not answer: start it (deploy/local/services.sh up)", pytrace=False)
    # The images, from this checkout: a no-op when nothing changed since the last build.
    build = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"deploy/images/build.sh failed:\n{build.stderr[-5000:]}"
    client = docker.from_env()
    try:
        for image in (*IMAGES, STUB_IMAGE):
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                if image != STUB_IMAGE:
                    pytest.fail(f"{image} is missing after deploy/images/build.sh", pytrace=False)
                out = subprocess.run(["bash", str(ROOT / "deploy" / "engine-stub" / "build.sh")],
                                     capture_output=True, text=True, timeout=600)
                assert out.returncode == 0, f"deploy/engine-stub/build.sh failed:\n{out.stderr}"
    finally:
        client.close()

    s = Stack()
    try:
        # The state root must exist, owned by rtmanager's uid, before the daemon bind-mounts it
        # (the daemon would create it owned by root).
        s.workdir.mkdir(mode=0o755)
        s.state_root.mkdir(mode=0o711)
        os.chown(s.state_root, RTM_UID, RTM_UID)
        yield s
    finally:
        problems = s.teardown()
        assert not problems, f"cleanup of {s.name} left things behind: {problems}"


def test_start_job_through_the_compose_stack(stack: Stack) -> None:
    game = f"deploy-{secrets.token_hex(4)}"
    stack.run("up", "-d", timeout=300)

    # Ready: Postgres, Redis and the Docker socket all answer rtmanager inside its container.
    base = f"http://127.0.0.1:{stack.http_port}"
    ready = wait_for("rtmanager /readyz", lambda: (lambda r: r[0] == 200 and json.loads(r[1]))(http_get(
        f"{base}/readyz")), timeout=180, detail=stack.logs)
    assert ready["ready"] is True and ready["checks"] == {"docker": "ok", "redis": "ok", "postgres": "ok",
                                                          "relay": "ok", "state_storage": "ok",
                                                          "loops": "ok"}, ready

    # rtmanager runs as uid 10001 with the socket's group, no capabilities, read-only root.
    rtm = stack.container("rtmanager")
    assert rtm.attrs["Config"]["User"] == f"{RTM_UID}:{RTM_UID}"
    host = rtm.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert str(stack.docker_gid) in host["GroupAdd"]
    top = rtm.top(ps_args="-eo pid,uid,gid,args")
    uid_col, cmd_col = top["Titles"].index("UID"), top["Titles"].index("COMMAND")
    assert top["Processes"] and all(p[uid_col] == str(RTM_UID) for p in top["Processes"]), top
    assert any("rtmanager run" in p[cmd_col] for p in top["Processes"]), top
    exit_code, status = rtm.exec_run(["sh", "-c", "grep -E '^(Uid|Groups|CapEff):' /proc/1/status"])
    status = status.decode()
    assert exit_code == 0, status
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status.splitlines()}
    assert set(fields["Uid"]) == {str(RTM_UID)}, status
    assert str(stack.docker_gid) in fields["Groups"], status
    assert int(fields["CapEff"][0], 16) == 0, status

    # A start job through the stack's Redis becomes an engine container and a success result.
    entry = stack.redis_cli("XADD", "runtime:start_jobs", "*", "game_id", game, "image_ref", STUB_IMAGE)
    res = stack.result_for(entry, timeout=120)
    assert res["outcome"] == "success", (res, stack.logs())
    assert res["job"] == "start" and res["game_id"] == game and res["error_code"] == ""
    assert res["engine_endpoint"] == f"http://galaxy-game-{game}:8080"
    assert len(res["container_id"]) == 64

    engine = stack.client.containers.get(res["container_id"])
    assert engine.name == f"galaxy-game-{game}"
    assert engine.status == "running"
    labels = engine.attrs["Config"]["Labels"]
    assert labels["com.galaxy.managed-by"] == "rtmanager" and labels["com.galaxy.instance"] == stack.name
    assert list(engine.attrs["NetworkSettings"]["Networks"]) == [stack.env["RTMANAGER_DOCKER_NETWORK"]]
    # The state directory rtmanager made inside its container is the host's (same path both sides).
    mounts = engine.attrs["Mounts"]
    assert [m["Source"] for m in mounts if m["Type"] == "bind"] == [str(stack.state_root / game)]
    st = (stack.state_root / game).stat()
    assert (st.st_uid, st.st_mode & 0o777) == (RTM_UID, 0o700)
    assert engine.attrs["Config"]["User"] == f"{RTM_UID}:{RTM_UID}"

    # From inside the engine, Postgres, Redis, Prometheus and rtmanager's API are out of reach, by name and
    # at every address they have, and so is the API's published port on the game network's gateway (the
    # host); the engine's own port answers, so the probe itself works.
    assert reachable_from(engine, "127.0.0.1", 8080)
    for service, port in (("postgres", 5432), ("redis", 6379), ("rtmanager", 8090), ("prometheus", 9090)):
        networks = stack.container(service).attrs["NetworkSettings"]["Networks"]
        for host in (service, *[n["IPAddress"] for n in networks.values() if n.get("IPAddress")]):
            assert not reachable_from(engine, host, port), f"the engine reaches {service} at {host}:{port}"
    gateway = stack.client.networks.get(stack.env["RTMANAGER_DOCKER_NETWORK"]).attrs["IPAM"]["Config"][0]["Gateway"]
    assert not reachable_from(engine, gateway, stack.http_port)

    # The REST API answers on the published loopback port, with the token only.
    assert http_get(f"{base}/api/v1/runtimes/{game}")[0] == 401
    status_code, body = http_get(f"{base}/api/v1/runtimes/{game}", token=stack.token)
    assert status_code == 200 and game in body, body

    # Prometheus in the stack scrapes rtmanager (target up, and rtmanager's own gauge).
    wait_for("Prometheus target up{job=\"rtmanager\"} == 1",
             lambda: stack.prom_value('up{job="rtmanager"}') == "1", timeout=90, interval=1)
    wait_for("rtmanager_leader scraped by Prometheus",
             lambda: stack.prom_value('rtmanager_leader{job="rtmanager"}') == "1", timeout=60, interval=1)
    # It loaded the alert rules (deploy/prometheus/alerts.yml) and evaluates every one of them.
    def alert_rules() -> list[dict]:
        status, body = http_get(f"http://127.0.0.1:{stack.prom_port}/api/v1/rules?type=alert")
        return [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]] if status == 200 else []

    wait_for("the alert rules loaded and evaluated",
             lambda: (lambda rules: "RtmanagerNoLeader" in {r["name"] for r in rules}
                      and all(r["health"] == "ok" for r in rules))(alert_rules()), timeout=60, interval=1)

    # A stop job stops the engine and is answered.
    stop = stack.redis_cli("XADD", "runtime:stop_jobs", "*", "game_id", game, "reason", "finished")
    res = stack.result_for(stop, timeout=90)
    assert res["outcome"] == "success" and res["job"] == "stop" and res["error_code"] == "", res
    engine.reload()
    assert engine.status == "exited"
