#!/usr/bin/env bash
# Build the stub engine images from Debian's static busybox (no registry needed):
#   galaxy/engine-stub:1.0   healthy engine
#   galaxy/engine-stub:1.1   the same engine under another tag and image id (for patch)
#   galaxy/engine-stub:crash exits with code 3 at once
#   galaxy/engine-stub:mute  runs but never answers its health path
#   galaxy/engine-stub:flaky healthy on its first boot, exits 4 on every restart
# Usage: deploy/engine-stub/build.sh [repository]   (default galaxy/engine-stub)
set -euo pipefail
repo=${1:-galaxy/engine-stub}
here=$(cd "$(dirname "$0")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  echo "build.sh: $busybox is not a static busybox; install Debian's busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$here/entrypoint.sh" "$ctx/"
cp -r "$here/www" "$ctx/www"
cp -L "$busybox" "$ctx/busybox"
build() { # tag variant
  DOCKER_BUILDKIT=0 docker build -q --build-arg STUB_VARIANT="$2" -t "$repo:$1" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
  echo "built $repo:$1"
}
build 1.0 ok
build 1.1 ok-1.1
build crash crash
build mute mute
build flaky flaky
