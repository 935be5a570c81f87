#!/bin/sh
# Engine admin API of the stub engine, in busybox sh. Installed as /engine/admin.sh; the CGI
# scripts /www/cgi-bin/admin/v1/{status,turns} hand their request to it, so the API lives at
# /cgi-bin/admin/v1 (the controller's RTMANAGER_ENGINE_ADMIN_PATH).
#
#   GET  .../status  200 {"turn": N, "phase": "idle"|"generating"|"finished",
#                         "last_generation": {"turn": N, "ok": bool, "error": "..."} | null}
#   POST .../turns   body {"expected_turn": N}
#                    202 {"turn": N, "phase": "generating"}  idle at turn N: turn N+1 is generated
#                                                            in the background
#                    200 status                 a repeat: the engine is already at turn N+1 or later
#                    409 {"error": ..., ...}    generating, finished, or at a turn lower than N
#                    400 {"error": ...}         missing or bad body
#   Either           401 {"error": ...}         ENGINE_ADMIN_TOKEN is set and the request does not
#                                               carry "Authorization: Bearer <that token>"
#
# State: $ENGINE_STATE_DIR/engine/status.json holds the status document itself, always replaced
# whole (write a temporary file, then rename), so a reader never sees half of it. Changes are made
# under the lock directory $ENGINE_STATE_DIR/engine/lock (mkdir is atomic), which makes the
# compare-and-swap on expected_turn safe against concurrent CGI processes.
#
# Read on every generation, from $ENGINE_STATE_DIR/stub-control/ (a file there beats the variant):
#   generation_seconds  seconds a generation takes (default 0.5; 5 for the slowgen variant)
#   fail_generation     present: generations fail; its content, if any, is the error text
#                       (the genfail variant fails every generation)
#   finish_after        integer K: the phase becomes "finished" once the turn reaches K
#                       (3 for the finish3 variant)
#
# Usage: admin.sh cgi status|turns     (from the CGI scripts)
#        admin.sh generate N           (started detached by a POST that won)
#        admin.sh recover              (at boot, from the entrypoint)
#        admin.sh interrupt            (on SIGTERM, from the entrypoint: a generation under way is
#                                      cut, "interrupted N+1" appended to $ENGINE_STATE_DIR/events)
root=${ENGINE_STATE_DIR:-/tmp/engine-stub}
dir=$root/engine
control=$root/stub-control
state=$dir/status.json
lockdir=$dir/lock
variant=${STUB_VARIANT:-ok}

log() { echo "engine-stub: $*" >&2; }

# The bytes of a file as the inside of a JSON string: control characters dropped,
# backslash and quote escaped, lines joined with \n.
json_text() {
  head -c 1000 "$1" | tr -d '\000-\010\013\014\016-\037\177' \
    | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' -e 's/\r/\\r/g' \
    | awk 'NR>1{printf "\\n"} {printf "%s", $0}'
}

write_state() { # turn phase last_generation-json
  printf '{"turn":%s,"phase":"%s","last_generation":%s}\n' "$1" "$2" "$3" > "$state.$$" \
    && mv -f "$state.$$" "$state"
}

# Sets turn, phase and last (the last_generation JSON) from the state file; fails if unreadable.
read_state() {
  doc=$(cat "$state" 2>/dev/null) || return 1
  turn=$(printf '%s' "$doc" | sed -n 's/^{"turn":\([0-9][0-9]*\),"phase":"[a-z]*",.*/\1/p')
  phase=$(printf '%s' "$doc" | sed -n 's/^{"turn":[0-9]*,"phase":"\([a-z]*\)",.*/\1/p')
  last=$(printf '%s' "$doc" | sed -n 's/^{"turn":[0-9]*,"phase":"[a-z]*","last_generation":\(.*\)}$/\1/p')
  [ -n "$turn" ] && [ -n "$phase" ] && [ -n "$last" ]
}

