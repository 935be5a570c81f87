# Sourced, not run, by the test scripts (deploy/test.sh, test-swarm.sh, test-deploy.sh):
#
#   STEPS_NAME=test-swarm; . deploy/local/steps.sh
#   step "venv" bash deploy/local/venv.sh      # timed; a failing step ends the script
#
# A step's command runs where set -e does not apply (inside `||`): a function used
# as a step must chain its commands with && or return their status itself.
# On exit the script prints how long each step took and exits with the status it had.
# Also: apt_install PKG... (installs quietly, updating the package lists only when the
# first try fails) and local_services (deploy/local/services.sh up, its environment
# exported into the calling shell).

: "${STEPS_NAME:?set STEPS_NAME before sourcing deploy/local/steps.sh}"
steps_started=$(date +%s)
steps_timings=()

step() { # name command...
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s)
  echo "$STEPS_NAME: $name" >&2
  "$@" || rc=$?
  steps_timings+=("$(printf '%-28s %4ss%s' "$name" "$(($(date +%s) - t0))" "$([ $rc = 0 ] || echo "  (failed: $rc)")")")
  return $rc
}

steps_summary() {
  local rc=$? line
  echo "$STEPS_NAME: timings" >&2
  for line in ${steps_timings[@]+"${steps_timings[@]}"}; do echo "  $line" >&2; done
  echo "  $(printf '%-28s %4ss' total "$(($(date +%s) - steps_started))")" >&2
  exit $rc
}
trap steps_summary EXIT

apt_install() { # package...
  echo "$STEPS_NAME: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

local_services() {
  local env
  env=$(bash deploy/local/services.sh up) || return
  eval "$env" || return
  export RTMANAGER_DATABASE_URL RTMANAGER_REDIS_URL
  # The tests make databases of their own next to the service's one.
  export RTMANAGER_TEST_DATABASE_URL=${RTMANAGER_DATABASE_URL%/*}/postgres
  export RTMANAGER_TEST_REDIS_URL=$RTMANAGER_REDIS_URL
}
