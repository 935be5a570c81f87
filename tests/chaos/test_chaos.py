"""The chaos checker: fast unit tests of its invariants on hand-made histories, and one short
fixed-seed run against real services of its own (marker ``chaos``).

Longer runs: ``python -m tests.chaos --seed N --minutes M`` (``--help`` lists the options)."""

from __future__ import annotations

import os

import pytest

from tests.chaos.checker import ABSENT, STOPPED, check, resolve
from tests.chaos.history import FaultRecord, History, JobRecord
from tests.chaos.plan import (
    EXTRA_FAULT_KINDS,
    EXTRA_OPTIONS,
    FAULT_KINDS,
    HOSTILE_STATUSES,
    MUTE,
    READ_COUNT,
    STATEMENT_TIMEOUT,
    V10,
    V11,
    game_names,
    parse_extra,
    plan_backlogs,
    plan_faults,
    plan_workload,
)

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


def test_a_turn_of_the_clock_may_be_answered_with_an_engine_error():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    for code in ("engine_unreachable", "generation_failed", "engine_unsupported"):
        b.h.results.append([f"{len(b.h.results) + 1}-0", {
            "game_id": "g1", "outcome": "failure", "container_id": "", "engine_endpoint": "", "error_code": code,
            "error_message": "engine status: turn must be a non-negative integer", "job": "turn",
            "job_entry_id": "", "result_id": f"turn-{code}"}])
    r = b.check()
    assert "results_well_formed" not in invariants(r), [v.render() for v in r.violations]


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


def test_a_rollback_may_give_a_state_directory_its_older_content_back_in_place():
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    good = {"exists": True, "is_dir": True, "is_symlink": False, "inode": 5, "uid": 10000, "gid": 10000,
            "mode": 0o700, "marker": "m", "boots": 3}
    b.h.state_dirs["g1"] = {"first_inode": 5, "marker": "m", "boots_max": 4, "final": good}
    assert invariants(b.check()) == {"state_dirs"}  # the boots file shrank
    b.h.ops.append({"id": 10**6, "game_id": "g1", "op": "patch", "source": "reconciler", "status": "succeeded",
                    "generation": 3, "stream": None, "entry_id": None, "error_code": None, "event": "rollback"})
    assert b.check().ok  # a rollback restored the copy taken before the failed replacement
    b.h.ops[-1] = {**b.h.ops[-1], "op": "reconcile", "event": "state_restore"}
    assert b.check().ok  # so did a stop during a replacement, or a start of the replaced image
    b.h.state_dirs["g1"]["final"] = {**good, "inode": 6}
    assert invariants(b.check()) == {"state_dirs"}  # but in place: never another directory


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


def test_opt_in_faults_leave_a_seed_without_them_as_it_was():
    assert plan_faults(CI_SEED, CI_MINUTES * 60, 8) == plan_faults(CI_SEED, CI_MINUTES * 60, 8, extra=())
    assert not {f.kind for f in plan_faults(CI_SEED, 600, 8)} & set(EXTRA_FAULT_KINDS)
    assert parse_extra("") == () and parse_extra("all") == EXTRA_OPTIONS
    assert parse_extra("db_restore,backlog") == ("backlog", "db_restore")
    with pytest.raises(ValueError):
        parse_extra("backlog,meteor")


def test_every_opt_in_kind_is_planned_with_what_it_needs():
    for seed in range(20):
        faults = plan_faults(seed, 600, 8, extra=EXTRA_OPTIONS)
        assert set(EXTRA_FAULT_KINDS) <= {f.kind for f in faults}
        for f in faults:
            if f.kind == "backlog":
                assert 150 <= f.params["entries"] <= 400
                if f.params["cut"] == "table_lock":
                    assert f.params["hold"] > STATEMENT_TIMEOUT  # past the controller's statement timeout
            elif f.kind == "hostile_engine":
                assert f.params["status"] in HOSTILE_STATUSES
            elif f.kind == "db_restore":
                assert f.params["age"] > 0 and f.duration > f.params["age"]
        assert [f.at for f in faults] == sorted(f.at for f in faults)


