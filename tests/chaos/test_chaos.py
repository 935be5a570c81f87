"""The chaos checker: fast unit tests of its invariants on hand-made histories, and one short
fixed-seed run against real services of its own (marker ``chaos``).

Longer runs: ``python -m tests.chaos --seed N --minutes M`` (``--help`` lists the options)."""

from __future__ import annotations

import os

import pytest

from tests.chaos.checker import ABSENT, STOPPED, check, resolve
from tests.chaos.history import History, JobRecord
from tests.chaos.plan import FAULT_KINDS, MUTE, V10, V11, game_names, plan_faults, plan_workload

CI_SEED = 25
CI_MINUTES = 0.9  # 54 s of workload and faults; every fault kind is in this seed's schedule


# ------------------------------------------------------------------ builders
class H:
    """A hand-made history: jobs, their results on the stream, and what Docker shows at the end."""

    def __init__(self, games=("g1", "g2"), mortal=()) -> None:
        self.h = History(seed=0, minutes=0, games=list(games), mortal=list(mortal), instance="inst",
                         never_healthy=[MUTE])
        self.n = 0
        self.ms = 1_000

    def _tag(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def entry(self, kind: str, game: str | None, image: str | None = None, *, same_ms: bool = False,
              shape: str = "ok", expect: str | None = None, stream: str | None = None) -> JobRecord:
        if not same_ms:
            self.ms += 10
        stream = stream or ("start" if kind == "start" else "stop")
        job = JobRecord(tag=self._tag(), via="stream", kind=kind, game=game, image=image, shape=shape,
                        expect_code=expect, stream=stream, entry_id=f"{self.ms}-0", sent_at=self.ms / 1000)
        job.op_id = self.n
        self.h.jobs.append(job)
        return job

    def rest(self, kind: str, game: str, image: str | None = None, *, status: int | None = 200,
             error: str | None = None, op_source: str | None = "answer") -> JobRecord:
        self.ms += 10
        job = JobRecord(tag=self._tag(), via="rest", kind=kind, game=game, image=image, sent_at=self.ms / 1000,
                        sent_wall=self.ms / 1000, http_status=status, http_error=error, op_source=op_source)
        job.op_id = self.n if op_source == "answer" else None
        self.h.jobs.append(job)
        return job

    def answer(self, job: JobRecord, code: str = "", outcome: str | None = None, rid: str | None = None,
               container: str = "") -> dict:
        outcome = outcome or ("success" if code in ("", "replay_no_op") else "failure")
        if outcome == "success" and code == "" and job.kind in ("start", "patch", "restart") and not container:
            container = "c" * 64
        fields = {"game_id": job.game or "", "outcome": outcome, "container_id": container,
                  "engine_endpoint": f"http://galaxy-game-{job.game}:8080" if container else "",
                  "error_code": code, "error_message": "", "job": job.kind,
                  "job_entry_id": job.entry_id or "", "result_id": rid or f"r-{job.tag}"}
        self.h.results.append([f"{len(self.h.results) + 1}-0", fields])
        job.result = fields
        if job.via == "rest" and job.op_id is not None:
            self.h.op_results[str(job.op_id)] = fields
        return fields

    def container(self, game: str, image: str, running: bool = True, cid: str | None = None, healthy=True) -> str:
        cid = cid or f"{game}-{len(self.h.containers)}".ljust(64, "0")
        self.h.containers.append({"id": cid, "name": f"galaxy-game-{game}", "game": game, "instance": "inst",
                                  "running": running, "image": image, "healthy": healthy if running else None})
        return cid

    def record(self, game: str, desired: str, status: str, container: str | None = None,
               image: str | None = None) -> None:
        self.h.records[game] = {"game_id": game, "desired_status": desired, "status": status, "generation": 3,
                                "observed_generation": 3, "current_container_id": container,
                                "current_image_ref": image}

    def running(self, game: str, image: str) -> None:
        cid = self.container(game, image)
        self.record(game, "running", "running", cid, image)

    def stopped(self, game: str, image: str = V10, container: bool = True) -> None:
        cid = self.container(game, image, running=False) if container else None
        self.record(game, "stopped", "stopped", cid, image)

    def check(self, **kw):
        return check(self.h, **kw)


def invariants(report) -> set[str]:
    return {v.invariant for v in report.violations}


# ------------------------------------------------------------- clean histories
def test_a_clean_history_holds_every_invariant():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    bad = b.entry("start", None, shape="game_id pattern", expect="invalid_request")
    b.answer(bad, "invalid_request")
    b.running("g1", V10)
    r = b.check()
    assert r.ok, [v.render() for v in r.violations]
    assert r.observed == {"g1": ("running", V10), "g2": ABSENT}


def test_a_result_published_twice_with_one_result_id_is_information_only():
    b = H()
    s = b.entry("start", "g1", V10)
    f = b.answer(s)
    b.h.results.append(["99-0", dict(f)])
    b.running("g1", V10)
    r = b.check()
    assert r.ok
    assert any("published 2 times" in i for i in r.info)


# ------------------------------------------------------------------ violations
def test_an_unanswered_entry_is_a_violation():
    b = H()
    b.entry("stop", "g1")
    assert invariants(b.check()) == {"answered"}


def test_two_result_ids_for_one_entry_are_a_violation():
    b = H()
    s = b.entry("stop", "g1")
    b.answer(s, "replay_no_op", rid="one")
    b.h.results.append(["50-0", {**s.result, "result_id": "two"}])
    assert "one_result_id" in invariants(b.check())


def test_a_result_for_an_entry_nobody_sent_is_a_violation():
    b = H()
    s = b.entry("stop", "g1")
    b.answer(s, "replay_no_op")
    b.h.results.append(["77-0", {**s.result, "job_entry_id": "123-4", "result_id": "x"}])
    assert invariants(b.check()) == {"no_phantom_results"}


def test_a_bad_shape_must_get_its_error_code():
    b = H()
    bad = b.entry("start", "g1", shape="image outside allowlist", expect="image_rejected")
    b.answer(bad, "invalid_request")
    assert invariants(b.check()) == {"rejections"}


def test_a_valid_start_rejected_while_the_game_was_not_removed_is_a_violation():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s, "invalid_request")
    assert "rejections" in invariants(b.check())


