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

STEPS_NAME=test-deploy
# shellcheck source=deploy/local/steps.sh
. deploy/local/steps.sh

tools() {
  local pkgs=()
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    pkgs+=(docker-compose)
  fi
  [ ${#pkgs[@]} = 0 ] || apt_install "${pkgs[@]}"
}

# The stack's test starts galaxy/engine-stub:1.0; deploy/test.sh rebuilds the stubs on each run.
stubs() { docker image inspect galaxy/engine-stub:1.0 >/dev/null 2>&1 || bash deploy/engine-stub/build.sh >/dev/null; }

step "local services (dockerd)" local_services
step "tools" tools
step "stub engine images" stubs
step "venv" bash deploy/local/venv.sh
step "images (deploy/images)" bash deploy/images/build.sh
step "compose stack test" .venv/bin/python -m pytest -p no:cacheprovider tests/deploy "$@"
