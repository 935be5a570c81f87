#!/usr/bin/env bash
# The benchmark: brings up the local services like the tests do, installs
# Debian's docker-compose when missing, then runs bench/run.py (arguments pass through).
#   bash bench/run.sh --scale [--games N] [--sim-games M] [--sections a,b,...]
# runs the scale benchmark bench/scale.py instead (see its docstring; no docker-compose needed).
#   bash bench/run.sh --scale --before REV [--halves before,after] [--run-args "ARGS"] [scale.py's options]
# measures the controller's code at git revision REV ("before") and at the checkout ("after")
# with the same benchmark code, one after the other: bench/run.py (one game, bursts) and
# bench/scale.py for each, then prints the goals' table side by side (bench/compare.py). The
# figures go to bench/results/before-after/. --halves runs only one half (the other's figures
# are kept from an earlier run), so the two can be taken at different times. --run-args: options
# of bench/run.py (default: its defaults, without the steady state, which scale.py measures).
set -euo pipefail
cd "$(dirname "$0")/.."
scale=0
before=""
halves="before,after"
run_args=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=1 ;;
    --before) before=$2; shift ;;
    --halves) halves=$2; shift ;;
    --run-args) run_args=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
eval "$(bash deploy/local/services.sh up)"
bash deploy/engine-stub/build.sh >/dev/null
bash deploy/local/venv.sh
export RTMANAGER_TEST_DATABASE_URL=${RTMANAGER_DATABASE_URL%/*}/postgres
if [ "$scale" = 1 ] && [ -n "$before" ]; then
  out=bench/results/before-after
  mkdir -p "$out"
  code=$(mktemp -d /tmp/rtm-before.XXXXXX)
  trap 'rm -rf "$code"' EXIT
  git archive "$before" | tar -x -C "$code"
  printf '{"before": "%s", "after": "%s"}\n' "$(git rev-parse --short "$before")" \
    "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- controller desired observed || echo +changes)" \
    >"$out/meta.json"
  for half in before after; do
    case ",$halves," in *",$half,"*) ;; *) continue ;; esac
    # The controller's processes (and bench/scale_sim.py's in-process controller) import the
    # code under test from PYTHONPATH ahead of the checkout's editable install.
    pp=""; [ "$half" = before ] && pp=$code
    echo "bench: ---- $half: one game and bursts (bench/run.py)" >&2
    # shellcheck disable=SC2086  # --run-args is a list of options
    PYTHONPATH=$pp BENCH_CODE=$pp .venv/bin/python bench/run.py --steady-games 0 --planner-pairs 1000 $run_args \
      --out "$out/run-$half.json"
    echo "bench: ---- $half: scale (bench/scale.py)" >&2
    PYTHONPATH=$pp BENCH_CODE=$pp .venv/bin/python bench/scale.py ${args[@]+"${args[@]}"} \
      --out "$out/scale-$half.json" || echo "bench: the $half scale run failed; its figures are partial" >&2
  done
  exec .venv/bin/python bench/compare.py "$out"
fi
if [ "$scale" = 1 ]; then
  exec .venv/bin/python bench/scale.py ${args[@]+"${args[@]}"}
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
exec .venv/bin/python bench/run.py ${args[@]+"${args[@]}"}
