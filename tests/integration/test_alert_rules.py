"""The alert rules through promtool (Debian's `prometheus` package, which deploy/test.sh installs;
the same promtool 2.42 as the stack's rtmanager-prometheus:2.42 image): they parse, their unit
tests (deploy/prometheus/alerts-test.yml) pass, and the stack's Prometheus configuration loads them
from where deploy/compose.yaml mounts them. Without promtool the test fails; it never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
    if not found:
        pytest.fail("`promtool` is not installed (apt-get install prometheus; deploy/test.sh does): the alert "
                    "rules cannot be tested", pytrace=False)
    return found


def run(*args: str, cwd: Path) -> str:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_the_rules_parse_and_their_unit_tests_pass():
    assert "SUCCESS" in run("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in run("test", "rules", "alerts-test.yml", cwd=PROMETHEUS_DIR)


def test_a_broken_expectation_fails_the_rules_test(tmp_path: Path):
    """promtool compares what fires, labels and annotations: the test above can fail."""
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    text = (PROMETHEUS_DIR / "alerts-test.yml").read_text()
    broken = text.replace("exp_labels: {severity: page, job: rtmanager}",
                          "exp_labels: {severity: warning, job: rtmanager}", 1)
    assert broken != text
    (tmp_path / "alerts-test.yml").write_text(broken)
    proc = subprocess.run([promtool(), "test", "rules", "alerts-test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_stack_configuration_loads_the_rules_where_compose_mounts_them(tmp_path: Path):
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose
    # /etc/prometheus of the container, as the two mounts make it.
    shutil.copy(ROOT / "deploy" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    out = run("check", "config", "prometheus.yml", cwd=tmp_path)
    rules = sum(len(g["rules"]) for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"])
    assert "1 rule files found" in out and f"{rules} rules found" in out, out
