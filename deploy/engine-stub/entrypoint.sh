#!/bin/sh
# Stub engine: busybox httpd on $ENGINE_PORT (8080) serving /www, i.e. GET /healthz (200) and,
# except in the plain variant, the engine admin API at /cgi-bin/admin/v1 (see /engine/admin.sh).
#
# STUB_VARIANT (baked in at build time by build.sh, overridable by env):
#   ok, ok-1.1  healthy engine with the admin API (tags 1.0 and 1.1)
#   plain       healthy engine without the admin API: the image has no /www/cgi-bin, so the
#               admin paths answer 404
#   slowgen     admin API whose generations take 5 s by default
#   genfail     admin API whose every generation fails
#   finish3     admin API; the phase becomes "finished" once the turn reaches 3
#   crash       exit 3 at once (for crash-loop and start-failure tests)
#   nulcrash    print "boom" NUL "tail" and a line of invalid UTF-8 to stderr, exit 3 at once
#   mute        run but never answer (nothing listens; for health-timeout tests)
#   flaky       healthy on its first boot in a state directory, exits 4 on every later one
#
# Files in the state directory $ENGINE_STATE_DIR (a per-game bind mount, kept across restarts):
#   boots              one date line appended at every start (flaky counts them)
#   events             "boot <date>" at every start, "sigterm <date>" when stopped by SIGTERM/SIGINT
#                      (then the engine exits 0), "interrupted <turn> <date>" after it when the
#                      SIGTERM came while turn <turn> was generated (that generation is cut, never
#                      finished), "exit <code> <date>" when stub-control/exit fires
#   engine/            the admin API's state (turn, phase, last generation), see admin.sh
#   stub-control/      switches a test drops in, checked at boot and then every ~0.3 s:
#     mute             present: httpd is SIGSTOPped, so health and admin requests hang;
#                      removed: SIGCONT, it answers again
#     exit             content: an exit code. The engine prints the bytes of
#                      stub-control/exit-message (if any) to stderr and exits with that code,
#                      on every boot until the file is removed (a crash loop the test controls)
#     exit-message     see exit; any bytes (NUL and invalid UTF-8 included)
#     generation_seconds, fail_generation, finish_after: read by each generation (admin.sh)
#
# Everything is written under the state directory only (and /tmp when ENGINE_STATE_DIR is unset),
# so the engine runs with all capabilities dropped and as any uid that can write there.
port=${ENGINE_PORT:-8080}
root=${ENGINE_STATE_DIR:-/tmp/engine-stub}
variant=${STUB_VARIANT:-ok}
control=$root/stub-control
child=
echo "engine-stub: game=${GAME_ID:-?} variant=${variant} port=${port} state=${ENGINE_STATE_DIR:-}"

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
event() { echo "$* $(stamp)" >> "$root/events" 2>/dev/null; }

# As PID 1 the shell gets no default SIGTERM action: stop the server on TERM, as a real engine would.
on_term() {
  event sigterm
  [ -d /www/cgi-bin ] && sh /engine/admin.sh interrupt
  echo "engine-stub: stopping"
  if [ -n "$child" ]; then
    kill -CONT "$child" 2>/dev/null
    kill "$child" 2>/dev/null
  fi
  exit 0
}
trap on_term TERM INT

[ -d "$root" ] || mkdir -p "$root" 2>/dev/null
if [ -d "$root" ]; then
  date >> "$root/boots" 2>/dev/null || echo "engine-stub: state dir $root is not writable"
  event boot
fi

check_exit() {
  [ -f "$control/exit" ] || return 0
  code=$(head -c 16 "$control/exit" | tr -cd 0-9)
  case "$code" in '' | ????*) code=1 ;; esac
  [ "$code" -le 255 ] || code=1
  echo "engine-stub: exiting with code $code as $control/exit asks"
  [ -f "$control/exit-message" ] && cat "$control/exit-message" >&2
  event exit "$code"
  if [ -n "$child" ]; then
    kill -CONT "$child" 2>/dev/null
    kill "$child" 2>/dev/null
  fi
  exit "$code"
}
check_exit

case "$variant" in
  crash) echo "engine-stub: crashing as asked" >&2; exit 3 ;;
  nulcrash)
    printf 'boom\000tail\n' >&2
    printf '\377\376\n' >&2
    exit 3 ;;
  flaky)
    if [ "$(wc -l < "$root/boots" 2>/dev/null || echo 0)" -gt 1 ]; then
      echo "engine-stub: flaky engine refuses a second boot" >&2; exit 4
    fi ;;
esac

case "$variant" in
  mute) sleep 100000 & ;;
  *)
    [ -d /www/cgi-bin ] && sh /engine/admin.sh recover
    # httpd's stderr (its own errors, and the CGI scripts' one log line per admin request)
    # goes to the container's stdout.
    httpd -f -p "$port" -h /www 2>&1 & ;;
esac
child=$!

muted=0
while :; do
  check_exit
  if [ -e "$control/mute" ]; then
    if [ "$muted" = 0 ]; then
      kill -STOP "$child" 2>/dev/null
      muted=1
      echo "engine-stub: muted ($control/mute is present)"
    fi
  elif [ "$muted" = 1 ]; then
    kill -CONT "$child" 2>/dev/null
    muted=0
    echo "engine-stub: answering again ($control/mute is gone)"
  fi
  if ! kill -0 "$child" 2>/dev/null; then
    wait "$child"
    rc=$?
    echo "engine-stub: server exited with code $rc" >&2
    exit "$rc"
  fi
  # In the background, so that a TERM is handled at once rather than after the sleep.
  sleep 0.3 &
  wait $!
done