def test_results_of_one_game_out_of_entry_order_are_a_violation():
    b = H()
    first = b.entry("start", "g1", V10)
    second = b.entry("stop", "g1")
    b.answer(second)  # the later job's result first ...
    b.answer(first, "superseded")
    b.stopped("g1")
    r = b.check()
    assert "result_order" in invariants(r), r.violations


def test_within_one_millisecond_the_start_stream_comes_first():
    b = H()
    first = b.entry("start", "g1", V10)
    second = b.entry("stop", "g1", same_ms=True)
    second.op_id, first.op_id = 1, 2  # the stop was admitted first
    b.answer(second, "replay_no_op")
    b.answer(first)
    b.running("g1", V10)
    assert "admission_order" in invariants(b.check())  # docs/contract.md: start, then stop
    lenient = b.check(strict_same_ms=False)
    assert lenient.ok and any("same millisecond" in i for i in lenient.info)


def test_a_job_answered_at_once_may_overtake_an_earlier_converging_one():
    b = H()
    first = b.entry("start", "g1", V10)
    bad = b.entry("start", "g1", shape="image outside allowlist", expect="image_rejected")
    b.answer(bad, "image_rejected")  # a rejection, answered before the start converged
    b.answer(first)
    b.running("g1", V10)
    assert b.check().ok
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    stop = b.entry("stop", "g1")
    replay = b.entry("start", "g1", V10)
    b.answer(replay, "replay_no_op")  # (as if admitted before the stop): answered at once, first
    b.answer(stop)
    b.stopped("g1")
    r = b.check()
    assert "result_order" not in invariants(r)
    assert any("answered at once" in i for i in r.info)


def test_entries_admitted_out_of_entry_order_are_a_violation():
    b = H()
    first = b.entry("stop", "g1")
    second = b.entry("stop", "g1")
    first.op_id, second.op_id = 5, 4
    b.answer(first, "replay_no_op")
    b.answer(second, "replay_no_op")
    assert invariants(b.check()) == {"admission_order"}


def test_a_game_running_after_its_last_job_stopped_it_is_a_violation():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    t = b.entry("stop", "g1")
    b.answer(t)
    b.running("g1", V10)
    r = b.check()
    assert "final_state" in invariants(r)
    assert r.first.invariant == "final_state"
    assert r.first.game == "g1"


def test_a_failed_patch_of_a_running_game_may_roll_back_or_stop_but_never_run_the_new_image():
    def history(final: str | None) -> H:
        b = H()
        s = b.entry("start", "g1", V10)
        b.answer(s)
        p = b.rest("patch", "g1", MUTE)
        b.answer(p, "engine_unhealthy")
        if final == "rolled back":
            b.running("g1", V10)
        elif final == "stopped":
            b.stopped("g1")
        elif final == "new image":
            b.running("g1", MUTE)
        return b

    assert history("rolled back").check().ok
    assert history("stopped").check().ok
    assert "final_state" in invariants(history("new image").check())


