#!/usr/bin/env bash
# The test command: bring up Postgres, Redis and dockerd when they are not
# running (installing what is missing), build the stub engine images, make the
# virtual environment, then run the whole suite. Extra arguments go to pytest.
#   bash deploy/test.sh              # everything
#   bash deploy/test.sh tests/unit   # one tier
# Prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS_NAME=test
# shellcheck source=deploy/local/steps.sh
. deploy/local/steps.sh

tools() {
  local pkgs=()
  # The metrics test scrapes rtmanager with a real Prometheus server (Debian's package), whose
  # promtool tests the alert rules (tests/integration/test_alert_rules.py).
  command -v prometheus >/dev/null 2>&1 || pkgs+=(prometheus)
  # libfaketime runs a replica whose wall clock is behind (tests/e2e/test_production_events.py).
  ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || pkgs+=(faketime)
  # The console's test drives a headless Chromium (tests/integration/test_console.py): about 25 s to
  # install on a fresh machine, nothing once installed.
  command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || pkgs+=(chromium-driver)
  [ ${#pkgs[@]} = 0 ] || apt_install "${pkgs[@]}"
}

# Layering and style first: they take seconds and say where the structure broke.
# (A step runs in a `||` context, where set -e does not apply: chain with &&.)
checks() {
  .venv/bin/ruff check . \
    && { .venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache; } \
    && .venv/bin/mypy
}

step "local services" local_services
step "tools" tools
step "stub engine images" bash -c 'bash deploy/engine-stub/build.sh >/dev/null'
step "venv" bash deploy/local/venv.sh
step "ruff, import layers, mypy" checks
# The slowest tests are listed at the end: the whole CI must stay under 20 minutes.
step "pytest" .venv/bin/python -m pytest -p no:cacheprovider --durations=15 "${@:-tests}"
