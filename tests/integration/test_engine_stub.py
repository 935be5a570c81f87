"""The stub engine itself (deploy/engine-stub): its admin API, its fault modes and its stop/boot records.

Each test runs stub containers on a bridge network of its own, hardened as the controller runs
engines (all capabilities dropped, no new privileges, a non-root uid, a bind-mounted state
directory), and talks to them over HTTP at their address on that network.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.support import eventually_sync as eventually
from tests.support.local import STUB_REPO

ADMIN = "/cgi-bin/admin/v1"
STATE_TARGET = "/var/lib/galaxy-engine"
PORT = 8080
NEW_STATUS = {"turn": 0, "phase": "idle", "last_generation": None}
# A uid that owns nothing in the image: the engine must get by with its state directory alone.
ENGINE_USER = "4321:4321" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self):
        return json.loads(self.body)  # every admin answer must be valid JSON


class Engine:
    def __init__(self, container, network: str, state: Path) -> None:
        self.container = container
        self.network = network
        self.state = state
        self.control = state / "stub-control"

    @property
    def base(self) -> str:
        self.container.reload()  # the address may change when the container is started again
        ip = self.container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        assert ip, f"{self.container.name} has no address on {self.network}"
        return f"http://{ip}:{PORT}"

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 3.0,
                headers: dict[str, str] | None = None) -> Reply:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                return Reply(res.status, res.read(), res.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as err:
            return Reply(err.code, err.read(), err.headers.get("Content-Type", ""))

    def health(self, timeout: float = 3.0) -> int:
        return self.request("GET", "/healthz", timeout=timeout).status

    def status(self) -> dict:
        reply = self.request("GET", f"{ADMIN}/status")
        assert reply.status == 200, reply
        return reply.json()

    def post_turn(self, expected: int | None = None, raw: bytes | None = None) -> Reply:
        body = raw if raw is not None else json.dumps({"expected_turn": expected}).encode()
        return self.request("POST", f"{ADMIN}/turns", body)

    def wait_healthy(self, timeout: float = 10.0) -> None:
        def answers():
            try:
                return self.health(timeout=1.0) == 200
            except OSError:
                return False
        eventually(answers, timeout, f"{self.container.name} answering /healthz")

    def wait_status(self, predicate, timeout: float = 10.0, what: str = "status") -> dict:
        last = {}

        def check():
            nonlocal last
            last = self.status()
            return predicate(last)
        try:
            eventually(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what} not reached within {timeout}s; status {last}") from None
        return last

    def control_file(self, name: str, content: bytes | str = b"") -> Path:
        self.control.mkdir(exist_ok=True)
        path = self.control / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def events(self) -> list[str]:
        path = self.state / "events"
        return path.read_text().splitlines() if path.exists() else []

    def stderr(self) -> bytes:
        return self.container.logs(stdout=False, stderr=True)

    def stdout(self) -> bytes:
        return self.container.logs(stdout=True, stderr=False)


@pytest.fixture
def engines(docker_client: docker.DockerClient, stub_images, unique: str, tmp_path: Path):
    """run(tag, state=None) starts a stub container; all of them and the network go at teardown."""
    name = f"rtm-stub-{unique}"
    network = docker_client.networks.create(name, driver="bridge", labels={"com.galaxy.test": unique})
    made: list = []

    def run(tag: str, state: Path | None = None, wait: bool = True, env: dict[str, str] | None = None) -> Engine:
        if state is None:
            state = tmp_path / f"state-{len(made)}"
        state.mkdir(exist_ok=True)
        state.chmod(0o777)  # the engine runs as ENGINE_USER
        container = docker_client.containers.run(
            f"{STUB_REPO}:{tag}", detach=True, name=f"{name}-{len(made)}", network=name,
            environment={"GAME_ID": f"g{len(made)}", "ENGINE_PORT": str(PORT), "ENGINE_STATE_DIR": STATE_TARGET,
                         **(env or {})},
            mounts=[docker.types.Mount(target=STATE_TARGET, source=str(state), type="bind")],
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"], user=ENGINE_USER, pids_limit=256,
            labels={"com.galaxy.test": unique},
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": "10m"}),
        )
        made.append(container)
        engine = Engine(container, name, state)
        if wait:
            engine.wait_healthy()
        return engine

    try:
        yield run
    finally:
        for c in made:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
        network.remove()


def test_an_engine_given_an_admin_token_takes_admin_calls_only_with_it(engines):
    """The contract: with ENGINE_ADMIN_TOKEN set, an admin call without that bearer token is 401."""
    token = "t0ken-" + "x" * 37
    e = engines("1.0", env={"ENGINE_ADMIN_TOKEN": token})
    turns = (f"{ADMIN}/turns", b'{"expected_turn": 0}')
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                    {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": f"Bearer {token[:-1]}"}):
        for method, (path, body) in (("GET", (f"{ADMIN}/status", None)), ("POST", turns)):
            reply = e.request(method, path, body, headers=headers)
            assert reply.status == 401 and reply.json()["error"], (method, headers, reply)
    right = {"Authorization": f"Bearer {token}"}
    assert e.request("GET", f"{ADMIN}/status", headers=right).json() == NEW_STATUS
    assert e.request("POST", *turns, headers=right).status == 202
    assert e.health() == 200  # the health path needs no token
    assert token.encode() not in e.stdout() + e.stderr()


def test_a_new_engine_is_idle_at_turn_0_and_logs_each_admin_request(engines):
    e = engines("1.0")
    assert e.health() == 200
    reply = e.request("GET", f"{ADMIN}/status")
    assert reply.status == 200 and reply.content_type.startswith("application/json")
    assert reply.json() == NEW_STATUS
    assert (e.state / "engine").is_dir()  # the state lives in the state directory
    assert b"admin GET /cgi-bin/admin/v1/status 200" in e.stdout()


def test_a_turn_is_generated_and_repeats_and_wrong_turns_are_told_apart(engines):
    e = engines("1.0")
    reply = e.post_turn(0)
    assert reply.status == 202 and reply.json() == {"turn": 0, "phase": "generating"}
    done = e.wait_status(lambda s: s["turn"] == 1, what="turn 1")
    assert done == {"turn": 1, "phase": "idle", "last_generation": {"turn": 1, "ok": True, "error": ""}}

    repeat = e.post_turn(0)  # the caller did not hear the 202 and asks again
    assert repeat.status == 200 and repeat.json() == done
    wrong = e.post_turn(5)
    assert wrong.status == 409 and "error" in wrong.json()
    for bad in (b"", b"junk", b'{"expected_turn": -1}', b'{"expected_turn": "1"}', b'{"expected_turn": 1.5}',
                b'{"turn": 1}', b"[1]"):
        assert e.post_turn(raw=bad).status == 400, bad
    assert e.status() == done  # none of those touched the state

    assert e.post_turn(1).status == 202
    e.wait_status(lambda s: s["turn"] == 2 and s["phase"] == "idle", what="turn 2")
    assert b"admin POST /cgi-bin/admin/v1/turns 202" in e.stdout()


def test_posts_while_generating_conflict_and_slowgen_is_slow(engines):
    e = engines("slowgen")
    t0 = time.monotonic()
    assert e.post_turn(0).status == 202
    again = e.post_turn(0)
    assert again.status == 409 and again.json()["phase"] == "generating"
    assert e.post_turn(1).status == 409  # not at turn 1 (yet)
    assert e.status()["phase"] == "generating"
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))  # slowgen takes 5 s: still at it 2 s in
    assert e.status() == {"turn": 0, "phase": "generating", "last_generation": None}


def test_of_concurrent_posts_with_the_same_expected_turn_exactly_one_wins(engines):
    e = engines("1.0")
    e.control_file("generation_seconds", "0.3")
    for turn in range(3):
        barrier = threading.Barrier(4)
        codes: list[int] = []

        def post(barrier=barrier, codes=codes, turn=turn):
            barrier.wait()
            codes.append(e.post_turn(turn).status)
        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(codes) == 4 and codes.count(202) == 1 and set(codes) <= {200, 202, 409}, codes
        e.wait_status(lambda s: s["phase"] == "idle", what=f"turn {turn + 1} generated")
        assert e.status()["turn"] == turn + 1  # one generation, not two


def test_a_failed_generation_keeps_the_turn(engines):
    e = engines("genfail")
    assert e.post_turn(0).status == 202
    s = e.wait_status(lambda s: s["last_generation"] is not None, what="a generation outcome")
    assert s["turn"] == 0 and s["phase"] == "idle"
    assert s["last_generation"]["turn"] == 1 and s["last_generation"]["ok"] is False
    assert s["last_generation"]["error"]
    assert e.post_turn(0).status == 202  # still at turn 0: it may try again


def test_fail_generation_control_file_sets_the_error_and_can_be_switched_off(engines):
    e = engines("1.0")
    e.control_file("generation_seconds", "0.1")
    fail = e.control_file("fail_generation", 'disk "full"\tat \\x\n')
    assert e.post_turn(0).status == 202
    s = e.wait_status(lambda s: s["last_generation"] is not None, what="a generation outcome")
    assert s == {"turn": 0, "phase": "idle",
                 "last_generation": {"turn": 1, "ok": False, "error": 'disk "full"\tat \\x'}}
    fail.unlink()
    assert e.post_turn(0).status == 202
    e.wait_status(lambda s: s["turn"] == 1 and s["last_generation"]["ok"] is True, what="turn 1 after the fault")


def test_finish3_finishes_at_turn_3_and_refuses_more(engines):
    e = engines("finish3")
    e.control_file("generation_seconds", "0.1")
    for turn in range(3):
        assert e.post_turn(turn).status == 202, turn
        e.wait_status(lambda s, turn=turn: s["turn"] == turn + 1 and s["phase"] != "generating",
                      what=f"turn {turn + 1}")
    s = e.status()
    assert s["turn"] == 3 and s["phase"] == "finished" and s["last_generation"]["ok"] is True
    refused = e.post_turn(3)
    assert refused.status == 409 and refused.json()["phase"] == "finished"
    assert e.status() == s and e.health() == 200


def test_plain_has_no_admin_api(engines):
    e = engines("plain")
    assert e.health() == 200
    assert e.request("GET", f"{ADMIN}/status").status == 404
    assert e.post_turn(0).status == 404


def test_state_survives_a_restart_and_a_patch_to_another_image(engines):
    e = engines("1.0")
    assert e.post_turn(0).status == 202
    at1 = e.wait_status(lambda s: s["turn"] == 1, what="turn 1")
    e.container.restart(timeout=5)
    e.wait_healthy()
    assert e.status() == at1
    assert [line.split()[0] for line in e.events()] == ["boot", "sigterm", "boot"]

    e.container.stop(timeout=5)
    patched = engines("1.1", state=e.state)
    assert patched.container.image.id != e.container.image.id
    assert patched.status() == at1
    assert patched.post_turn(1).status == 202
    patched.wait_status(lambda s: s["turn"] == 2 and s["phase"] == "idle", what="turn 2 on 1.1")


def test_a_generation_cut_short_by_a_kill_is_reported_after_the_next_boot(engines):
    e = engines("slowgen")
    assert e.post_turn(0).status == 202
    e.container.kill()  # SIGKILL mid-generation
    e.container.wait(timeout=10)
    e.container.start()
    e.wait_healthy()
    assert e.status() == {"turn": 0, "phase": "idle",
                          "last_generation": {"turn": 1, "ok": False, "error": "interrupted by restart"}}
    assert e.post_turn(0).status == 202


def _times_out(fn) -> bool:
    try:
        fn()
    except TimeoutError:
        return True
    except urllib.error.URLError as err:
        return isinstance(err.reason, TimeoutError)
    return False


def test_mute_control_file_silences_health_and_admin_until_removed(engines):
    e = engines("1.0")
    mute = e.control_file("mute")
    eventually(lambda: _times_out(lambda: e.health(timeout=0.7)), 5, "health hanging")
    assert _times_out(lambda: e.request("GET", f"{ADMIN}/status", timeout=0.7))
    mute.unlink()
    e.wait_healthy(5)
    assert e.status() == NEW_STATUS


def test_exit_control_file_crashes_with_its_code_and_message_on_every_boot(engines):
    e = engines("1.0")
    e.control_file("exit-message", b"boom\x00tail \xff\xfe\n")
    exit_file = e.control_file("exit", "7\n")
    assert e.container.wait(timeout=10)["StatusCode"] == 7
    assert b"boom\x00tail" in e.stderr()
    e.container.start()  # a crash loop until the file goes
    assert e.container.wait(timeout=10)["StatusCode"] == 7
    assert e.stderr().count(b"boom\x00tail") == 2
    exit_file.unlink()
    e.container.start()
    e.wait_healthy()


def test_docker_stop_is_a_graceful_sigterm(engines):
    e = engines("1.0")
    assert [line.split()[0] for line in e.events()] == ["boot"]
    t0 = time.monotonic()
    e.container.stop(timeout=10)
    assert time.monotonic() - t0 < 5  # not the 10 s grace, then SIGKILL
    e.container.reload()
    assert e.container.attrs["State"]["ExitCode"] == 0
    assert [line.split()[0] for line in e.events()] == ["boot", "sigterm"]


def test_nulcrash_exits_3_with_a_nul_and_invalid_utf8_on_stderr(engines):
    e = engines("nulcrash", wait=False)
    assert e.container.wait(timeout=10)["StatusCode"] == 3
    err = e.stderr()
    assert b"boom\x00tail" in err
    assert b"\xff\xfe" in err or "\ufffd".encode() in err  # the log driver may replace invalid UTF-8