def test_a_failed_start_of_a_stopped_game_leaves_it_stopped():
    b = H()
    s = b.entry("start", "g1", V11)
    b.answer(s, "image_unavailable")
    b.running("g1", V10)
    assert "final_state" in invariants(b.check())


def test_an_uncertain_rest_job_allows_either_outcome():
    for final in ("running", "stopped"):
        b = H()
        s = b.entry("start", "g1", V10)
        b.answer(s)
        b.rest("stop", "g1", status=None, error="timeout: timed out", op_source=None)  # no answer, not looked up
        if final == "running":
            b.running("g1", V10)
        else:
            b.stopped("g1")
        r = b.check()
        assert r.ok, (final, [v.render() for v in r.violations])


def test_a_rest_job_refused_by_a_standby_changes_nothing():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.rest("stop", "g1", status=503, op_source=None)
    b.stopped("g1")
    assert "final_state" in invariants(b.check())


def test_resolve_finds_the_operation_of_a_rest_call_that_timed_out():
    b = H()
    job = b.rest("stop", "g1", status=None, error="timeout: timed out", op_source=None)
    b.h.ops = [{"id": 7, "game_id": "g1", "op": "stop", "source": "admin", "status": "succeeded",
                "stream": None, "entry_id": None, "created_epoch": job.sent_wall + 0.2}]
    b.h.op_results = {"7": {"game_id": "g1", "outcome": "success", "error_code": "replay_no_op", "job": "stop",
                            "result_id": "r7", "job_entry_id": "", "container_id": "", "engine_endpoint": "",
                            "error_message": ""}}
    resolve(b.h, "s", "t")
    assert job.op_id == 7 and job.op_source == "log" and job.result["result_id"] == "r7"
    other = H().rest("stop", "g2", status=None, error="timeout: x", op_source=None)
    h = History(seed=0, minutes=0, games=["g2"], mortal=[], jobs=[other])
    resolve(h, "s", "t")
    assert other.op_id is None and other.op_source == "none"  # not admitted


def test_removal_is_final_and_a_removed_game_keeps_no_container():
    b = H(games=(), mortal=("m1",))
    s = b.entry("start", "m1", V10)
    b.answer(s)
    t = b.entry("stop", "m1")
    b.answer(t)
    c = b.rest("cleanup", "m1")
    b.answer(c)
    late = b.entry("start", "m1", V10)
    b.answer(late, "invalid_request")
    joined = b.entry("stop", "m1")
    b.answer(joined, "replay_no_op")
    b.record("m1", "removed", "removed")
    assert b.check().ok
    b.container("m1", V10, running=False)
    assert "final_state" in invariants(b.check()) or "record_agrees" in invariants(b.check())


def test_a_stop_that_joined_a_removal_leaves_the_game_removed():
    b = H(games=(), mortal=("m1",))
    s = b.entry("start", "m1", V10)
    b.answer(s)
    t = b.entry("stop", "m1")
    b.answer(t)
    c = b.rest("cleanup", "m1")
    j = b.entry("stop", "m1")  # joins the removal in progress
    b.answer(c)
    b.answer(j)
    b.record("m1", "removed", "removed")
    assert b.check().ok


def test_a_container_for_a_game_never_started_is_a_violation():
    b = H()
    s = b.entry("stop", "g2")
    b.answer(s, "replay_no_op")
    b.container("g2", V10)
    assert "never_started" in invariants(b.check())


def test_two_containers_for_one_game_are_a_violation():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    b.h.containers.append({**b.h.containers[0], "id": "d" * 64, "running": False, "name": "other"})
    assert "one_container" in invariants(b.check())


def test_a_state_directory_replaced_or_emptied_is_a_violation():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    good = {"exists": True, "is_dir": True, "is_symlink": False, "inode": 5, "uid": 10000, "gid": 10000,
            "mode": 0o700, "marker": "m", "boots": 3}
    b.h.state_dirs["g1"] = {"first_inode": 5, "marker": "m", "boots_max": 3, "final": good}
    assert b.check().ok
    b.h.state_dirs["g1"]["final"] = {**good, "inode": 6, "marker": None}
    assert invariants(b.check()) == {"state_dirs"}


def test_a_dead_lettered_valid_entry_is_a_violation():
    b = H()
    s = b.entry("stop", "g1")
    b.answer(s, "internal_error")
    b.h.dead_letters = [{"game_id": "g1", "reason": "cancelled", "chaos_tag": s.tag}]
    assert "dead_letters" in invariants(b.check())


