#!/usr/bin/env bash
# Build rtmanager's state directory helper image from Debian's static busybox (no registry needed):
#   galaxy/statedir-helper:1   a static busybox; runs only the helper script of observed/swarm_statedir.py
# Prints the image id: load the image on every Swarm node (docker save | docker load keeps the id) and
# check it there (docker image inspect -f '{{.Id}}'), as for the engine images.
# Usage: deploy/statedir-helper/build.sh [reference]   (default galaxy/statedir-helper:1)
set -euo pipefail
ref=${1:-galaxy/statedir-helper:1}
here=$(cd "$(dirname "$0")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  echo "build.sh: $busybox is not a static busybox; install Debian's busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$ctx/"
cp -L "$busybox" "$ctx/busybox"
DOCKER_BUILDKIT=0 docker build -q --network none -t "$ref" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
echo "built $ref $(docker image inspect -f '{{.Id}}' "$ref")"
