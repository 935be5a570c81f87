#!/bin/sh
# Entrypoint of rtmanager-postgres:15 (runs as the postgres user).
#   POSTGRES_PASSWORD  required on the first start: password of POSTGRES_USER
#   POSTGRES_USER      superuser to create (default postgres)
#   POSTGRES_DB        database to create (default: POSTGRES_USER)
#   PGDATA             cluster directory (default /var/lib/postgresql/data, a volume)
# On the first start (no $PGDATA/PG_VERSION) it runs initdb and creates the
# database; later starts use the cluster as it is (the variables are then
# ignored). The server listens on every address of the container with
# scram-sha-256 password authentication; the Unix socket inside the container
# trusts local users (the health check uses it).
# Arguments: `postgres [server options]` (the default) or any other command.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "${1:-postgres}" != postgres ]; then
  exec "$@"
fi
[ $# -gt 0 ] && shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: set POSTGRES_PASSWORD for the first start" >&2
    exit 1
  fi
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    # A server on the Unix socket only, just long enough to create the database.
    pg_ctl -D "$PGDATA" -w -t 60 -o "-c listen_addresses=''" -l "$PGDATA/first-start.log" start >/dev/null
    # psql quotes the names itself (:"var"); variables are not expanded in -c, hence stdin.
    echo 'CREATE DATABASE :"db" OWNER :"owner";' \
      | psql -v ON_ERROR_STOP=1 -q -U "$user" -d postgres --set db="$db" --set owner="$user"
    pg_ctl -D "$PGDATA" -w -t 60 -m fast stop >/dev/null
    rm -f "$PGDATA/first-start.log"
  fi
  echo "postgres-entrypoint: created the cluster in $PGDATA (user $user, database $db)"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
