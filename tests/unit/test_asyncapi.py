"""docs/asyncapi.yaml is held in step with the code.

Every check compares a value read from the document with the value the code
uses, so changing either side alone fails the test: enums, the fields of a
result, the game_id and image_ref limits, the default stream names, the
documented error codes, and the examples (which the code must accept).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.config import VARIABLES
from desired import snapshots
from desired.jobs import IMAGE_REF_PATTERN, MAX_IMAGE_REF, SHOWN_BAD_GAME_ID, ImageAllowlist, parse_control, parse_job
from desired.model import CONTROL_OPS, GAME_ID_PATTERN, ErrorCode, JobKind, JobResult, Outcome, Status, StopReason

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
DEFAULTS = {v.name: v.default for v in VARIABLES}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    with DOC_PATH.open(encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh)
    assert isinstance(loaded, dict)
    return loaded


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s (``#/a/b``) until a node that is not a reference."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are expected, got {ref}"
        assert ref not in seen, f"reference cycle at {ref}"
        seen.add(ref)
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def channel_message(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    messages = doc["channels"][channel]["messages"]
    assert len(messages) == 1, f"channel {channel} should carry one message"
    return resolve(doc, next(iter(messages.values())))


def payload(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    return resolve(doc, channel_message(doc, channel)["payload"])


def field(doc: dict[str, Any], channel: str, name: str) -> dict[str, Any]:
    return resolve(doc, payload(doc, channel)["properties"][name])


def result_keys() -> list[str]:
    sample = JobResult(result_id=str(uuid.uuid4()), game_id="g", outcome=Outcome.SUCCESS, job=JobKind.START)
    return list(sample.fields())


def test_document_is_asyncapi_3(doc: dict[str, Any]) -> None:
    assert str(doc["asyncapi"]).startswith("3.")
    servers = doc["servers"]
    assert [s["protocol"] for s in servers.values()] == ["redis"]


def test_stop_reason_enum(doc: dict[str, Any]) -> None:
    assert field(doc, "stopJobs", "reason")["enum"] == [r.value for r in StopReason]


def test_job_kind_enum(doc: dict[str, Any]) -> None:
    assert field(doc, "jobResults", "job")["enum"] == [k.value for k in JobKind]


def test_outcome_enum(doc: dict[str, Any]) -> None:
    assert field(doc, "jobResults", "outcome")["enum"] == [o.value for o in Outcome]


def test_error_code_enum_includes_empty(doc: dict[str, Any]) -> None:
    assert field(doc, "jobResults", "error_code")["enum"] == [""] + [c.value for c in ErrorCode]


def test_every_error_code_is_described(doc: dict[str, Any]) -> None:
    description = field(doc, "jobResults", "error_code")["description"]
    described = re.findall(r"^\|\s*`([a-z_]+)`\s*\|", description, flags=re.MULTILINE)
    assert described == [c.value for c in ErrorCode]


def test_result_fields_are_all_required(doc: dict[str, Any]) -> None:
    schema = payload(doc, "jobResults")
    assert schema["required"] == result_keys()
    assert list(schema["properties"]) == result_keys()
    assert schema.get("additionalProperties") is False


def test_result_id_is_a_uuid(doc: dict[str, Any]) -> None:
    assert field(doc, "jobResults", "result_id")["format"] == "uuid"


def test_job_fields_are_required(doc: dict[str, Any]) -> None:
    assert payload(doc, "startJobs")["required"] == ["game_id", "image_ref"]
    assert payload(doc, "stopJobs")["required"] == ["game_id", "reason"]
    # every required job field is really required by the parser
    allowlist = ImageAllowlist(DEFAULTS["RTMANAGER_IMAGE_ALLOWLIST"])
    for channel, kind in (("startJobs", JobKind.START), ("stopJobs", JobKind.STOP)):
        example = channel_message(doc, channel)["examples"][0]["payload"]
        for name in payload(doc, channel)["required"]:
            partial = {k: v for k, v in example.items() if k != name}
            with pytest.raises(ValueError, match=name):
                parse_job(kind, partial, allowlist)


@pytest.mark.parametrize("channel", ["startJobs", "stopJobs"])
def test_game_id_pattern_and_length(doc: dict[str, Any], channel: str) -> None:
    game_id = field(doc, channel, "game_id")
    assert game_id["pattern"] == GAME_ID_PATTERN.pattern
    longest = game_id["maxLength"]
    assert GAME_ID_PATTERN.match("a" * longest)
    assert not GAME_ID_PATTERN.match("a" * (longest + 1))


def test_result_game_id_length(doc: dict[str, Any]) -> None:
    assert field(doc, "jobResults", "game_id")["maxLength"] == SHOWN_BAD_GAME_ID


def test_image_ref_limits(doc: dict[str, Any]) -> None:
    image_ref = field(doc, "startJobs", "image_ref")
    assert image_ref["maxLength"] == MAX_IMAGE_REF
    assert image_ref["pattern"] == IMAGE_REF_PATTERN.pattern


@pytest.mark.parametrize("channel, variable", [
    ("startJobs", "RTMANAGER_START_STREAM"),
    ("stopJobs", "RTMANAGER_STOP_STREAM"),
    ("jobResults", "RTMANAGER_RESULTS_STREAM"),
    ("deadLetters", "RTMANAGER_DEAD_LETTER_STREAM"),
    ("snapshots", "RTMANAGER_SNAPSHOT_STREAM"),
    ("controlJobs", "RTMANAGER_CONTROL_STREAM"),
])
def test_channel_address_is_the_default_stream(doc: dict[str, Any], channel: str, variable: str) -> None:
    ch = doc["channels"][channel]
    assert ch["address"] == DEFAULTS[variable]
    assert variable in ch["description"]


def test_consumer_group_default(doc: dict[str, Any]) -> None:
    group = DEFAULTS["RTMANAGER_CONSUMER_GROUP"]
    assert f"`RTMANAGER_CONSUMER_GROUP` (default `{group}`)" in doc["info"]["description"]


def test_operations_direction(doc: dict[str, Any]) -> None:
    actions = {resolve(doc, op["channel"])["address"]: op["action"] for op in doc["operations"].values()}
    assert actions == {
        DEFAULTS["RTMANAGER_START_STREAM"]: "receive",
        DEFAULTS["RTMANAGER_STOP_STREAM"]: "receive",
        DEFAULTS["RTMANAGER_RESULTS_STREAM"]: "send",
        DEFAULTS["RTMANAGER_DEAD_LETTER_STREAM"]: "send",
        DEFAULTS["RTMANAGER_SNAPSHOT_STREAM"]: "send",
        DEFAULTS["RTMANAGER_CONTROL_STREAM"]: "receive",
    }


def test_control_ops_are_the_codes(doc: dict[str, Any]) -> None:
    assert field(doc, "controlJobs", "op")["enum"] == [k.value for k in CONTROL_OPS]
    example = channel_message(doc, "controlJobs")["examples"][0]["payload"]
    assert parse_control(example).kind.value == example["op"]


def test_snapshot_fields_and_reasons_are_the_codes(doc: dict[str, Any]) -> None:
    schema = payload(doc, "snapshots")
    assert schema["required"] == list(snapshots.FIELDS) == list(schema["properties"])
    assert field(doc, "snapshots", "reason")["enum"] == list(snapshots.REASONS)
    assert field(doc, "snapshots", "status")["enum"] == [s.value for s in Status]
    example = channel_message(doc, "snapshots")["examples"][0]["payload"]
    assert list(example) == list(snapshots.FIELDS)


def test_every_stream_variable_has_a_channel(doc: dict[str, Any]) -> None:
    """A stream added to the configuration must be described in the document too."""
    stream_vars = {v.name for v in VARIABLES if v.name.endswith("_STREAM")}
    addresses = {ch["address"] for ch in doc["channels"].values()}
    assert {DEFAULTS[v] for v in stream_vars} == addresses


@pytest.mark.parametrize("channel, kind", [("startJobs", JobKind.START), ("stopJobs", JobKind.STOP)])
def test_job_examples_are_accepted(doc: dict[str, Any], channel: str, kind: JobKind) -> None:
    allowlist = ImageAllowlist(DEFAULTS["RTMANAGER_IMAGE_ALLOWLIST"])
    examples = channel_message(doc, channel)["examples"]
    assert examples
    for example in examples:
        job = parse_job(kind, example["payload"], allowlist)
        assert job.game_id == example["payload"]["game_id"]


def test_result_examples_are_results(doc: dict[str, Any]) -> None:
    examples = channel_message(doc, "jobResults")["examples"]
    assert examples
    for example in examples:
        p = example["payload"]
        assert all(isinstance(v, str) for v in p.values())
        uuid.UUID(p["result_id"])
        result = JobResult(
            result_id=p["result_id"], game_id=p["game_id"], outcome=Outcome(p["outcome"]),
            job=JobKind(p["job"]), job_entry_id=p["job_entry_id"], container_id=p["container_id"],
            engine_endpoint=p["engine_endpoint"],
            error_code=ErrorCode(p["error_code"]) if p["error_code"] else None,
            error_message=p["error_message"],
        )
        assert result.fields() == p
