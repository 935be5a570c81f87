"""rtmanager as a Swarm service, deployed with deploy/swarm/stack.yaml, managing engines as services.

On the session's one-node swarm (a private dockerd in a namespace of its own, tests/swarm/nodes.py):
the images of deploy/images/build.sh are built (cached) on the machine's dockerd and loaded into
the node, deploy/swarm/prepare.sh prepares the node (label, state root, the engines' overlay), and
the stack (Postgres, Redis, rtmanager) is deployed under a name of its own. rtmanager reaches the
engines by hostname over the overlay (RTMANAGER_PROBE_ADDRESS=hostname); the test reaches
rtmanager's API (which the stack does not publish) and Redis through `docker exec`.

Scenarios: the walking skeleton (two starts, the services as they should be, one stop), drift (a
task killed from outside is restarted), crash loops (an engine that exits at once; a running
engine that keeps crashing, given up at the crash limit), and kill -9 of rtmanager's container
(Swarm starts another; nothing is duplicated, nothing lost). The stack, the engines, the network,
the volumes and the state root are removed whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import docker
import pytest

from tests.support import ROOT, wait_for, xrange_json_results

STACK_FILE = ROOT / "deploy" / "swarm" / "stack.yaml"
PREPARE = ROOT / "deploy" / "swarm" / "prepare.sh"
BUILD = ROOT / "deploy" / "images" / "build.sh"
IMAGES = ("rtmanager:0.1.0", "rtmanager-postgres:15", "rtmanager-redis:7")
CRASH_LIMIT = 3


_HTTP_SCRIPT = """
import sys, urllib.error, urllib.request
path, token, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
headers = {"Authorization": "Bearer " + token} if token else {}
req = urllib.request.Request("http://127.0.0.1:8090" + path, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        code, body = resp.status, resp.read()
except urllib.error.HTTPError as exc:
    code, body = exc.code, exc.read()
except OSError:
    code, body = 0, b""
sys.stdout.write(str(code) + "\\n" + body.decode(errors="replace"))
"""


class Stack:
    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.node = cluster.manager
        self.name = f"rtm{secrets.token_hex(3)}"
        self.workdir = Path("/var/tmp") / f"rtm-swarm-e2e-{self.name}"
        self.state_root = self.workdir / "games"
        self.network = f"{self.name}-games"
        self.token = secrets.token_urlsafe(24)
        self.client = self.node.client(timeout=60)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RTMANAGER_", "DOCKER_"))},
            "DOCKER_HOST": self.node.host,
            "RTMANAGER_STATE_ROOT": str(self.state_root),
            "RTMANAGER_DOCKER_NETWORK": self.network,
            "RTMANAGER_INSTANCE": self.name,
            "RTMANAGER_API_TOKEN": self.token,
            "POSTGRES_PASSWORD": secrets.token_hex(12),
            "RTMANAGER_STOP_GRACE": "3",
            "RTMANAGER_CRASH_LIMIT": str(CRASH_LIMIT),
            "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1",  # where the stub engine serves it
            "RTMANAGER_LOG_LEVEL": "DEBUG",
        }

    # ------------------------------------------------------------------ plumbing
    def run(self, *cmd: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and out.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}", pytrace=False)
        return out

    def prepare_and_deploy(self) -> None:
        self.workdir.mkdir(mode=0o755)
        out = self.run("bash", str(PREPARE))
        for line in out.stdout.splitlines():
            assert line.startswith("export "), out.stdout
            key, _, value = line[len("export "):].partition("=")
            self.env[key] = value
        self.run("docker", "stack", "deploy", "--detach=true", "-c", str(STACK_FILE), self.name)

    def service(self, short: str) -> dict:
        return self.client.api.inspect_service(f"{self.name}_{short}")

    def running_task(self, service: str) -> dict | None:
        tasks = [t for t in self.client.api.tasks(filters={"service": service}) if t["Status"]["State"] == "running"]
        return tasks[0] if len(tasks) == 1 else None

    def container(self, service: str) -> str:
        task = wait_for(f"a running task of {service}", lambda: self.running_task(service), 60)
        return task["Status"]["ContainerStatus"]["ContainerID"]

    def http(self, path: str, token: bool = False, timeout: float = 5) -> tuple[int, str]:
        """A request to rtmanager's API from inside its own container (the stack publishes no port):
        (status, body), (0, "") when it does not answer or no task runs."""
        task = self.running_task(f"{self.name}_rtmanager")
        if task is None:
            return 0, ""
        try:
            _, out = self.client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"]).exec_run(
                ["python3", "-c", _HTTP_SCRIPT, path, self.token if token else "", str(timeout)])
        except docker.errors.APIError:
            return 0, ""
        status, _, body = out.decode(errors="replace").partition("\n")
        return (int(status) if status.isdigit() else 0), body

    def ready(self) -> dict | None:
        status, body = self.http("/readyz")
        return json.loads(body) if status == 200 else None

    def record(self, game: str) -> dict | None:
        status, body = self.http(f"/api/v1/runtimes/{game}", token=True)
        return json.loads(body) if status == 200 else None

    def redis_cli(self, *args: str) -> str:
        cid = self.container(f"{self.name}_redis")
        code, out = self.client.containers.get(cid).exec_run(["redis-cli", *args])
        assert code == 0, out
        return out.decode().strip()

    def start_job(self, game: str, image: str = "galaxy/engine-stub:1.0") -> str:
        return self.redis_cli("XADD", "runtime:start_jobs", "*", "game_id", game, "image_ref", image)

    def stop_job(self, game: str) -> str:
        return self.redis_cli("XADD", "runtime:stop_jobs", "*", "game_id", game, "reason", "finished")

    def results(self) -> list[dict[str, str]]:
        return xrange_json_results(self.redis_cli("--json", "XRANGE", "runtime:job_results", "-", "+"))

    def result_for(self, entry_id: str, timeout: float = 90) -> dict[str, str]:
        return wait_for(f"result of job entry {entry_id}",
                        lambda: next((r for r in self.results() if r.get("job_entry_id") == entry_id), None),
                        timeout, detail=self.logs)

    def logs(self) -> str:
        out = self.run("docker", "service", "logs", "--no-trunc", "--tail", "60", f"{self.name}_rtmanager",
                       check=False, timeout=60)
        return (out.stdout + out.stderr)[-8000:]

    def engines(self) -> list[dict]:
        return self.client.api.services(filters={"label": f"com.galaxy.instance={self.name}"})

    def events(self, game: str) -> list[str]:
        try:
            return [line.split()[0] for line in (self.state_root / game / "events").read_text().splitlines()]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ tear-down
    def teardown(self) -> list[str]:
        problems: list[str] = []
        # The controller first, so that it makes no engine while they are removed.
        controller = self.running_task(f"{self.name}_rtmanager")
        self.run("docker", "stack", "rm", self.name, check=False)
        stack_label = {"label": f"com.docker.stack.namespace={self.name}"}
        ours = {"label": f"com.galaxy.instance={self.name}"}
        try:
            if controller is not None:
                # Its service is gone (Swarm starts no other), so it need not stop gracefully: its graceful
                # stop here took 10-15 s of the 17-26 s this tear-down took (nothing asserts on it).
                try:
                    self.client.api.kill(controller["Status"]["ContainerStatus"]["ContainerID"])
                except docker.errors.APIError:
                    pass  # already gone
            # `stack rm` returns at once; rtmanager stops (and can no longer recreate an engine) later.
            wait_for("the stack's services and containers gone", lambda: not self.client.api.services(
                filters=stack_label) and not self.client.api.containers(all=True, filters=stack_label), 90)
            for svc in self.engines():
                self.client.api.remove_service(svc["ID"])
            wait_for("the engines' tasks and containers gone", lambda: not self.client.api.services(filters=ours)
                     and not self.client.api.tasks(filters=ours)
                     and not self.client.api.containers(all=True, filters=ours), 90)
            for net in (self.network, f"{self.name}_backend"):
                for n in self.client.networks.list(names=[net]):
                    if n.name == net:
                        wait_for(f"network {net} removed", lambda n=n: _removed(n), 60)
            for vol in (f"{self.name}_pgdata", f"{self.name}_redisdata"):
                for v in self.client.volumes.list(filters={"name": vol}):
                    if v.name == vol:
                        v.remove()
            node_id = self.node.node_id
            spec = self.client.api.inspect_node(node_id)
            labels = dict(spec["Spec"].get("Labels") or {})
            labels.pop("rtmanager.home", None)
            self.client.api.update_node(node_id, spec["Version"]["Index"], {**spec["Spec"], "Labels": labels})
        except BaseException as exc:  # noqa: BLE001 - reported, the rest goes on
            problems.append(f"{exc.__class__.__name__}: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.client.close()
        return problems


def _removed(network) -> bool:
    try:
        network.remove()
        return True
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError:
        return False  # endpoints still being released


@pytest.fixture(scope="module")
def stack(swarm1):
    build = subprocess.run(["bash", str(BUILD), "rtmanager", "postgres", "redis"], capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, f"deploy/images/build.sh failed:\n{build.stderr[-5000:]}"
    swarm1.load_images(*IMAGES)
    s = Stack(swarm1)
    try:
        s.prepare_and_deploy()
        ready = wait_for("rtmanager ready and leading, on the node",
                         lambda: (lambda r: r if r and r["leader"] else None)(s.ready()), 180, detail=s.logs)
        assert ready["ready"] is True and ready["leader"] is True, ready
        assert ready["checks"] == {"docker": "ok", "redis": "ok", "postgres": "ok", "relay": "ok",
                                   "state_storage": "ok", "loops": "ok"}, ready
        yield s
    finally:
        problems = s.teardown()
        assert not problems, f"cleanup of stack {s.name} left things behind: {problems}"


def test_walking_skeleton(stack: Stack):
    """Two starts, the services they made, one stop."""
    games = [f"ws-a-{stack.name}", f"ws-b-{stack.name}"]
    entries = [stack.start_job(g) for g in games]
    results = [stack.result_for(e) for e in entries]
    network = stack.client.api.inspect_network(stack.network)
    gid = int(stack.env["DOCKER_GID"])
    node_id = stack.node.node_id
    for game, res in zip(games, results, strict=True):
        assert res["outcome"] == "success" and res["error_code"] == "", (res, stack.logs())
        assert res["engine_endpoint"] == f"http://galaxy-game-{game}:8080"
        svc = stack.client.api.inspect_service(res["container_id"])  # the unit id is the service's
        spec = svc["Spec"]
        task = spec["TaskTemplate"]
        cs = task["ContainerSpec"]
        assert spec["Name"] == cs["Hostname"] == f"galaxy-game-{game}"
        labels = spec["Labels"]
        assert labels["com.galaxy.managed-by"] == "rtmanager" and labels["com.galaxy.instance"] == stack.name
        assert labels["com.galaxy.game-id"] == game and labels["com.galaxy.spec-hash"]
        assert labels["com.galaxy.database"] and int(labels["com.galaxy.epoch"]) >= 1
        assert cs["Labels"] == labels
        assert [n["Target"] for n in task["Networks"]] == [network["Id"]]
        assert network["Driver"] == "overlay" and network["Attachable"] is True
        assert spec["Mode"] == {"Replicated": {"Replicas": 1}} and spec["EndpointSpec"]["Mode"] == "dnsrr"
        assert task["RestartPolicy"]["Condition"] == "none" and spec["UpdateConfig"]["Order"] == "stop-first"
        assert task["Placement"]["Constraints"] == [f"node.id=={node_id}"]  # pinned where it first ran
        # Hardening, as far as a service can ask for it (docs/swarm.md: the gaps).
        assert cs["CapabilityDrop"] == ["ALL"] and cs["ReadOnly"] is True and cs["User"] == f"10001:{gid}"
        assert task["Resources"]["Limits"] == {"NanoCPUs": 1_000_000_000, "MemoryBytes": 512 * 1024**2, "Pids": 256}
        mounts = {m["Target"]: m for m in cs["Mounts"]}
        assert mounts["/var/lib/galaxy-engine"]["Source"] == str(stack.state_root / game)
        assert mounts["/tmp"]["Type"] == "tmpfs"
        container = stack.client.api.inspect_container(stack.container(svc["ID"]))
        hc = container["HostConfig"]
        assert hc["CapDrop"] == ["ALL"] and hc["ReadonlyRootfs"] is True and hc["Privileged"] is False
        assert hc["PidsLimit"] == 256 and hc["Memory"] == 512 * 1024**2
        top = stack.client.containers.get(container["Id"]).exec_run(["cat", "/proc/1/status"]).output.decode()
        fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in top.splitlines()}
        assert fields["CapEff"] == ["0000000000000000"] and fields["NoNewPrivs"] == ["1"]  # the daemon's setting
        assert fields["Uid"][0] == "10001"
        st = (stack.state_root / game).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (10001, gid, 0o700)
        assert stack.events(game) == ["boot"]
        record = stack.record(game)
        assert record["status"] == "running" and record["node_id"] == node_id, record
    # rtmanager itself is on the engines' overlay (it probed them by hostname there), as uid 10001 with the
    # socket's group, no capability, a read-only root and a tmpfs /tmp.
    rtm = stack.service("rtmanager")["Spec"]["TaskTemplate"]
    assert network["Id"] in [n["Target"] for n in rtm["Networks"]]
    rcs = rtm["ContainerSpec"]
    assert rcs["User"] == f"10001:{gid}" and rcs["CapabilityDrop"] == ["ALL"] and rcs["ReadOnly"] is True
    assert rcs["Hostname"] == "rtmanager" and rcs["Init"] is True
    assert [m["Type"] for m in rcs["Mounts"] if m["Target"] == "/tmp"] == ["tmpfs"]
    assert {(m["Source"], m["Target"]) for m in rcs["Mounts"] if m["Type"] == "bind"} == {
        (str(stack.node.socket), "/var/run/docker.sock"), (str(stack.state_root), str(stack.state_root))}
    assert rtm["Placement"]["Constraints"] == ["node.labels.rtmanager.home == true", "node.role == manager"]

    stopped = games[1]
    res = stack.result_for(stack.stop_job(stopped))
    assert res["outcome"] == "success" and res["job"] == "stop", res
    svc = stack.client.api.inspect_service(f"galaxy-game-{stopped}")
    assert svc["Spec"]["Mode"] == {"Replicated": {"Replicas": 0}}
    assert not [t for t in stack.client.api.tasks(filters={"service": svc["ID"]})
                if t["Status"]["State"] not in ("shutdown", "complete", "failed")]
    assert stack.events(stopped) == ["boot", "sigterm"]
    assert stack.record(stopped)["status"] == "stopped"
    assert stack.running_task(f"galaxy-game-{games[0]}") is not None  # the other one runs on


def test_replay_and_bad_input(stack: Stack):
    """A start sent again is a replay of the same service; malformed entries are answered
    invalid_request (an image outside the allowlist image_rejected) and make nothing, and the
    consumer goes on with the next good entry."""
    game = f"rp-{stack.name}"
    first = stack.result_for(stack.start_job(game))
    assert first["outcome"] == "success", (first, stack.logs())
    task = stack.running_task(f"galaxy-game-{game}")
    assert task is not None
    again = stack.result_for(stack.start_job(game))
    assert (again["outcome"], again["error_code"]) == ("success", "replay_no_op"), again
    assert again["container_id"] == first["container_id"]
    # (bad entry, the field its answer names, the job it is answered as)
    bad = {
        "bad game_id": (("runtime:start_jobs", "game_id", "../etc", "image_ref", "galaxy/engine-stub:1.0"),
                        "game_id", "start"),
        "no image_ref": (("runtime:start_jobs", "game_id", f"rp2-{stack.name}"), "image_ref", "start"),
        "bad image_ref": (("runtime:start_jobs", "game_id", f"rp2-{stack.name}", "image_ref", "not an image"),
                          "image_ref", "start"),
        "bad reason": (("runtime:stop_jobs", "game_id", game, "reason", "because"), "reason", "stop"),
        "unknown op": (("runtime:control_jobs", "game_id", game, "op", "explode"), "op", "reconcile"),
    }
    entries = {what: stack.redis_cli("XADD", fields[0], "*", *fields[1:]) for what, (fields, _, _) in bad.items()}
    outside = stack.start_job(f"rp3-{stack.name}", image="nginx:latest")
    good = stack.start_job(f"rp4-{stack.name}")
    for what, entry in entries.items():
        res = stack.result_for(entry)
        _, field, job = bad[what]
        assert (res["outcome"], res["error_code"], res["job"]) == ("failure", "invalid_request", job), (what, res)
        assert field in res["error_message"], (what, res)
    res = stack.result_for(outside)
    assert (res["outcome"], res["error_code"]) == ("failure", "image_rejected"), res
    assert stack.result_for(good)["outcome"] == "success"
    names = sorted(svc["Spec"]["Name"] for svc in stack.engines())
    assert f"galaxy-game-{game}" in names and f"galaxy-game-rp4-{stack.name}" in names
    assert not [n for n in names if n.startswith(("galaxy-game-rp2-", "galaxy-game-rp3-"))], names
    assert stack.record(f"rp2-{stack.name}") is None and stack.record(f"rp3-{stack.name}") is None
    # The replay and the bad stop touched nothing: the same task runs, the engine booted once.
    after = stack.running_task(f"galaxy-game-{game}")
    assert after is not None and after["ID"] == task["ID"]
    assert stack.events(game) == ["boot"]


def test_drift_a_task_killed_from_outside_is_restarted(stack: Stack):
    game = f"drift-{stack.name}"
    res = stack.result_for(stack.start_job(game))
    assert res["outcome"] == "success", res
    service = res["container_id"]
    first = stack.running_task(service)
    stack.client.api.kill(first["Status"]["ContainerStatus"]["ContainerID"])  # SIGKILL, behind rtmanager's back

    def back() -> dict | None:
        r = stack.record(game)
        return r if r and r["crash_count"] == 1 and r["status"] == "running" and r["health"] == "healthy" else None

    record = wait_for("the killed engine restarted", back, 60, detail=stack.logs)
    assert record["last_exit_code"] == 137 and record["current_container_id"] == service
    second = stack.running_task(service)
    assert second is not None and second["ID"] != first["ID"]  # a new task of the same service
    old = next(t for t in stack.client.api.tasks(filters={"service": service}) if t["ID"] == first["ID"])
    assert old["Status"]["State"] == "failed" and old["Status"]["ContainerStatus"]["ExitCode"] == 137
    assert stack.events(game) == ["boot", "boot"]  # killed (no sigterm), booted again in the same directory


def test_crash_loops(stack: Stack):
    # An engine that exits at once: the start fails with its exit code and last lines.
    crash = f"crash-{stack.name}"
    res = stack.result_for(stack.start_job(crash, "galaxy/engine-stub:crash"))
    assert res["outcome"] == "failure" and res["error_code"] == "container_start_failed", res
    assert "exited with code 3" in res["error_message"] and "crashing as asked" in res["error_message"], res

    # A running engine that keeps exiting: restarted (a new task each time) until the crash limit.
    game = f"loop-{stack.name}"
    res = stack.result_for(stack.start_job(game))
    assert res["outcome"] == "success", res
    control = stack.state_root / game / "stub-control"
    control.mkdir()
    (control / "exit-message").write_text("boom from the test\n")
    (control / "exit").write_text("5")

    def given_up() -> dict | None:
        r = stack.record(game)
        return r if r and r["desired_status"] == "stopped" and r["crash_count"] == CRASH_LIMIT else None

    record = wait_for("the crash loop given up", given_up, 90, detail=stack.logs)
    assert record["last_exit_code"] == 5 and f"crash loop: {CRASH_LIMIT} crashes" in record["last_error_message"]
    assert "boom from the test" in record["last_error_message"], record
    tasks = stack.client.api.tasks(filters={"service": res["container_id"]})
    assert stack.running_task(res["container_id"]) is None
    exits = sorted(t["Status"]["ContainerStatus"]["ExitCode"] for t in tasks)
    assert exits.count(5) == CRASH_LIMIT, exits  # one task per crash (Swarm keeps the last 5 of a slot)
    status, body = stack.http(f"/api/v1/runtimes/{game}/operations", token=True)
    restarts = [o for o in json.loads(body)["operations"] if (o.get("params") or {}).get("event") == "crash"]
    assert status == 200 and len(restarts) == CRASH_LIMIT, body
    # The engine's last lines (with its message on stderr), from the last task of each crash: in the log
    # tail of the first (an exit of a running engine), in the detail of the failed restarts after it.
    assert all("boom from the test" in o["params"]["log_tail"] + o["params"]["detail"] for o in restarts), restarts
    assert all("code 5" in o["params"]["detail"] for o in restarts), restarts


def test_kill_9_of_rtmanager(stack: Stack):
    """Swarm starts rtmanager again (restart condition any); the new one adopts what runs, makes no
    duplicate, and answers the job sent while it was down."""
    before = f"k9-a-{stack.name}"
    res = stack.result_for(stack.start_job(before))
    assert res["outcome"] == "success", res
    engine_task = stack.running_task(res["container_id"])
    rtm_task = stack.running_task(f"{stack.name}_rtmanager")
    stack.client.api.kill(rtm_task["Status"]["ContainerStatus"]["ContainerID"], signal="SIGKILL")
    during = f"k9-b-{stack.name}"
    entry = stack.start_job(during)

    def replaced() -> dict | None:
        t = stack.running_task(f"{stack.name}_rtmanager")
        return t if t is not None and t["ID"] != rtm_task["ID"] else None

    new_task = wait_for("a new rtmanager task", replaced, 90, detail=stack.logs)
    killed = next(t for t in stack.client.api.tasks(filters={"service": f"{stack.name}_rtmanager"})
                  if t["ID"] == rtm_task["ID"])
    assert killed["Status"]["State"] == "failed" and killed["Status"]["ContainerStatus"]["ExitCode"] == 137
    wait_for("rtmanager ready and leading again", lambda: (lambda r: r and r["leader"])(stack.ready()), 120,
             detail=stack.logs)
    res2 = stack.result_for(entry, timeout=120)
    assert res2["outcome"] == "success", (res2, stack.logs())
    # Nothing duplicated, nothing restarted that ran.
    names = sorted(s["Spec"]["Name"] for s in stack.engines())
    assert len(names) == len(set(names)) and f"galaxy-game-{during}" in names
    assert stack.running_task(res["container_id"])["ID"] == engine_task["ID"]
    assert stack.events(before) == ["boot"]
    assert new_task["Spec"]["ContainerSpec"]["Hostname"] == "rtmanager"


def _reachable_from(container, host: str, port: int) -> bool:
    """A TCP connection from inside ``container`` (busybox nc) to ``host:port`` succeeds."""
    code, _ = container.exec_run(["sh", "-c", 'nc -w 2 "$1" "$2" </dev/null >/dev/null 2>&1', "sh", host, str(port)])
    return code == 0


def _admin_from(container, ip: str, what: str, token: str | None) -> int:
    """The HTTP status of an admin call from inside ``container`` (busybox nc) to the engine at ``ip``."""
    method, body = ("POST", '{"expected_turn":0}') if what == "turns" else ("GET", "")
    auth = f"Authorization: Bearer {token}\\r\\n" if token is not None else ""
    request = (f"{method} /cgi-bin/admin/v1/{what} HTTP/1.0\\r\\nHost: engine\\r\\n{auth}"
               f"Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n{body}")
    _, out = container.exec_run(["sh", "-c", 'printf "%b" "$1" | nc -w 5 "$2" 8080', "sh", request, ip])
    first = out.decode(errors="replace").split("\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


def test_only_rtmanager_drives_an_engine_and_engines_reach_nothing_else(stack: Stack):
    """From inside one engine: a neighbour's admin API refuses it (its own token, or none), Postgres,
    Redis and rtmanager's API are out of reach; rtmanager's own turn still goes through."""
    a, b = f"tk-a-{stack.name}", f"tk-b-{stack.name}"
    res = {g: stack.result_for(stack.start_job(g)) for g in (a, b)}
    assert all(r["outcome"] == "success" for r in res.values()), res
    engine_a = stack.client.containers.get(stack.container(res[a]["container_id"]))
    engine_b = stack.client.containers.get(stack.container(res[b]["container_id"]))
    env_a = {k: v for k, _, v in (e.partition("=") for e in engine_a.attrs["Config"]["Env"])}
    env_b = {k: v for k, _, v in (e.partition("=") for e in engine_b.attrs["Config"]["Env"])}
    assert env_a.get("ENGINE_ADMIN_TOKEN") and env_b.get("ENGINE_ADMIN_TOKEN")
    assert env_a["ENGINE_ADMIN_TOKEN"] != env_b["ENGINE_ADMIN_TOKEN"]
    labels = stack.client.api.inspect_service(res[b]["container_id"])["Spec"]["Labels"]
    assert env_b["ENGINE_ADMIN_TOKEN"] not in json.dumps(labels)
    ip_b = engine_b.attrs["NetworkSettings"]["Networks"][stack.network]["IPAddress"]
    for token in (None, env_a["ENGINE_ADMIN_TOKEN"]):
        for what in ("turns", "status"):
            assert _admin_from(engine_a, ip_b, what, token) == 401, (what, token is None)
    turn = json.loads((stack.state_root / b / "engine" / "status.json").read_text())["turn"]
    assert turn == 0

    entry = stack.redis_cli("XADD", "runtime:control_jobs", "*", "game_id", b, "op", "force_next_turn")
    done = stack.result_for(entry)
    assert done["outcome"] == "success" and done["job"] == "force_next_turn", (done, stack.logs())
    assert json.loads((stack.state_root / b / "engine" / "status.json").read_text())["turn"] == 1
    assert env_b["ENGINE_ADMIN_TOKEN"] not in json.dumps(stack.results() + [stack.record(b)]) + stack.logs()

    assert _reachable_from(engine_a, "127.0.0.1", 8080)  # nc itself works
    for short, port in (("postgres", 5432), ("redis", 6379), ("rtmanager", 8090)):
        c = stack.client.api.inspect_container(stack.container(f"{stack.name}_{short}"))
        for host in (short, *[n["IPAddress"] for n in c["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]):
            assert not _reachable_from(engine_a, host, port), f"an engine reaches {short} at {host}:{port}"
    # Nor the API's port on the engine's own node (the stack publishes none).
    assert not _reachable_from(engine_a, stack.node.address, 8090)