def test_a_backlog_is_more_than_one_read_with_a_stop_applied_after_a_far_start():
    games, mortal = game_names(8)
    for seed in range(20):
        faults = plan_faults(seed, 600, 8, extra=("backlog",))
        jobs = plan_backlogs(seed, faults, games, mortal)
        assert [j.to_json() for j in jobs] == [j.to_json() for j in plan_backlogs(seed, faults, games, mortal)]
        bursts = {j.burst for j in jobs}
        assert bursts == {f"B{i}" for i, f in enumerate(faults) if f.kind == "backlog"}
        for burst in bursts:
            order = [j for j in jobs if j.burst == burst]
            assert len({j.tag for j in order}) == len(order)
            assert all(j.fields.get("chaos_tag") == j.tag for j in order)
            starts = [j for j in order if j.stream == "start"]
            stops = [j for j in order if j.stream == "stop"]
            assert len(starts) > READ_COUNT and 150 <= len(order)
            pairs = [(a, b) for a in starts[READ_COUNT:] for b in stops[:READ_COUNT // 2]
                     if a.shape == b.shape == "ok" and a.game == b.game and order.index(a) < order.index(b)]
            assert pairs, f"seed {seed} {burst}: no far start with an early stop of its game after it"


def test_plans_with_opt_in_faults_are_a_function_of_the_seed():
    a = [f.to_json() for f in plan_faults(3, 120, 8, extra=EXTRA_OPTIONS)]
    assert a == [f.to_json() for f in plan_faults(3, 120, 8, extra=EXTRA_OPTIONS)]
    assert a != [f.to_json() for f in plan_faults(4, 120, 8, extra=EXTRA_OPTIONS)]


def test_hostile_statuses_are_what_they_say():
    import json

    from tests.chaos.runner import hostile_status

    docs = {what: hostile_status(what) for what in HOSTILE_STATUSES}
    assert len(set(docs.values())) == len(docs)
    assert json.loads(docs["turn 2147483647"])["turn"] == 2**31 - 1
    assert json.loads(docs["turn 2147483648"])["turn"] == 2**31
    assert len(docs["1 MB error text"]) > 1_000_000
    with pytest.raises(ValueError):
        json.loads(docs["not JSON"])


def test_docker_times_are_read_to_the_microsecond():
    from tests.chaos.runner import _epoch

    assert _epoch("1970-01-01T00:00:10.5Z") == 10.5
    assert abs(_epoch("2026-12-03T18:56:24.123456789Z") - 1796324184.123456789) < 1e-5
    assert _epoch("") == 0.0 and _epoch("0001-01-01T00:00:00Z") < 0


def _watched_restart(b: H, before: dict, after: dict, game: str = "g1") -> None:
    b.h.faults.append(FaultRecord(at=5, kind="dockerd_restart", duration=0, params={}, started=5, ended=9, observed={
        "before_wall": 100.0, "after_wall": 120.0, "running_ids": {"c" * 64: game}, "exit_codes": {game: 137},
        "before": {game: before}, "after": {game: after}}))


def test_a_daemon_restart_must_not_count_a_crash_or_give_a_game_up():
    up = {"status": "running", "desired_status": "running", "crash_count": 0, "generation": 3}
    b = H()
    s = b.entry("start", "g1", V10)
    b.answer(s)
    b.running("g1", V10)
    _watched_restart(b, up, {**up})
    assert b.check().ok
    b.h.faults.clear()
    _watched_restart(b, up, {**up, "crash_count": 1})
    r = b.check()
    assert invariants(r) == {"daemon_restarts"} and "counted as a crash" in r.first.message
    assert r.first.evidence["exit_code"] == 137
    b.h.faults.clear()
    _watched_restart(b, up, {**up, "desired_status": "stopped", "last_error_code": "container_start_failed"})
    assert "given up" in b.check().first.message
    s.sent_wall = 110.0  # a job of the game during the restart: it may have stopped the game ...
    assert b.check().ok
    b.h.faults.clear()
    _watched_restart(b, up, {**up, "crash_count": 1})
    assert invariants(b.check()) == {"daemon_restarts"}  # ... but jobs never count a crash


def _restore(b: H, running: dict, at_dump: list, dump: float = 100.0, restore: float = 110.0) -> None:
    b.h.faults.append(FaultRecord(at=5, kind="db_restore", duration=15, params={"age": 10}, started=5, ended=20,
                                  observed={"dump_wall": dump, "restore_wall": restore, "restored_wall": restore + 3,
                                            "running": running, "containers_at_dump": at_dump}))


def test_no_running_game_is_removed_by_a_restore():
    b = H()
    s = b.entry("start", "g1", V10)
    s.sent_wall = 50.0
    b.answer(s)
    cid = "a" * 64
    b.running("g1", V10)
    b.h.containers[0]["id"] = cid
    b.h.records["g1"]["current_container_id"] = cid
    _restore(b, {cid: "g1"}, [cid])
    assert b.check().ok
    b.h.destroyed[cid] = 125.0  # removed after the restore, no job asked
    r = b.check()
    assert invariants(r) == {"restore"} and r.first.game == "g1"
    stop = b.rest("stop", "g1")
    stop.sent_wall = 115.0  # a stop keeps the container: no excuse
    b.answer(stop)
    b.h.records["g1"]["desired_status"] = "stopped"
    assert "restore" in invariants(b.check())
    late = b.rest("restart", "g1")
    late.sent_wall = 120.0  # a restart sent after the restore may replace it
    b.answer(late, "superseded")
    assert "restore" not in invariants(b.check())


def test_a_restore_excuses_what_jobs_around_it_asked():
    b = H()
    s = b.entry("start", "g1", V10)
    s.sent_wall = 50.0
    b.answer(s)
    cid = "a" * 64
    b.running("g1", V10)
    b.h.containers[0]["id"] = cid
    b.h.records["g1"]["current_container_id"] = cid
    b.h.container_images[cid] = V10
    _restore(b, {cid: "g1"}, [cid])
    b.h.destroyed[cid] = 111.0
    late = b.entry("start", "g1", V11)
    late.sent_wall = 109.8  # just before the restore began: converged while the replicas were stopped
    b.answer(late)
    assert "restore" not in invariants(b.check())
    late.image = V10  # the same image, on a container the restored record names: kept
    assert "restore" in invariants(b.check())
    _restore(b, {cid: "g1"}, [])  # created after the dump: its spec revision is unknown, a start recreates it
    b.h.faults.pop(0)
    assert "restore" in invariants(b.check())  # ... but only on the restored database (from 113)
    b.h.destroyed[cid] = 114.0
    late.sent_wall = 110.5
    assert "restore" not in invariants(b.check())
    late.image, late.sent_wall = V11, 105.0  # another image, sent after the dump and forgotten by the restore:
    assert "restore" in invariants(b.check())  # no excuse once the restored database is in use
    late.sent_wall = 99.0  # sent before the dump: the restored database may hold it, not yet converged
    assert "restore" not in invariants(b.check())


def test_an_operation_id_handed_out_again_after_a_restore_is_not_the_forgotten_call_s():
    b = H()
    _restore(b, {}, [])  # window 90 .. 113
    early = b.rest("restart", "g1")
    early.sent_wall, early.http_body = 105.0, {"operation_id": 9, "result_id": "r-early", "game_id": "g1",
                                                "job": "restart", "outcome": "success", "error_code": ""}
    late = b.rest("restart", "g1")
    late.sent_wall, late.http_body = 120.0, {"operation_id": 9, "result_id": "r-late"}
    b.h.ops = [{"id": 9, "game_id": "g1", "op": "restart", "source": "admin", "status": "succeeded",
                "stream": None, "entry_id": None, "created_epoch": 120.1}]
    b.h.op_results = {"9": {"game_id": "g1", "job": "restart", "result_id": "r-late"}}
    resolve(b.h, "s", "t")
    assert early.op_id is None and early.op_source == "restored" and early.result["result_id"] == "r-early"
    assert late.op_id == 9 and late.result["result_id"] == "r-late"


def test_a_restore_may_forget_what_it_did_not_hold():
    b = H()
    s = b.entry("start", "g1", V10)
    s.sent_wall = 50.0
    b.answer(s)
    lost = b.entry("stop", "g1")  # sent after the dump: the restored database has no trace of it
    lost.sent_wall, lost.op_id = 105.0, None
    b.running("g1", V10)
    _restore(b, {}, [])
    r = b.check()
    assert r.ok, [v.render() for v in r.violations]
    assert any("restore" in i for i in r.info)
    lost.sent_wall = 130.0  # the same, well after the restore: must be answered
    assert "answered" in invariants(b.check())


# ---------------------------------------------------------------- the real run
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
