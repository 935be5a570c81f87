#!/usr/bin/env bash
# One command on a fresh Debian machine (as root): install what is missing,
# start local Postgres, Redis and dockerd when they are not running, create the
# virtual environment, apply migrations, build the stub engine images, run the
# controller in the background, and play a short demo through the job streams:
# start three games, print their results, stop one, print its result.
#
#   bash deploy/quickstart.sh          # leaves the controller running
#   bash deploy/quickstart.sh --stop   # stops the controller it started
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RTM_LOCAL_DIR:-/var/tmp/rtmanager-local}
PID_FILE=$RUN_DIR/rtmanager.pid
LOG_FILE=$RUN_DIR/rtmanager.log

stop_controller() {
  if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "== stopping the controller (pid $(cat "$PID_FILE"))"
    kill -TERM "$(cat "$PID_FILE")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$PID_FILE")" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$PID_FILE"
}
if [ "${1:-}" = "--stop" ]; then stop_controller; exit 0; fi

echo "== local services (Postgres, Redis, dockerd)"
eval "$(bash deploy/local/services.sh up)"
mkdir -p "$RUN_DIR"
echo "== virtual environment"
bash deploy/local/venv.sh
echo "== stub engine images"
bash deploy/engine-stub/build.sh
export PATH=$PWD/.venv/bin:$PATH
export RTMANAGER_STATE_ROOT=${RTMANAGER_STATE_ROOT:-$RUN_DIR/games}
export RTMANAGER_LOG_FORMAT=${RTMANAGER_LOG_FORMAT:-text}
if [ -z "${RTMANAGER_API_TOKEN:-}" ]; then
  [ -f "$RUN_DIR/api-token" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$RUN_DIR/api-token")
  RTMANAGER_API_TOKEN=$(cat "$RUN_DIR/api-token")
  export RTMANAGER_API_TOKEN
fi
echo "== migrations"
rtmanager migrate
echo "== controller"
stop_controller
nohup rtmanager run >>"$LOG_FILE" 2>&1 &
echo $! >"$PID_FILE"
for _ in $(seq 1 50); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${RTMANAGER_HTTP_PORT:-8090}/healthz', timeout=1)" \
    >/dev/null 2>&1 && break
  kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { echo "the controller exited; its log:"; tail -20 "$LOG_FILE"; exit 1; }
  sleep 0.2
done
echo "rtmanager run: pid $(cat "$PID_FILE"), log $LOG_FILE"

echo "== demo: start jobs for three games"
entries=()
for g in demo-1 demo-2 demo-3; do
  entries+=("$(rtmanager submit start "$g" galaxy/engine-stub:1.0)")
done
rtmanager results --wait-for "${entries[@]}" --timeout 90
echo "== demo: stop demo-3 (reason finished)"
stop_entry=$(rtmanager submit stop demo-3 finished)
rtmanager results --wait-for "$stop_entry" --timeout 60
echo "== runtimes"
rtmanager status
cat <<MSG

The controller keeps running (pid $(cat "$PID_FILE")). Try:
  export PATH=$PWD/.venv/bin:\$PATH RTMANAGER_STATE_ROOT=$RTMANAGER_STATE_ROOT
  rtmanager submit start my-game galaxy/engine-stub:1.1; rtmanager results
  curl -s -H "Authorization: Bearer \$(cat $RUN_DIR/api-token)" http://127.0.0.1:${RTMANAGER_HTTP_PORT:-8090}/api/v1/runtimes
  bash deploy/quickstart.sh --stop
MSG
