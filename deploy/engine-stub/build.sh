#!/usr/bin/env bash
# Build the stub engine images from Debian's static busybox (no registry needed):
#   galaxy/engine-stub:1.0      healthy engine with the engine admin API at /cgi-bin/admin/v1
#   galaxy/engine-stub:1.1      the same engine under another tag and image id (for patch)
#   galaxy/engine-stub:plain    healthy engine without the admin API (its paths answer 404)
#   galaxy/engine-stub:slowgen  admin API; a generation takes 5 s unless told otherwise
#   galaxy/engine-stub:genfail  admin API; every generation fails (turn unchanged, ok false)
#   galaxy/engine-stub:finish3  admin API; the phase becomes "finished" once the turn reaches 3
#   galaxy/engine-stub:crash    exits with code 3 at once
#   galaxy/engine-stub:nulcrash prints "boom" NUL "tail" and invalid UTF-8 to stderr, exits 3 at once
#   galaxy/engine-stub:mute     runs but never answers its health path (nothing listens)
#   galaxy/engine-stub:flaky    healthy on its first boot, exits 4 on every restart
#   galaxy/engine-stub:termdeaf the 1.0 engine under a PID 1 that ignores SIGTERM (termdeaf/)
#
# Admin API (admin.sh): GET status -> {"turn", "phase", "last_generation"};
# POST turns {"expected_turn": N} -> 202 (turn N+1 generating), 200 (a repeat), 409, 400.
# Its state lives in $ENGINE_STATE_DIR/engine/, so it survives restarts and image changes.
#
# Every running engine also obeys files a test drops into $ENGINE_STATE_DIR/stub-control/
# (checked at boot and every ~0.3 s, or at each generation):
#   mute                present: httpd is SIGSTOPped (health and admin hang); removed: answers again
#   exit                an exit code: print the bytes of exit-message to stderr, exit with it, on
#                       every boot until removed
#   exit-message        the bytes printed by exit (NUL and invalid UTF-8 welcome)
#   generation_seconds  seconds a generation takes (default 0.5, slowgen 5)
#   fail_generation     present: generations fail, with its content (if any) as the error
#   finish_after        integer K: finished once the turn reaches K
# and writes $ENGINE_STATE_DIR/boots (a line per start) and $ENGINE_STATE_DIR/events
# ("boot <date>" per start, "sigterm <date>" when stopped by SIGTERM, then exit 0).
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
cp "$here/Dockerfile" "$here/entrypoint.sh" "$here/admin.sh" "$ctx/"
cp -r "$here/www" "$ctx/www"
cp -L "$busybox" "$ctx/busybox"
build() { # tag variant
  DOCKER_BUILDKIT=0 docker build -q --network none --build-arg STUB_VARIANT="$2" -t "$repo:$1" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
  echo "built $repo:$1"
}
build 1.0 ok
build 1.1 ok-1.1
build plain plain
build slowgen slowgen
build genfail genfail
build finish3 finish3
build crash crash
build nulcrash nulcrash
build mute mute
build flaky flaky
DOCKER_BUILDKIT=0 docker build -q --network none --build-arg BASE="$repo:1.0" -t "$repo:termdeaf" "$here/termdeaf" >/dev/null \
  2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
echo "built $repo:termdeaf"
