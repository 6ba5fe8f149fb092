#!/usr/bin/env bash
# Smoke check of the README's first run, with the real `make run`: start it on free ports
# with a data directory that does not exist yet, send the curl it prints (as printed), see
# the event in mock Accoil's counts, press Ctrl-C (SIGINT to make's process group, as a
# terminal does), and check that nothing it started is left running. Also runs the
# README's install examples and its load test line. Fails loudly; takes under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
fail() { echo "smoke_first_run: FAIL: $*" >&2; exit 1; }
say() { echo "smoke_first_run: $*" >&2; }

# the README's examples are curl commands: on a fresh (Debian, root) machine, install it
if ! command -v curl >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null 2>&1; }
fi
command -v curl >/dev/null 2>&1 || fail "curl is needed (apt-get install curl)"
test -x "$PY" || fail "no $PY: run make install (or make test) first"
"$PY" -c 'import gateway, mock_accoil' || fail "the project is not installed in .venv"

# the README's Install examples
.venv/bin/accoil-gateway --help >/dev/null || fail ".venv/bin/accoil-gateway --help"
.venv/bin/mock-accoil --help >/dev/null || fail ".venv/bin/mock-accoil --help"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() { "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}
# every process below a pid (the demo's children run in sessions of their own)
descendants() {
  ps -e -o pid= -o ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END { found[root] = 1; changed = 1
          while (changed) { changed = 0
            for (p in parent) if ((parent[p] in found) && !(p in found)) { found[p] = 1; changed = 1 } }
          for (p in found) if (p != root) print p }'
}
running() { # a process that exists and is not a zombie
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z* ]]
}

WORK=$(mktemp -d)
GATEWAY_PORT=$(free_port)
MOCK_PORT=$(free_port)
DATA="$WORK/fresh/data"   # does not exist yet
LOG="$WORK/make-run.log"
MAKE_PID=""
PIDS=""

cleanup() {
  local code=$?
  if [[ -n "$MAKE_PID" ]] && running "$MAKE_PID"; then kill -KILL -- "-$MAKE_PID" 2>/dev/null || true; fi
  for pid in $PIDS; do running "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  if [[ $code -ne 0 && -f "$LOG" ]]; then
    echo "----- make run output -----" >&2; cat "$LOG" >&2; echo "---------------------------" >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

say "make run on 127.0.0.1:$GATEWAY_PORT (mock on $MOCK_PORT), data dir $DATA"
GATEWAY_PORT=$GATEWAY_PORT MOCK_PORT=$MOCK_PORT GATEWAY_DATA_DIR=$DATA setsid make run >"$LOG" 2>&1 &
MAKE_PID=$!

for _ in $(seq 1 600); do
  grep -q "Ctrl-C stops both." "$LOG" && break
  running "$MAKE_PID" || fail "make run exited before it was up"
  sleep 0.1
done
grep -q "Ctrl-C stops both." "$LOG" || fail "make run did not come up within 60 s"
[[ -d "$DATA" ]] || fail "the data directory $DATA was not created"
PIDS=$(descendants "$MAKE_PID" | tr '\n' ' ')
say "up; processes: $PIDS"

# the curl the demo prints, run as printed
CURL=$(awk '/^Send an event:/ { on = 1; next } on && /^$/ { exit } on { print }' "$LOG")
[[ "$CURL" == *"curl "* ]] || fail "no curl command after 'Send an event:'"
REPLY=$(bash -c "$CURL")
[[ "$REPLY" == '{"success":true}' ]] || fail "the printed curl got $REPLY"

COUNTS=""
for _ in $(seq 1 150); do
  COUNTS=$(curl -s "http://127.0.0.1:$MOCK_PORT/_mock/counts?event=Signed%20Up")
  [[ "$COUNTS" == *'"count":1'* ]] && break
  sleep 0.1
done
[[ "$COUNTS" == *'"userId":"u1"'*'"count":1'* ]] || fail "the event did not reach mock Accoil: $COUNTS"
say "the event reached mock Accoil: $COUNTS"

PIDS="$PIDS $(descendants "$MAKE_PID" | tr '\n' ' ')"
kill -INT -- "-$MAKE_PID"   # Ctrl-C: the terminal signals make's whole process group
for _ in $(seq 1 600); do running "$MAKE_PID" || break; sleep 0.1; done
running "$MAKE_PID" && fail "make run did not stop within 60 s of Ctrl-C"
wait "$MAKE_PID" || true   # make reports the interrupt in its own exit status
grep -q "stopping the demo" "$LOG" || fail "the demo did not report stopping"
grep -q "Traceback" "$LOG" && fail "a traceback in make run's output"

LEFT=""
for pid in $PIDS; do running "$pid" && LEFT="$LEFT $pid"; done
[[ -z "$LEFT" ]] || fail "processes left running after Ctrl-C:$LEFT"
port_free "$GATEWAY_PORT" || fail "port $GATEWAY_PORT still taken after Ctrl-C"
port_free "$MOCK_PORT" || fail "port $MOCK_PORT still taken after Ctrl-C"
say "ok: stopped cleanly, nothing left running"

# the README's load test line, as written (it starts its own mock and gateway)
LOADTEST=$(grep -E '^\.venv/bin/python scripts/loadtest\.py ' README.md | sed 's/ *#.*//')
[[ -n "$LOADTEST" ]] || fail "no load test line in the README"
say "$LOADTEST"
bash -c "$LOADTEST" >"$LOG" 2>&1 || fail "the README's load test failed"
grep -q "completeness (exact): OK" "$LOG" || fail "the README's load test did not report completeness OK"
say "ok: the README's load test: $(grep 'completeness (exact)' "$LOG")"
