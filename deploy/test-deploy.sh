#!/usr/bin/env bash
# The deploy test: build the images of deploy/compose.yaml on this host, then
# bring the stack up for real and send a start job through it (tests/deploy).
# A step of its own, next to deploy/test.sh, because the first image build
# takes minutes; run it as root from a checkout (a fresh clone is fine):
#
#   bash deploy/test-deploy.sh            # extra arguments go to pytest
#
# Installs what is missing (dockerd and the local services via
# deploy/local/services.sh, debootstrap, Debian's docker-compose when there is
# no `docker compose` plugin), the stub engine images when missing and the venv, runs
# deploy/images/build.sh (cached: seconds when nothing changed), then pytest on
# tests/deploy. Prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test-deploy.sh: run as root (debootstrap, apt-get, the state root's owner)" >&2; exit 1; }

t_start=$(date +%s)
timings=()
step() { # name command...
  local name=$1 t0 rc=0; shift
  t0=$(date +%s)
  echo "test-deploy: $name" >&2
  "$@" || rc=$?
  timings+=("$(printf '%-28s %4ss%s' "$name" "$(( $(date +%s) - t0 ))" "$([ $rc = 0 ] || echo "  (failed: $rc)")")")
  return $rc
}
summary() {
  local rc=$?
  echo "test-deploy: timings" >&2
  for line in "${timings[@]}"; do echo "  $line" >&2; done
  echo "  $(printf '%-28s %4ss' total "$(( $(date +%s) - t_start ))")" >&2
  exit $rc
}
trap summary EXIT

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

tools() {
  local pkgs=()
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    pkgs+=(docker-compose)
  fi
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "test-deploy: installing ${pkgs[*]}" >&2
    apt_install "${pkgs[@]}"
  fi
}

services() { local env; env=$(bash deploy/local/services.sh up) || return; eval "$env"; }
# The stack's test starts galaxy/engine-stub:1.0; deploy/test.sh rebuilds the stubs on each run.
stubs() { docker image inspect galaxy/engine-stub:1.0 >/dev/null 2>&1 || bash deploy/engine-stub/build.sh >/dev/null; }

step "local services (dockerd)" services
step "tools" tools
step "stub engine images" stubs
step "venv" bash deploy/local/venv.sh
step "images (deploy/images)" bash deploy/images/build.sh
step "compose stack test" .venv/bin/python -m pytest -p no:cacheprovider tests/deploy "$@"
