#!/bin/sh
# Stub engine. STUB_VARIANT (baked in at build time, overridable by env):
#   ok     serve /healthz with 200 on $ENGINE_PORT
#   crash  exit 3 at once (for crash-loop and start-failure tests)
#   mute   run but never answer (for health-timeout tests)
#   flaky  healthy on its first boot in a state directory, exits 4 on every later one
port=${ENGINE_PORT:-8080}
state=${ENGINE_STATE_DIR:-}
echo "engine-stub: game=${GAME_ID:-?} variant=${STUB_VARIANT} port=${port} state=${state}"
if [ -n "$state" ] && [ -d "$state" ]; then
  date >> "$state/boots" 2>/dev/null || echo "engine-stub: state dir $state is not writable"
fi
case "$STUB_VARIANT" in
  flaky)
    if [ "$(wc -l < "$state/boots" 2>/dev/null || echo 0)" -gt 1 ]; then
      echo "engine-stub: flaky engine refuses a second boot" >&2; exit 4
    fi
    httpd -f -p "$port" -h /www & ;;
  crash) echo "engine-stub: crashing as asked" >&2; exit 3 ;;
  mute) sleep 100000 & ;;
  *) httpd -f -p "$port" -h /www & ;;
esac
# As PID 1 the shell gets no default SIGTERM action: stop the server on TERM, as a real engine would.
child=$!
trap 'echo "engine-stub: stopping"; kill $child 2>/dev/null; exit 0' TERM INT
wait $child
