#!/bin/sh
# Entrypoint of rtmanager-redis:7 (runs as the redis user).
# `redis-server [options]` starts Redis with its data in /data, reachable from
# the other containers of its network (protected mode off: Redis has no password
# here, so publish its port nowhere but on networks you trust). Options given
# after redis-server come later on the command line and win. Any other command
# runs as it is (e.g. `redis-cli`).
set -eu
if [ "${1:-redis-server}" = redis-server ]; then
  [ $# -gt 0 ] && shift
  exec redis-server --dir /data --protected-mode no "$@"
fi
exec "$@"