def test_anything_left_pending_is_a_violation():
    b = H()
    s = b.entry("stop", "g1")
    b.answer(s, "replay_no_op")
    b.h.pending = {"x:stop_jobs": 2}
    b.h.unpublished = 1
    assert invariants(b.check()) == {"no_pending"}


def test_a_success_of_an_engine_that_never_becomes_healthy_is_a_violation():
    b = H()
    s = b.entry("start", "g1", MUTE)
    b.answer(s)
    assert "truthful_results" in invariants(b.check())


def test_a_success_whose_container_runs_another_image_is_a_violation():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    p = b.rest("patch", "g1", V11)
    b.answer(p, container="e" * 64)
    b.h.container_images = {"c" * 64: V10, "e" * 64: V10}  # the patch's container was built from 1.0
    b.running("g1", V11)
    assert "truthful_results" in invariants(b.check())
    b.h.container_images["e" * 64] = V11
    assert b.check().ok


def test_a_controller_that_exits_on_its_own_is_a_violation_unless_documented():
    b = H()
    b.h.controller_exits = [{"slot": "a", "code": 1, "at": 3.0, "expected": False, "log_tail": "boom"}]
    assert invariants(b.check()) == {"controllers"}
    b.h.controller_exits = [{"slot": "a", "code": 3, "at": 3.0, "expected": True, "why": "after a pause"}]
    assert b.check().ok


def test_crashes_beyond_the_kills_from_outside_are_information_never_a_violation():
    """A dockerd restart stops every engine and is never a crash, whatever the exit code (the rule
    that a SIGKILL during a daemon gap must count as a crash is gone: a stopping dockerd SIGKILLs an
    engine that outlasts its stop timeout itself)."""
    from tests.chaos.history import FaultRecord

    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    b.h.records["g1"]["crash_count"] = 2
    b.h.faults = [FaultRecord(at=1, kind="dockerd_restart", duration=0, params={}, note="private dockerd restarted"),
                  FaultRecord(at=2, kind="container_kill", duration=0, params={},
                              note="killed the container of g1 from outside (SIGKILL)")]
    r = b.check()
    assert r.ok
    assert any("game g1: 2 crash(es) counted, 1 kill(s)" in line for line in r.info)
    b.h.records["g1"]["crash_count"] = 1
    assert not any("crash(es) counted" in line for line in b.check().info)


def test_the_first_violation_is_the_most_fundamental_one():
    b = H()
    b.entry("start", "g1", V10)  # unanswered
    b.container("g2", V10)            # never started, yet a container
    r = b.check()
    assert [v.invariant for v in r.violations][:1] == ["answered"]
    assert r.first.render().startswith("[answered]")


def test_the_history_survives_json(tmp_path):
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    b.h.save(tmp_path / "h.json")
    again = History.load(tmp_path / "h.json")
    assert check(again).ok and again.jobs[0].result == s.result


# ------------------------------------------------------------------- the plans
def test_plans_are_a_function_of_the_seed():
    games, mortal = game_names(8)
    a = [j.to_json() for j in plan_workload(CI_SEED, 54, games, mortal)]
    assert a == [j.to_json() for j in plan_workload(CI_SEED, 54, games, mortal)]
    assert a != [j.to_json() for j in plan_workload(CI_SEED + 1, 54, games, mortal)]
    faults = plan_faults(CI_SEED, CI_MINUTES * 60, 8)
    assert {f.kind for f in faults} == set(FAULT_KINDS)  # the CI schedule has every kind of fault
    assert all(j.game in games + mortal or j.game is None for j in plan_workload(CI_SEED, 54, games, mortal))
    cleanups = [j for j in plan_workload(7, 600, games, mortal) if j.kind == "cleanup"]
    assert cleanups and all(j.game in mortal for j in cleanups)
    assert STOPPED == ("stopped",)


# ---------------------------------------------------------------- the real run
@pytest.mark.chaos
def test_a_fixed_seed_chaos_run_keeps_every_invariant(tmp_path, docker_client, stub_images):
    """About 80 s: its own Postgres, Redis and dockerd; every kind of fault once or more."""
    if os.geteuid() != 0:
        pytest.fail("the chaos run needs root (a private dockerd, a Postgres cluster run as postgres)",
                    pytrace=False)
    from tests.chaos.runner import ChaosRun

    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    run = ChaosRun(CI_SEED, CI_MINUTES, tmp_path / "chaos", quiesce_timeout=90, out=out)
    report, history = run.run()
    ran = {f.kind for f in history.faults if f.started is not None}
    assert report.ok, run.render(report, full=False)
    assert len(ran) >= 7, f"only {sorted(ran)} ran:\n{run.schedule_text()}"
    assert any(j.result for j in history.jobs if j.via == "rest"), "no REST job was answered"
