"""deploy/prometheus/alerts.yml against what rtmanager exports and documents: every metric a rule
reads is one rtmanager's registry has, every alert has its runbook paragraph in docs/runbook.md and
a case in the rules test (promtool runs it: tests/integration/test_alert_rules.py)."""

from __future__ import annotations

import re

import yaml
from prometheus_client import CollectorRegistry

from controller.metrics import Metrics
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts-test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"

# Series Prometheus makes itself (scrape health), not rtmanager's.
PROMETHEUS_OWN = {"up"}
# A metric name in PromQL: an identifier not followed by "(" (a function) and not a label name
# (inside braces) or a keyword; the rules only read rtmanager_*, process_* and Prometheus's own.
METRIC = re.compile(r"(?<![\w{,\"=~])([a-zA-Z_:][\w:]*)(?=\s*(?:\{|\[|\)|$|\s|==|<|>|!))")
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset",
            # aggregations, which may be followed by "by (...)" rather than "("
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
            "quantile"}


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (a labelled metric's children may not exist yet)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("_count", "_sum", "_created")}
    names = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", without_labels)
    found = set()
    for m in METRIC.finditer(without_groupings):
        name = m.group(1)
        if name in KEYWORDS or re.fullmatch(r"[\d.]+[smhdwy]?", name):
            continue
        found.add(name)
    return found


def test_the_metric_name_parser_finds_what_a_rule_reads():
    expr = ('max by (job, stream) (rtmanager_stream_oldest_unhandled_seconds and on (job, instance) '
            '(rtmanager_leader == 1)) > 120 or absent(rtmanager_leader) '
            'or predict_linear(rtmanager_state_free_bytes[6h], 4 * 3600) < 0 '
            'or increase(rtmanager_engine_crashes_total{given_up="true"}[1h])')
    assert names_in(expr) == {"rtmanager_stream_oldest_unhandled_seconds", "rtmanager_leader",
                              "rtmanager_state_free_bytes", "rtmanager_engine_crashes_total"}


def test_every_metric_the_rules_read_is_exported_by_rtmanager():
    exported = exported_names(Metrics().registry)
    assert "process_start_time_seconds" in exported  # the process collector is registered
    read = set()
    unknown = {}
    for rule in alerts():
        names = names_in(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expression"
        read |= names
        missing = names - exported - PROMETHEUS_OWN
        if missing:
            unknown[rule["alert"]] = sorted(missing)
    assert not unknown, f"rules read metrics rtmanager does not export: {unknown}"
    # The ones this file was written for (the list) are all read.
    assert {"rtmanager_leader", "rtmanager_relay_stalled_seconds", "rtmanager_outbox_pending",
            "rtmanager_engine_crashes_total", "rtmanager_runtime_records", "rtmanager_turn_lateness_intervals",
            "rtmanager_state_storage_full", "rtmanager_state_free_bytes",
            "rtmanager_stream_oldest_unhandled_seconds"} <= read


def test_labels_of_the_rules_exist_on_the_metrics():
    """A matcher on a label the metric does not have would never match (a silent rule)."""
    labels = {family.name: set() for family in Metrics().registry.collect()}
    m = Metrics()
    for attr in vars(m).values():
        name = getattr(attr, "_name", None)
        if name is not None:
            labels.setdefault(name, set()).update(getattr(attr, "_labelnames", ()))
    for rule in alerts():
        for metric, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", rule["expr"]):
            base = re.sub(r"_total$", "", metric)
            if base not in labels:
                continue
            for label in re.findall(r"(\w+)\s*[=!]~?", matchers):
                assert label in labels[base] | {"job", "instance"}, f"{rule['alert']}: {metric} has no label {label}"


def test_every_alert_has_a_severity_a_text_and_its_runbook_paragraph():
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "an alert name twice"
    for rule in alerts():
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        anchor = rule["alert"].lower()
        assert notes["runbook_url"] == f"docs/runbook.md#{anchor}", rule["alert"]
        assert anchor in headings, f"docs/runbook.md has no heading {rule['alert']}"


def test_every_alert_is_exercised_by_the_rules_test():
    cases = yaml.safe_load(RULES_TEST.read_text())
    assert cases["rule_files"] == ["alerts.yml"]
    fired = {t["alertname"] for case in cases["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alerts()}, "every alert has a case where it fires"
