"""A real Prometheus server scrapes ``rtmanager run``'s /metrics, and the series read back through its HTTP API.

Needs the ``prometheus`` binary (Debian's prometheus package; deploy/quickstart.sh
and the CI image install it). Without it the test fails; it never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.support import ROOT, ControllerProcess, ResultReader, eventually_sync, free_port, migrate

PROMETHEUS_WAIT = 240.0  # the binary may still be being installed when the suite starts


def prometheus_binary() -> str:
    deadline = time.monotonic() + PROMETHEUS_WAIT
    while True:
        found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK)
                                               else None)
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail("the `prometheus` binary is not installed (apt-get install prometheus); "
                        "this test needs a real Prometheus server", pytrace=False)
        time.sleep(2)


def get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def get_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_until(cond, timeout: float, what: str, details=None):
    """Prometheus and rtmanager not answering yet (connection refused, JSON not there) is "not yet"."""
    return eventually_sync(cond, timeout, what, 0.25, retry_on=(AssertionError, OSError, ValueError, KeyError),
                           detail=details)


def query(prom: str, promql: str) -> list[dict]:
    body = get_json(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_rtmanager_metrics(rtm_env, tmp_path: Path, unique):
    binary = prometheus_binary()
    migrate(rtm_env)
    port = free_port()
    env = {**rtm_env, "RTMANAGER_HTTP_PORT": str(port), "RTMANAGER_HTTP_HOST": "127.0.0.1"}
    ctl = ControllerProcess(env, tmp_path / "rtmanager.log").start()
    results = ResultReader(rtm_env["RTMANAGER_REDIS_URL"], rtm_env["RTMANAGER_RESULTS_STREAM"])
    r = redis.Redis.from_url(rtm_env["RTMANAGER_REDIS_URL"], decode_responses=True)
    prom_proc: subprocess.Popen | None = None
    prom_log = tmp_path / "prometheus.log"
    target = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: get_json(f"http://{target}/readyz")["leader"], 20, "rtmanager leading",
                   lambda: ctl.log()[-2000:])
        entry = r.xadd(rtm_env["RTMANAGER_START_STREAM"],
                       {"game_id": f"prom-{unique}", "image_ref": "galaxy/engine-stub:1.0"})
        res = results.for_entry(entry, timeout=40)
        assert res["outcome"] == "success", (res, ctl.log()[-3000:])
        text = get_text(f"http://{target}/metrics")
        assert "rtmanager_leader 1.0" in text.splitlines()
        assert any(line.startswith("rtmanager_reconcile_total{") for line in text.splitlines()), text

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: ['{ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}']\n"
            "scrape_configs:\n"
            "  - job_name: rtmanager\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n")
        prom_port = free_port()
        prom = f"http://127.0.0.1:{prom_port}"
        with open(prom_log, "wb") as log:
            prom_proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

        def prom_details() -> str:
            alive = "running" if prom_proc.poll() is None else f"exited {prom_proc.returncode}"
            try:
                targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            except Exception as exc:  # noqa: BLE001 - for the message only
                targets = repr(exc)
            return (f"\nprometheus {alive}; targets: {targets}\nprometheus log:\n"
                    f"{prom_log.read_text(errors='replace')[-3000:]}")

        wait_until(lambda: get_text(f"{prom}/-/ready").strip() != "", 20, "Prometheus ready", prom_details)

        def leader_sample():
            series = query(prom, "rtmanager_leader")
            return series if series and series[0]["value"][1] == "1" else None

        [series] = wait_until(leader_sample, 30, "rtmanager_leader == 1 read back from Prometheus", prom_details)
        assert series["metric"]["job"] == "rtmanager" and series["metric"]["instance"] == target, series

        reconciles = wait_until(lambda: query(prom, "rtmanager_reconcile_total"), 10,
                                "rtmanager_reconcile_total in Prometheus", prom_details)
        assert all(s["metric"]["__name__"] == "rtmanager_reconcile_total" for s in reconciles), reconciles
        assert sum(float(s["value"][1]) for s in reconciles if s["metric"].get("result") == "ok") >= 1, reconciles
        [up] = query(prom, f'up{{job="rtmanager",instance="{target}"}}')
        assert up["value"][1] == "1", up
        published = query(prom, 'sum(rtmanager_results_published_total{outcome="success"})')
        assert published and float(published[0]["value"][1]) >= 1, published

        # The alert rules (deploy/prometheus/alerts.yml) evaluate against the real series, and none
        # fires on this healthy controller.
        def rules_evaluated():
            groups = get_json(f"{prom}/api/v1/rules?type=alert")["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

        rules = wait_until(rules_evaluated, 10, "the alert rules evaluated", prom_details)
        assert "RtmanagerTurnsLate" in {rule["name"] for rule in rules}
        assert [rule["name"] for rule in rules if rule["state"] == "firing"] == [], rules
    finally:
        if prom_proc is not None and prom_proc.poll() is None:
            prom_proc.terminate()
            try:
                prom_proc.wait(15)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
                prom_proc.wait()
        code = ctl.stop()
        results.close()
        r.close()
    assert code == 0, ctl.log()[-3000:]
