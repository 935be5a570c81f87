#!/usr/bin/env bash
# The benchmark: brings up the local services like the tests do, installs
# Debian's docker-compose when missing, then runs bench/run.py (arguments pass through).
#   bash bench/run.sh --scale [--games N] [--sim-games M] [--sections a,b,...]
# runs the scale benchmark bench/scale.py instead (see its docstring; no docker-compose needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scale=0
args=()
for a in "$@"; do
  if [ "$a" = --scale ]; then scale=1; else args+=("$a"); fi
done
eval "$(bash deploy/local/services.sh up)"
bash deploy/engine-stub/build.sh >/dev/null
bash deploy/local/venv.sh
export RTMANAGER_TEST_DATABASE_URL=${RTMANAGER_DATABASE_URL%/*}/postgres
if [ "$scale" = 1 ]; then
  exec .venv/bin/python bench/scale.py ${args[@]+"${args[@]}"}
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
exec .venv/bin/python bench/run.py ${args[@]+"${args[@]}"}