lock() { # tries for about $1 seconds (default 2)
  tries=$(( ${1:-2} * 50 ))
  while ! mkdir "$lockdir" 2>/dev/null; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || return 1
    sleep 0.02
  done
}
unlock() { rmdir "$lockdir" 2>/dev/null; }

ensure_state() {
  [ -f "$state" ] && return 0
  mkdir -p "$dir" || return 1
  lock || return 1
  [ -f "$state" ] || write_state 0 idle null
  rc=$?
  unlock
  return $rc
}

recover() {
  mkdir -p "$dir" || { log "cannot create $dir"; return 1; }
  rm -rf "$lockdir" # left by a CGI process the last stop cut short
  rm -f "$dir/cut"
  rm -f "$state".* 2>/dev/null
  [ -f "$state" ] || write_state 0 idle null
  if ! read_state; then
    log "unreadable engine state in $state"
    return 1
  fi
  if [ "$phase" = generating ]; then
    write_state "$turn" idle "{\"turn\":$((turn + 1)),\"ok\":false,\"error\":\"interrupted by restart\"}"
    log "generation of turn $((turn + 1)) was interrupted by a restart; back to idle at turn $turn"
  else
    log "engine state: turn $turn, phase $phase"
  fi
}

generate() { # N: generate turn N+1
  n=$1
  next=$((n + 1))
  secs=5
  [ "$variant" = slowgen ] || secs=0.5
  if [ -f "$control/generation_seconds" ]; then
    v=$(head -c 32 "$control/generation_seconds" | tr -d ' \t\r\n')
    if printf '%s' "$v" | grep -Eq '^[0-9]+(\.[0-9]+)?$'; then secs=$v; fi
  fi
  sleep "$secs"
  failure=
  if [ -f "$control/fail_generation" ]; then
    failure=$(json_text "$control/fail_generation")
    [ -n "$failure" ] || failure="generation failed (stub-control/fail_generation)"
  elif [ "$variant" = genfail ]; then
    failure="generation failed (stub variant genfail)"
  fi
  finish=
  [ "$variant" = finish3 ] && finish=3
  if [ -f "$control/finish_after" ]; then
    v=$(head -c 16 "$control/finish_after" | tr -d ' \t\r\n')
    case "$v" in '' | *[!0-9]*) ;; *) finish=$v ;; esac
  fi
  lock 30 || { log "generation of turn $next: state lock not free, giving up"; return 1; }
  if [ -f "$dir/cut" ]; then
    unlock
    log "generation of turn $next abandoned: the engine is stopping (SIGTERM)"
    return 1
  fi
  if ! read_state || [ "$phase" != generating ] || [ "$turn" != "$n" ]; then
    unlock
    log "generation of turn $next abandoned: the state moved on (turn ${turn:-?}, phase ${phase:-?})"
    return 1
  fi
  if [ -n "$failure" ]; then
    write_state "$n" idle "{\"turn\":$next,\"ok\":false,\"error\":\"$failure\"}"
    log "generation of turn $next failed: $failure"
  else
    phase=idle
    if [ -n "$finish" ] && [ "$next" -ge "$finish" ]; then phase=finished; fi
    write_state "$next" "$phase" "{\"turn\":$next,\"ok\":true,\"error\":\"\"}"
    log "generated turn $next (phase $phase)"
  fi
  unlock
}

interrupt() { # SIGTERM: a generation under way is cut, never finished (the next boot recovers it)
  [ -f "$state" ] || return 0
  lock 1
  : > "$dir/cut"
  if read_state && [ "$phase" = generating ]; then
    echo "interrupted $((turn + 1)) $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$root/events"
    log "stopping while generating turn $((turn + 1)): the generation is cut"
  fi
  unlock
}

