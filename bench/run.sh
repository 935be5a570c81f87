#!/usr/bin/env bash
# The benchmark: brings up the local services like the tests do, installs
# Debian's docker-compose when missing, then runs bench/run.py (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash deploy/local/services.sh up)"
bash deploy/engine-stub/build.sh >/dev/null
bash deploy/local/venv.sh
if ! command -v docker-compose >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
export RTMANAGER_TEST_DATABASE_URL=${RTMANAGER_DATABASE_URL%/*}/postgres
exec .venv/bin/python bench/run.py "$@"
