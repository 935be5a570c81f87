#!/usr/bin/env bash
# The Swarm tests: the Swarm backend on swarms of the tests' own (tests/swarm).
# A step of its own, next to deploy/test.sh and deploy/test-deploy.sh, because it
# builds images and starts private dockerds; run it as root from a checkout:
#
#   bash deploy/test-swarm.sh            # extra arguments go to pytest
#
# Installs what is missing (dockerd and the local Postgres and Redis via
# deploy/local/services.sh, iproute2, util-linux's nsenter, debootstrap), the stub
# engine images when missing and the venv, runs deploy/images/build.sh for the
# images the stack needs (cached: seconds when nothing changed), then pytest on
# tests/swarm. Every swarm runs on private dockerds in network namespaces the tests
# make and delete; the machine's dockerd is never put into swarm mode. Prints how
# long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test-swarm.sh: run as root (network namespaces, dockerd, debootstrap)" >&2; exit 1; }

STEPS_NAME=test-swarm
# shellcheck source=deploy/local/steps.sh
. deploy/local/steps.sh

tools() {
  local pkgs=()
  command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
  command -v nsenter >/dev/null 2>&1 || pkgs+=(util-linux)
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  [ ${#pkgs[@]} = 0 ] || apt_install "${pkgs[@]}"
}

stubs() {
  local t
  for t in 1.0 1.1 crash mute; do
    docker image inspect "galaxy/engine-stub:$t" >/dev/null 2>&1 || { bash deploy/engine-stub/build.sh >/dev/null; break; }
  done
  docker image inspect galaxy/statedir-helper:1 >/dev/null 2>&1 || bash deploy/statedir-helper/build.sh >/dev/null
}

step "local services (dockerd)" local_services
step "tools" tools
step "stub engine images" stubs
step "venv" bash deploy/local/venv.sh
step "images (deploy/images)" bash deploy/images/build.sh rtmanager postgres redis
step "swarm tests" .venv/bin/python -m pytest -p no:cacheprovider --durations=10 tests/swarm "$@"