# ---------------------------------------------------------------- CGI
respond() { # code reason body
  printf 'Status: %s %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\r\n%s\n' "$1" "$2" "$3"
  log "admin ${REQUEST_METHOD:-?} ${REQUEST_URI:-${SCRIPT_NAME:-?}} $1"
  exit 0
}
error() { # code reason message [extra json members]
  respond "$1" "$2" "{\"error\":\"$3\"$4}"
}

cgi_status() {
  case "$REQUEST_METHOD" in GET | HEAD) ;; *) error 405 "Method Not Allowed" "use GET" ;; esac
  ensure_state || error 500 "Internal Server Error" "cannot create the engine state in $dir"
  doc=$(cat "$state") || error 500 "Internal Server Error" "cannot read $state"
  respond 200 OK "$doc"
}

cgi_turns() {
  [ "$REQUEST_METHOD" = POST ] || error 405 "Method Not Allowed" "use POST"
  len=${CONTENT_LENGTH:-0}
  case "$len" in '' | *[!0-9]*) len=0 ;; esac
  if [ "$len" -le 0 ] || [ "$len" -gt 4096 ]; then
    error 400 "Bad Request" 'expected a JSON body {\"expected_turn\": N}'
  fi
  body=$(head -c "$len" | tr -d ' \t\r\n')
  case "$body" in
    '{'*'}') n=$(printf '%s' "$body" | sed -n 's/.*"expected_turn":\([0-9][0-9]*\)[,}].*/\1/p') ;;
    *) n= ;;
  esac
  n=$(printf '%s' "$n" | sed 's/^0*\([0-9]\)/\1/')
  if [ -z "$n" ] || [ "${#n}" -gt 9 ]; then
    error 400 "Bad Request" 'expected_turn must be a non-negative integer in {\"expected_turn\": N}'
  fi
  ensure_state || error 500 "Internal Server Error" "cannot create the engine state in $dir"
  lock || error 409 Conflict "engine state busy, try again"
  if ! read_state; then
    unlock
    error 500 "Internal Server Error" "unreadable engine state in $state"
  fi
  where=",\"turn\":$turn,\"phase\":\"$phase\""
  if [ "$turn" -gt "$n" ]; then
    unlock
    respond 200 OK "$doc"
  elif [ "$phase" = generating ]; then
    unlock
    error 409 Conflict "engine is generating turn $((turn + 1))" "$where"
  elif [ "$phase" = finished ]; then
    unlock
    error 409 Conflict "game is finished at turn $turn" "$where"
  elif [ "$turn" -lt "$n" ]; then
    unlock
    error 409 Conflict "engine is at turn $turn, not $n" "$where"
  fi
  if ! write_state "$n" generating "$last"; then
    unlock
    error 500 "Internal Server Error" "cannot write $state"
  fi
  unlock
  # Detached: own session, no stdin/stdout, so httpd sees the end of this CGI's output at once.
  setsid sh /engine/admin.sh generate "$n" </dev/null >/dev/null &
  respond 202 Accepted "{\"turn\":$n,\"phase\":\"generating\"}"
}

# The contract: an engine given ENGINE_ADMIN_TOKEN takes admin calls only with that bearer token.
# Compared as SHA-256 digests, so how long the comparison takes says nothing about the token.
authorize() {
  [ -n "${ENGINE_ADMIN_TOKEN:-}" ] || return 0
  want=$(printf 'Bearer %s' "$ENGINE_ADMIN_TOKEN" | sha256sum)
  got=$(printf '%s' "${HTTP_AUTHORIZATION:-}" | sha256sum)
  [ "$want" = "$got" ] || error 401 Unauthorized "admin calls need the engine's admin token"
}

case "$1" in
  cgi)
    authorize
    case "$2" in
      status) cgi_status ;;
      turns) cgi_turns ;;
      *) error 404 "Not Found" "no such admin resource" ;;
    esac ;;
  generate) generate "$2" ;;
  recover) recover ;;
  interrupt) interrupt ;;
  *) echo "usage: admin.sh cgi status|turns | generate N | recover | interrupt" >&2; exit 2 ;;
esac
