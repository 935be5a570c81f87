#!/usr/bin/env bash
# The test command: bring up Postgres, Redis and dockerd when they are not
# running (installing what is missing), build the stub engine images, make the
# virtual environment, then run the whole suite. Extra arguments go to pytest.
#   bash deploy/test.sh              # everything
#   bash deploy/test.sh tests/unit   # one tier
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash deploy/local/services.sh up)"
# The metrics test scrapes rtmanager with a real Prometheus server (Debian's package).
if ! command -v prometheus >/dev/null 2>&1; then
  echo "test.sh: installing prometheus" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
fi
# libfaketime runs a replica whose wall clock is behind (tests/e2e/test_production_events.py).
if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
  echo "test.sh: installing faketime" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null; }
fi
bash deploy/engine-stub/build.sh >/dev/null
bash deploy/local/venv.sh
# Layering and style first: they take seconds and say where the structure broke.
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/mypy
export RTMANAGER_TEST_DATABASE_URL=${RTMANAGER_DATABASE_URL%/*}/postgres
export RTMANAGER_TEST_REDIS_URL=$RTMANAGER_REDIS_URL
exec .venv/bin/python -m pytest -p no:cacheprovider "${@:-tests}"
