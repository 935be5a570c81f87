#!/usr/bin/env bash
# Prepare a Swarm manager for deploy/swarm/stack.yaml, then print the
# variables `docker stack deploy` needs (as export lines, for eval):
#
#   eval "$(bash deploy/swarm/prepare.sh)"
#   export RTMANAGER_API_TOKEN=$(head -c 24 /dev/urandom | base64)
#   docker stack deploy -c deploy/swarm/stack.yaml rtmanager
#
# Run it as root on the manager that is to run rtmanager, Postgres and Redis
# (DOCKER_HOST may point at that manager's socket). It
#   * checks that this daemon is a manager of an active swarm and has the images
#     of the stack (deploy/images/build.sh builds them; without a registry, load
#     them on the other nodes too: docker save ... | docker -H <node> load);
#   * labels this node rtmanager.home=true (the stack's services are placed there);
#   * creates the state root, owned by uid 10001 and the socket's group, 0711;
#   * creates the engines' network, an attachable overlay, unless it exists.
# Environment: RTMANAGER_STATE_ROOT (default /var/lib/rtmanager/games),
# RTMANAGER_DOCKER_NETWORK (galaxy-games), RTMANAGER_INSTANCE (default),
# DOCKER_SOCKET (the socket behind DOCKER_HOST, default /var/run/docker.sock).
set -euo pipefail

die() { echo "prepare: error: $*" >&2; exit 1; }
log() { echo "prepare: $*" >&2; }

STATE_ROOT=${RTMANAGER_STATE_ROOT:-/var/lib/rtmanager/games}
NETWORK=${RTMANAGER_DOCKER_NETWORK:-galaxy-games}
INSTANCE=${RTMANAGER_INSTANCE:-default}
if [ -z "${DOCKER_SOCKET:-}" ]; then
  case "${DOCKER_HOST:-}" in
    unix://*) DOCKER_SOCKET=${DOCKER_HOST#unix://} ;;
    "") DOCKER_SOCKET=/var/run/docker.sock ;;
    *) die "DOCKER_HOST=$DOCKER_HOST is not a local socket: run this on the manager itself" ;;
  esac
fi

[ "$(id -u)" = 0 ] || die "run as root (the state root's owner)"
[ -S "$DOCKER_SOCKET" ] || die "$DOCKER_SOCKET is not a socket"
state=$(docker info -f '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}' 2>/dev/null) \
  || die "dockerd does not answer"
[ "$state" = "active true" ] || die "this daemon is not a manager of an active swarm (docker swarm init --advertise-addr ...)"

missing=()
for image in rtmanager:0.1.0 rtmanager-postgres:15 rtmanager-redis:7; do
  docker image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
done
[ ${#missing[@]} = 0 ] || die "missing images: ${missing[*]} (bash deploy/images/build.sh, then load them here)"
# The state directory helper runs on the engines' nodes: load it there as the engine images are.
docker image inspect galaxy/statedir-helper:1 >/dev/null 2>&1 \
  || log "warning: galaxy/statedir-helper:1 is missing (bash deploy/statedir-helper/build.sh; load it on every node that runs engines)"

node=$(docker info -f '{{.Swarm.NodeID}}')
docker node update --label-add rtmanager.home=true "$node" >/dev/null
log "node $node labelled rtmanager.home=true"

gid=$(stat -c %g "$DOCKER_SOCKET")
install -d -o 10001 -g "$gid" -m 0711 "$STATE_ROOT"
log "state root $STATE_ROOT (uid 10001, gid $gid, 0711)"

if driver=$(docker network inspect -f '{{.Driver}} {{.Scope}}' "$NETWORK" 2>/dev/null); then
  [ "$driver" = "overlay swarm" ] || die "network $NETWORK exists as a $driver network; the Swarm backend needs an overlay"
  log "network $NETWORK exists"
else
  docker network create --driver overlay --attachable --label com.galaxy.managed-by=rtmanager \
    --label "com.galaxy.instance=$INSTANCE" "$NETWORK" >/dev/null
  log "network $NETWORK created (attachable overlay)"
fi

cat <<EOF
export DOCKER_GID=$gid
export DOCKER_SOCKET=$DOCKER_SOCKET
export RTMANAGER_STATE_ROOT=$STATE_ROOT
export RTMANAGER_DOCKER_NETWORK=$NETWORK
export RTMANAGER_INSTANCE=$INSTANCE
EOF
