"""desired.jobs: parsing hostile stream entries, and how each job changes desired state."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from desired.jobs import (
    MAX_FIELD,
    SHOWN_BAD_GAME_ID,
    ImageAllowlist,
    InvalidJob,
    Job,
    RecordDefaults,
    decide,
    image_repository,
    parse_job,
)
from desired.model import (
    DesiredStatus,
    ErrorCode,
    JobKind,
    OpSource,
    RuntimeRecord,
    Status,
    StopReason,
)
from tests.support.job_records import DEFAULTS, ENDPOINT, IMG1, NOW, rec

ALLOW = ImageAllowlist("galaxy/engine:*, galaxy/engine-stub:*,localhost:5000/galaxy/engine:*")
DIGEST = "sha256:" + "ab" * 32


def b(d: dict[str, str | bytes]) -> dict[bytes, bytes]:
    """Fields as redis-py hands them over: bytes keys and values."""
    return {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in d.items()}


def invalid(kind: JobKind, fields, allowlist: ImageAllowlist = ALLOW) -> InvalidJob:
    with pytest.raises(InvalidJob) as exc:
        parse_job(kind, fields, allowlist)
    return exc.value


# ------------------------------------------------------------------ parse_job

def test_parse_start_from_bytes() -> None:
    job = parse_job(JobKind.START, b({"game_id": "g1", "image_ref": "galaxy/engine:1.2"}), ALLOW,
                    stream="runtime:start_jobs", entry_id="1-0")
    assert job == Job(kind=JobKind.START, game_id="g1", source=OpSource.LOBBY,
                      image_ref="galaxy/engine:1.2", reason=None, stream="runtime:start_jobs", entry_id="1-0")


def test_parse_accepts_str_fields_too() -> None:
    job = parse_job(JobKind.STOP, {"game_id": "g1", "reason": "finished"}, ALLOW, source=OpSource.ADMIN)
    assert job.reason is StopReason.FINISHED
    assert job.source is OpSource.ADMIN
    assert job.image_ref is None


@pytest.mark.parametrize("reason", [r.value for r in StopReason])
def test_parse_stop_every_reason(reason: str) -> None:
    job = parse_job(JobKind.STOP, b({"game_id": "g1", "reason": reason}), ALLOW)
    assert job.reason is StopReason(reason)


@pytest.mark.parametrize("kind", [JobKind.RESTART, JobKind.CLEANUP])
def test_parse_restart_cleanup_need_only_game_id(kind: JobKind) -> None:
    job = parse_job(kind, b({"game_id": "g1", "image_ref": "not an image!!"}), ALLOW)
    assert (job.kind, job.game_id, job.image_ref, job.reason) == (kind, "g1", None, None)


def test_unknown_fields_ignored() -> None:
    job = parse_job(JobKind.START, b({"game_id": "g1", "image_ref": "galaxy/engine:1", "x-trace": "abc",
                                      "priority": "\xff"}), ALLOW)
    assert job.game_id == "g1" and job.image_ref == "galaxy/engine:1"


@pytest.mark.parametrize("image_ref", [
    "galaxy/engine:1.2",
    "galaxy/engine-stub:1.0",
    f"galaxy/engine:1.2@{DIGEST}",
    "localhost:5000/galaxy/engine:1.2",
])
def test_parse_allowed_images(image_ref: str) -> None:
    assert parse_job(JobKind.PATCH, b({"game_id": "g1", "image_ref": image_ref}), ALLOW).image_ref == image_ref


@pytest.mark.parametrize("patterns, image_ref, allowed", [
    ("galaxy/engine:2.*", f"galaxy/engine:2.0@{DIGEST}", False),  # the digest runs, not the tag: any image
    ("galaxy/engine:2.*", "galaxy/engine:2.0", True),
    ("galaxy/engine:2.*", f"galaxy/engine@{DIGEST}", False),
    (f"galaxy/engine:2.*,galaxy/engine@{DIGEST}", f"galaxy/engine:2.0@{DIGEST}", True),  # the digest itself
    ("galaxy/engine:*", f"galaxy/engine:2.0@{DIGEST}", True),  # every tag of the repository: any digest
    ("galaxy/*", f"galaxy/engine:2.0@{DIGEST}", True),
    ("galaxy/engine@sha256:*", f"galaxy/engine:2.0@{DIGEST}", False),  # the whole reference must match too
    ("galaxy/engine:2.0*", f"galaxy/engine:2.0@{DIGEST}", False),
    (f"galaxy/engine:2.0@{DIGEST}", f"galaxy/engine:2.0@{DIGEST}", True),  # review: pinned exactly
    (f"galaxy/engine:*@{DIGEST}", f"galaxy/engine:2.0@{DIGEST}", True),
    ("galaxy/engine:2.*@sha256:*", f"galaxy/engine:2.0@{DIGEST}", False),  # a tag and any digest: any image
    ("galaxy/engine:*@sha256:*", f"galaxy/engine:2.0@{DIGEST}", True),
    ("galaxy/engine:2.0@sha256:" + "0" * 64, "galaxy/engine:2.0@sha256:" + "0" * 64, True),
])
def test_a_tag_with_a_digest_is_allowed_only_where_the_digest_would_be(patterns, image_ref, allowed) -> None:
    """Red-team finding: Docker runs the digest of a reference that has both, whatever its tag says, so a
    pattern that allows some tags only (``galaxy/engine:2.*``) let ``galaxy/engine:2.0@sha256:<an 1.x
    image>`` run an image the list does not allow."""
    assert ImageAllowlist(patterns).allows(image_ref) is allowed


@pytest.mark.parametrize(("kind", "fields", "field"), [
    (JobKind.START, {"image_ref": "galaxy/engine:1"}, "game_id"),
    (JobKind.START, {"game_id": "g1"}, "image_ref"),
    (JobKind.PATCH, {"game_id": "g1"}, "image_ref"),
    (JobKind.STOP, {"game_id": "g1"}, "reason"),
    (JobKind.CLEANUP, {}, "game_id"),
])
def test_missing_field(kind: JobKind, fields: dict, field: str) -> None:
    exc = invalid(kind, b(fields))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert f"field {field} is missing" in exc.message


@pytest.mark.parametrize(("kind", "fields", "field"), [
    (JobKind.START, {"game_id": "", "image_ref": "galaxy/engine:1"}, "game_id"),
    (JobKind.START, {"game_id": "g1", "image_ref": ""}, "image_ref"),
    (JobKind.STOP, {"game_id": "g1", "reason": ""}, "reason"),
])
def test_empty_field(kind: JobKind, fields: dict, field: str) -> None:
    exc = invalid(kind, b(fields))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert f"field {field} is empty" in exc.message


def test_non_utf8_game_id() -> None:
    exc = invalid(JobKind.START, b({"game_id": b"g\xff\xfe1", "image_ref": "galaxy/engine:1"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "game_id is not valid UTF-8" in exc.message
    assert exc.game_id and exc.game_id.isprintable()
    assert exc.game_id.startswith("g") and exc.game_id.endswith("1")


def test_non_utf8_image_ref_carries_the_game_id() -> None:
    exc = invalid(JobKind.START, b({"game_id": "g1", "image_ref": b"galaxy/engine:\xc3"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "image_ref is not valid UTF-8" in exc.message
    assert exc.game_id == "g1"


def test_non_utf8_reason() -> None:
    exc = invalid(JobKind.STOP, b({"game_id": "g1", "reason": b"\x80"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "reason" in exc.message
    assert exc.game_id == "g1"


def test_oversized_game_id_is_truncated_in_the_error() -> None:
    raw = "a" * (MAX_FIELD + 500)
    exc = invalid(JobKind.START, b({"game_id": raw, "image_ref": "galaxy/engine:1"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert f"longer than {MAX_FIELD}" in exc.message
    assert exc.game_id == "a" * SHOWN_BAD_GAME_ID


def test_oversized_image_ref() -> None:
    exc = invalid(JobKind.START, b({"game_id": "g1", "image_ref": "galaxy/engine:" + "1" * 2000}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert exc.game_id == "g1"


def test_image_ref_longer_than_255_is_invalid_even_if_allowed() -> None:
    ref = "galaxy/engine/" + "a" * 250 + ":1"  # well-formed, 266 characters
    assert parse_job(JobKind.START, b({"game_id": "g1", "image_ref": ref[:240] + ":1"}),
                     ImageAllowlist("*")).image_ref  # the shape alone is fine
    exc = invalid(JobKind.START, b({"game_id": "g1", "image_ref": ref}), ImageAllowlist("*"))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert exc.game_id == "g1"


@pytest.mark.parametrize("game_id", [
    "a/b", "../etc", "..", ".", "Game1", "G", "a" * 52, "-abc", "abc-", "a_b", "a.b", "a b",
    "g1;rm -rf /", "$(id)", "`id`", "g1|cat", "g1&", "g1>x", "*", "/abs",
    "g1\n", "\ng1", "g1\x00", "\x1b[31mg1", "é",
])
def test_bad_game_ids(game_id: str) -> None:
    exc = invalid(JobKind.START, b({"game_id": game_id, "image_ref": "galaxy/engine:1"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "game_id" in exc.message
    assert exc.game_id.isprintable()
    assert len(exc.game_id) <= SHOWN_BAD_GAME_ID


@pytest.mark.parametrize("game_id", ["a", "9", "g1", "a-b", "a--b", "a" * 51, "0" + "-" * 49 + "z"])
def test_good_game_ids(game_id: str) -> None:
    assert parse_job(JobKind.CLEANUP, b({"game_id": game_id}), ALLOW).game_id == game_id


def test_bad_game_id_is_shown_printable_and_truncated() -> None:
    raw = "\x1b[31m" + "X" * 200 + "\n"
    exc = invalid(JobKind.STOP, b({"game_id": raw, "reason": "finished"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert exc.game_id.isprintable()
    assert exc.game_id == ("?[31m" + "X" * 200)[:SHOWN_BAD_GAME_ID]
    assert len(exc.game_id) == SHOWN_BAD_GAME_ID


def test_unknown_reason() -> None:
    exc = invalid(JobKind.STOP, b({"game_id": "g1", "reason": "bored"}))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "reason must be one of" in exc.message
    for r in StopReason:
        assert r.value in exc.message
    assert exc.game_id == "g1"


@pytest.mark.parametrize("image_ref", [
    "evil/engine:1", "galaxy/engine-evil:1", "docker.io/galaxy/engine:1", "galaxy/engine",
    "localhost:5001/galaxy/engine:1",
])
def test_image_not_on_allowlist(image_ref: str) -> None:
    exc = invalid(JobKind.START, b({"game_id": "g1", "image_ref": image_ref}))
    assert exc.code is ErrorCode.IMAGE_REJECTED
    assert "RTMANAGER_IMAGE_ALLOWLIST" in exc.message
    assert exc.game_id == "g1"


@pytest.mark.parametrize("image_ref", [
    "Galaxy/Engine:1", "galaxy/engine:", "galaxy//engine:1", "galaxy/engine:1 ", " galaxy/engine:1",
    "galaxy/engine:1;rm -rf /", "galaxy/engine@sha256:abc", "galaxy/engine:-1", "/galaxy/engine:1",
    "galaxy/engine:1\n", "galaxy/engine:1\x00",
])
def test_malformed_image_ref(image_ref: str) -> None:
    # even a permissive allowlist must not let a malformed reference through
    exc = invalid(JobKind.START, b({"game_id": "g1", "image_ref": image_ref}), ImageAllowlist("*"))
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert exc.game_id == "g1"


def test_allowlist_parsing() -> None:
    al = ImageAllowlist(" galaxy/engine:* ,, ,galaxy/engine-stub:1.0 ")
    assert al.patterns == ("galaxy/engine:*", "galaxy/engine-stub:1.0")
    assert al.allows("galaxy/engine:2")
    assert al.allows("galaxy/engine-stub:1.0")
    assert not al.allows("galaxy/engine-stub:1.1")
    assert not ImageAllowlist("").allows("galaxy/engine:1")
    assert ImageAllowlist(["a/b:*"]).allows("a/b:1")


@pytest.mark.parametrize(("ref", "repo"), [
    ("galaxy/engine:1.2", "galaxy/engine"),
    ("galaxy/engine", "galaxy/engine"),
    ("engine", "engine"),
    ("localhost:5000/galaxy/engine:1.2", "localhost:5000/galaxy/engine"),
    ("localhost:5000/galaxy/engine", "localhost:5000/galaxy/engine"),
    (f"galaxy/engine@{DIGEST}", "galaxy/engine"),
    (f"galaxy/engine:1.2@{DIGEST}", "galaxy/engine"),
    (f"localhost:5000/galaxy/engine:1.2@{DIGEST}", "localhost:5000/galaxy/engine"),
    (f"localhost:5000/galaxy/engine@{DIGEST}", "localhost:5000/galaxy/engine"),
])
def test_image_repository(ref: str, repo: str) -> None:
    assert image_repository(ref) == repo


# -------------------------------------------------------------- RecordDefaults

def test_state_path_under_root() -> None:
    assert DEFAULTS.state_path("g1") == "/var/lib/rtmanager/games/g1"


def test_state_path_relative_root_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = RecordDefaults(docker_network="n", state_root="games/", engine_port=1).state_path("g1")
    assert path == os.path.join(str(tmp_path), "games", "g1")


@pytest.mark.parametrize("game_id", ["..", "../x", "/etc", "a/../../b", ".", ""])
def test_state_path_refuses_escape(game_id: str) -> None:
    with pytest.raises(InvalidJob) as exc:
        DEFAULTS.state_path(game_id)
    assert exc.value.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("game_id", ["a", "g1", "a" * 51, "x-y"])
def test_state_path_stays_one_level_under_root(game_id: str) -> None:
    path = DEFAULTS.state_path(game_id)
    assert os.path.dirname(path) == "/var/lib/rtmanager/games"
    assert os.path.basename(path) == game_id
    assert os.path.normpath(path) == path


# -------------------------------------------------------------------- decide()

IMG2 = "galaxy/engine:2"
OTHER = "galaxy/engine-stub:1"


R, ST, RM = DesiredStatus.RUNNING, DesiredStatus.STOPPED, DesiredStatus.REMOVED
RECORDS: dict[str, RuntimeRecord | None] = {
    "none": None,
    "starting-pending": rec(Status.STARTING, R, gen=1, obs=0),
    "running-converged": rec(Status.RUNNING, R, gen=1, obs=1),
    "running-patching": rec(Status.RUNNING, R, gen=2, obs=1, desired_image_ref=IMG2),
    "running-stopping": rec(Status.RUNNING, ST, gen=2, obs=1, stop_reason=StopReason.FINISHED),
    "running-removing": rec(Status.RUNNING, RM, gen=3, obs=1, stop_reason=StopReason.FINISHED),
    "stopped-converged": rec(Status.STOPPED, ST, gen=2, obs=2, stop_reason=StopReason.FINISHED),
    "stopped-starting": rec(Status.STOPPED, R, gen=3, obs=2),
    "stopped-cleaning": rec(Status.STOPPED, RM, gen=3, obs=2, stop_reason=StopReason.FINISHED),
    "removed-converged": rec(Status.REMOVED, RM, gen=3, obs=3, stop_reason=StopReason.FINISHED),
    "removed-unconverged": rec(Status.REMOVED, RM, gen=4, obs=3),
    "starting-no-image": rec(Status.STARTING, ST, gen=2, obs=1, desired_image_ref=None),
}


def job(kind: JobKind, image: str | None = None, reason: StopReason | None = None) -> Job:
    return Job(kind=kind, game_id="g1", source=OpSource.LOBBY, image_ref=image, reason=reason)


START1, START2, START_OTHER = job(JobKind.START, IMG1), job(JobKind.START, IMG2), job(JobKind.START, OTHER)
STOP_FIN = job(JobKind.STOP, reason=StopReason.FINISHED)
STOP_CAN = job(JobKind.STOP, reason=StopReason.CANCELLED)
RESTART = job(JobKind.RESTART)
PATCH1, PATCH2, PATCH_OTHER = job(JobKind.PATCH, IMG1), job(JobKind.PATCH, IMG2), job(JobKind.PATCH, OTHER)
CLEANUP = job(JobKind.CLEANUP)

# (job, record name, expected action, extra expectation)
#   replay+c : replay_no_op carrying container id and endpoint
#   replay   : replay_no_op with empty container id and endpoint
#   change   : dict of desired fields of the new record (generation is checked as +1)
DECIDE_TABLE = [
    # start
    (START1, "none", "change", None),
    (START1, "starting-pending", "join", None),
    (START1, "running-converged", "replay+c", None),
    (START1, "running-patching", "change", dict(desired_status=R, desired_image_ref=IMG1)),
    (START1, "running-stopping", "change", dict(desired_status=R, desired_image_ref=IMG1, stop_reason=None)),
    (START1, "running-removing", "reject", None),  # removal is final once asked for
    (START1, "stopped-converged", "change", dict(desired_status=R, desired_image_ref=IMG1, stop_reason=None)),
    (START1, "stopped-starting", "join", None),
    (START1, "stopped-cleaning", "reject", None),
    (START1, "removed-converged", "reject", None),
    (START1, "removed-unconverged", "reject", None),
    (START2, "running-converged", "change", dict(desired_status=R, desired_image_ref=IMG2)),
    (START2, "running-patching", "join", None),
    (START2, "stopped-converged", "change", dict(desired_status=R, desired_image_ref=IMG2, stop_reason=None)),
    (START_OTHER, "running-converged", "change", dict(desired_status=R, desired_image_ref=OTHER)),
    # stop
    (STOP_FIN, "none", "replay", None),
    (STOP_FIN, "starting-pending", "change", dict(desired_status=ST, stop_reason=StopReason.FINISHED)),
    (STOP_FIN, "running-converged", "change", dict(desired_status=ST, stop_reason=StopReason.FINISHED)),
    (STOP_FIN, "running-patching", "change", dict(desired_status=ST, stop_reason=StopReason.FINISHED)),
    (STOP_FIN, "running-stopping", "join", None),
    (STOP_CAN, "running-stopping", "join", None),  # already stopping: another reason does not supersede
    (STOP_FIN, "running-removing", "join", None),
    (STOP_FIN, "stopped-converged", "replay", None),
    (STOP_CAN, "stopped-converged", "replay", None),
    (STOP_FIN, "stopped-starting", "change", dict(desired_status=ST, stop_reason=StopReason.FINISHED)),
    (STOP_FIN, "stopped-cleaning", "join", None),
    (STOP_FIN, "removed-converged", "replay", None),
    (STOP_FIN, "removed-unconverged", "join", None),  # answered when the removal converges
    # restart
    (RESTART, "none", "reject", None),
    (RESTART, "starting-pending", "change", dict(desired_status=R, desired_image_ref=IMG1, spec_revision=1)),
    (RESTART, "running-converged", "change", dict(desired_status=R, desired_image_ref=IMG1, spec_revision=1)),
    (RESTART, "running-patching", "change", dict(desired_status=R, desired_image_ref=IMG2, spec_revision=1)),
    (RESTART, "running-stopping", "change",
     dict(desired_status=R, desired_image_ref=IMG1, spec_revision=1, stop_reason=None)),
    (RESTART, "stopped-converged", "change",
     dict(desired_status=R, desired_image_ref=IMG1, spec_revision=1, stop_reason=None)),
    (RESTART, "stopped-starting", "change", dict(desired_status=R, desired_image_ref=IMG1, spec_revision=1)),
    (RESTART, "stopped-cleaning", "reject", None),
    (RESTART, "removed-converged", "reject", None),
    (RESTART, "starting-no-image", "reject", None),
    # patch
    (PATCH2, "none", "reject", None),
    (PATCH2, "starting-pending", "change", dict(desired_status=R, desired_image_ref=IMG2)),
    (PATCH2, "running-converged", "change", dict(desired_status=R, desired_image_ref=IMG2)),
    (PATCH2, "running-patching", "join", None),
    (PATCH1, "running-converged", "replay+c", None),
    (PATCH1, "running-patching", "change", dict(desired_status=R, desired_image_ref=IMG1)),
    (PATCH2, "running-stopping", "reject", None),
    (PATCH2, "stopped-converged", "reject", None),
    (PATCH2, "stopped-starting", "change", dict(desired_status=R, desired_image_ref=IMG2)),
    (PATCH2, "stopped-cleaning", "reject", None),
    (PATCH2, "removed-converged", "reject", None),
    (PATCH_OTHER, "running-converged", "reject", None),
    (PATCH_OTHER, "starting-pending", "reject", None),
    # cleanup
    (CLEANUP, "none", "replay", None),
    (CLEANUP, "starting-pending", "reject", None),
    (CLEANUP, "running-converged", "reject", None),
    (CLEANUP, "running-patching", "reject", None),
    (CLEANUP, "running-stopping", "change", dict(desired_status=RM)),
    (CLEANUP, "running-removing", "join", None),
    (CLEANUP, "stopped-converged", "change", dict(desired_status=RM, stop_reason=StopReason.FINISHED)),
    (CLEANUP, "stopped-starting", "reject", None),
    (CLEANUP, "stopped-cleaning", "join", None),
    (CLEANUP, "removed-converged", "replay", None),
    (CLEANUP, "removed-unconverged", "join", None),
]

_DESIRED_FIELDS = ("desired_status", "desired_image_ref", "stop_reason", "spec_revision")


@pytest.mark.parametrize(
    ("job_", "rec_name", "action", "want"),
    DECIDE_TABLE,
    ids=[f"{j.kind.value}{'-' + (j.image_ref or '').split(':')[-1] if j.image_ref else ''}"
         f"{'-' + j.reason.value if j.reason else ''}-on-{r}-{a}" for j, r, a, _ in DECIDE_TABLE],
)
def test_decide_table(job_: Job, rec_name: str, action: str, want: dict | None) -> None:
    record = RECORDS[rec_name]
    d = decide(record, job_, NOW, DEFAULTS)
    if action == "replay+c":
        assert d.action == "replay"
        assert d.error_code is ErrorCode.REPLAY_NO_OP
        assert d.container_id == "c1"
        assert d.engine_endpoint == ENDPOINT
        assert d.record is record
    elif action == "replay":
        assert d.action == "replay"
        assert d.error_code is ErrorCode.REPLAY_NO_OP
        assert d.container_id == "" and d.engine_endpoint == ""
        assert d.record is record
    elif action == "join":
        assert d.action == "join"
        assert d.error_code is None
        assert d.record is record
        assert not record.converged  # a join waits for a convergence that is still to come
        assert d.op_generation == record.generation
    elif action == "reject":
        assert d.action == "reject"
        assert d.error_code is ErrorCode.INVALID_REQUEST
        assert d.message
        assert d.record is record
    else:
        assert action == "change"
        assert d.action == "change"
        assert d.error_code is None
        new = d.record
        assert new is not None
        new.validate()
        if record is None:
            assert new.generation == 1 and new.observed_generation == 0
        else:
            assert new.generation == record.generation + 1
            assert new.observed_generation == record.observed_generation
            assert new.last_op_at == max(NOW, record.last_op_at)
            for f in _DESIRED_FIELDS:
                assert getattr(new, f) == want.get(f, getattr(record, f)), f
            # the observed half is untouched by intake
            for f in ("status", "current_container_id", "current_image_ref", "started_at", "stopped_at",
                      "removed_at", "created_at", "engine_endpoint", "state_path", "docker_network"):
                assert getattr(new, f) == getattr(record, f), f
        assert d.op_generation == new.generation


def test_decide_start_creates_a_new_record() -> None:
    d = decide(None, START1, NOW, DEFAULTS)
    new = d.record
    assert d.action == "change"
    assert new == RuntimeRecord(
        game_id="g1", status=Status.STARTING, current_container_id=None, current_image_ref=None,
        engine_endpoint="http://galaxy-game-g1:8080", state_path="/var/lib/rtmanager/games/g1",
        docker_network="galaxy-games", started_at=None, stopped_at=None, removed_at=None,
        last_op_at=NOW, created_at=NOW, desired_status=DesiredStatus.RUNNING, desired_image_ref=IMG1,
        generation=1, observed_generation=0, clock_from=NOW,
    )


def test_decide_patch_changing_repository_names_it() -> None:
    d = decide(RECORDS["running-converged"], PATCH_OTHER, NOW, DEFAULTS)
    assert d.action == "reject"
    assert "repository" in d.message and "'galaxy/engine'" in d.message


def test_decide_patch_keeps_registry_port_repository() -> None:
    r = rec(Status.RUNNING, R, gen=1, obs=1, current_image_ref="localhost:5000/galaxy/engine:1.2",
            desired_image_ref="localhost:5000/galaxy/engine:1.2")
    ok = decide(r, job(JobKind.PATCH, "localhost:5000/galaxy/engine:1.3"), NOW, DEFAULTS)
    assert ok.action == "change" and ok.record.desired_image_ref == "localhost:5000/galaxy/engine:1.3"
    bad = decide(r, job(JobKind.PATCH, "localhost:5001/galaxy/engine:1.3"), NOW, DEFAULTS)
    assert bad.action == "reject"
    digest = decide(r, job(JobKind.PATCH, f"localhost:5000/galaxy/engine@{DIGEST}"), NOW, DEFAULTS)
    assert digest.action == "change"


def test_decide_removed_record_refuses_start() -> None:
    d = decide(RECORDS["removed-converged"], START1, NOW, DEFAULTS)
    assert d.action == "reject"
    assert d.error_code is ErrorCode.INVALID_REQUEST
    assert "removed" in d.message


def test_decide_change_never_moves_last_op_backwards() -> None:
    r = RECORDS["running-converged"]
    earlier = r.last_op_at - timedelta(hours=1)
    d = decide(r, STOP_FIN, earlier, DEFAULTS)
    assert d.action == "change"
    assert d.record.last_op_at == r.last_op_at
    d.record.validate()


def test_decide_is_pure() -> None:
    r = RECORDS["running-converged"]
    before = r.replace()
    decide(r, STOP_FIN, NOW, DEFAULTS)
    decide(r, RESTART, NOW, DEFAULTS)
    assert r == before


def test_decide_restart_twice_bumps_spec_revision_each_time() -> None:
    r = RECORDS["running-converged"]
    one = decide(r, RESTART, NOW, DEFAULTS).record
    two = decide(one, RESTART, NOW, DEFAULTS).record
    assert (one.spec_revision, two.spec_revision) == (1, 2)
    assert (one.generation, two.generation) == (2, 3)


@pytest.mark.parametrize("raw", ["1_000", " +60\n", "+60", "\u0666\u0660", "0_0_7", "60.0", "-0", "", "1e3",
                                 "0" * 4301 + "1", "604801"])
def test_a_turn_interval_is_ascii_digits_only(raw: str) -> None:
    """Red-team finding: int() took underscores, signs, spaces and other scripts' digits."""
    fields = b({"game_id": "g1", "image_ref": "galaxy/engine:1.2", "turn_interval": raw})
    assert "turn_interval" in invalid(JobKind.START, fields).message


@pytest.mark.parametrize("raw,value", [("0", 0), ("60", 60), ("0060", 60), ("00000060", 60), ("0" * 40, 0),
                                       ("604800", 604800)])
def test_a_turn_interval_in_digits_is_taken(raw: str, value: int) -> None:
    fields = b({"game_id": "g1", "image_ref": "galaxy/engine:1.2", "turn_interval": raw})
    assert parse_job(JobKind.START, fields, ALLOW).turn_interval == value
