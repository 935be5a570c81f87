#!/usr/bin/env bash
# Bring up the local dependencies of rtmanager on a Debian machine, as root:
# dockerd, a throwaway PostgreSQL cluster and a Redis server, each started only
# when it is not already answering. Idempotent: run it as often as you like.
#
#   deploy/local/services.sh up     install what is missing, start what is down,
#                                   then print the environment to use
#   deploy/local/services.sh env    print the environment only (export lines)
#   deploy/local/services.sh down   stop the Postgres and Redis this script started
#
# Everything lives under $RTM_LOCAL_DIR (default /var/tmp/rtmanager-local).
# If RTMANAGER_DATABASE_URL or RTMANAGER_REDIS_URL is already set, that service
# is left to you and not started here.
set -euo pipefail

LOCAL_DIR=${RTM_LOCAL_DIR:-/var/tmp/rtmanager-local}
PG_PORT=${RTM_LOCAL_PG_PORT:-55432}
REDIS_PORT=${RTM_LOCAL_REDIS_PORT:-56379}
PG_BIN=${RTM_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

log() { echo "services: $*" >&2; }
die() { echo "services: error: $*" >&2; exit 1; }

db_url() { echo "postgresql://postgres@127.0.0.1:${PG_PORT}/rtmanager"; }
redis_url() { echo "redis://127.0.0.1:${REDIS_PORT}/0"; }

print_env() {
  echo "export RTMANAGER_DATABASE_URL=${RTMANAGER_DATABASE_URL:-$(db_url)}"
  echo "export RTMANAGER_REDIS_URL=${RTMANAGER_REDIS_URL:-$(redis_url)}"
}

install_missing() {
  local pkgs=()
  command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
  command -v docker >/dev/null 2>&1 || pkgs+=(docker.io)
  command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] || pkgs+=(postgresql)
  # The stub engine image needs a statically linked busybox.
  if ! { [ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; }; then
    dpkg -s busybox-static >/dev/null 2>&1 || pkgs+=(busybox-static)
  fi
  command -v file >/dev/null 2>&1 || pkgs+=(file)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
  if [ ${#pkgs[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages (${pkgs[*]}) and not root: install them first"
    log "installing: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${pkgs[@]}" | sort -u) >/dev/null
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
}

wait_for() { # seconds, description, command...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up within ${secs}s"
}

start_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  [ -z "${DOCKER_HOST:-}" ] || die "DOCKER_HOST=$DOCKER_HOST does not answer"
  log "starting dockerd (log: $LOCAL_DIR/dockerd.log)"
  nohup dockerd >"$LOCAL_DIR/dockerd.log" 2>&1 &
  wait_for 60 dockerd docker info
}

start_postgres() {
  [ -z "${RTMANAGER_DATABASE_URL:-}" ] || return 0
  local data=$LOCAL_DIR/pg
  if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    mkdir -p "$data"
    chown postgres: "$LOCAL_DIR" "$data" 2>/dev/null || true
    chmod 700 "$data"
    if [ ! -f "$data/PG_VERSION" ]; then
      log "creating a throwaway Postgres cluster in $data"
      runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust \
        -E UTF8 --locale=C.UTF-8 >"$LOCAL_DIR/initdb.log" 2>&1 || die "initdb failed: see $LOCAL_DIR/initdb.log"
    fi
    log "starting Postgres on 127.0.0.1:$PG_PORT"
    # fsync off: this cluster is for development and tests only.
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l "$LOCAL_DIR/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $data -c fsync=off -c max_connections=200 -c shared_preload_libraries=pg_stat_statements" start >/dev/null \
      || die "Postgres did not start: see $LOCAL_DIR/postgres.log"
  fi
  "$PG_BIN/psql" -qtA -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c "SELECT 1 FROM pg_database WHERE datname='rtmanager'" | grep -q 1 \
    || "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres rtmanager
}

start_redis() {
  [ -z "${RTMANAGER_REDIS_URL:-}" ] || return 0
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then return; fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  mkdir -p "$LOCAL_DIR/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --dir "$LOCAL_DIR/redis" \
    --appendonly yes --save '' --logfile "$LOCAL_DIR/redis.log" --pidfile "$LOCAL_DIR/redis.pid"
  wait_for 20 redis redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
}

stop_all() {
  if [ -f "$LOCAL_DIR/pg/PG_VERSION" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$LOCAL_DIR/pg" -m fast stop >/dev/null 2>&1 || true
  fi
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}

case "${1:-up}" in
  up)
    install_missing
    mkdir -p "$LOCAL_DIR"
    start_docker
    start_postgres
    start_redis
    print_env
    ;;
  env) print_env ;;
  down) stop_all ;;
  *) die "usage: $0 up|env|down" ;;
esac
