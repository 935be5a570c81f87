#!/bin/sh
# PID 1 of galaxy/engine-stub:termdeaf: the stub engine (/entrypoint.sh) runs as its child and never
# sees a signal sent to the container; a SIGTERM (or SIGINT) changes nothing but a line
# "sigterm-ignored <date>" in $ENGINE_STATE_DIR/events. Only SIGKILL ends it. When the engine exits
# by itself (stub-control/exit), so does PID 1, with the engine's code.
root=${ENGINE_STATE_DIR:-/tmp/engine-stub}
trap 'echo "sigterm-ignored $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$root/events" 2>/dev/null' TERM INT
/bin/sh /entrypoint.sh &
child=$!
rc=0
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
  rc=$?
done
exit "$rc"
