#!/usr/bin/env bash
# End-to-end checks against running servers (binaries built beforehand by test.sh):
# - the default `trellis` binary: /healthz and /readyz answer 200, /metrics passes
#   `promtool check metrics`, /docs renders Swagger UI in headless Chromium, and
#   schemathesis (--checks all) finds no failure in /openapi.json;
# - the test server (default modules + the `probe` fixture): schemathesis again, over the
#   fixture's bodies and parameters (its deliberately failing or slow operations excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-$PWD/.run}
TOOLS=${TRELLIS_TOOLS:-$RUN/tools}
ST="$TOOLS/venv/bin/schemathesis"
work=$(mktemp -d "$RUN/e2e.XXXXXX")
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Logs and reports stay for a failed run only.
  [ "$status" -ne 0 ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # start NAME BINARY PORT [ENV...]
  local name=$1 bin=$2 port=$3; shift 3
  # schemathesis sends its examples from one address: the BI ingest limits (tested by the
  # Rust suite) would answer 429 to valid events.
  env TRELLIS_PROFILE=test TRELLIS_SERVER__PORT="$port" \
    TRELLIS_DATABASE__URL="sqlite://$work/$name.db" TRELLIS_MQ__FILE__DIRECTORY="$work/$name-events" \
    TRELLIS_MQ__SPOOL__DIRECTORY="$work/$name-spool" \
    TRELLIS_MODULES__BI__RATE_PER_ADDRESS=1000000 TRELLIS_MODULES__BI__BURST_PER_ADDRESS=1000000 \
    "$@" "$bin" >"$work/$name.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "e2e: $name did not start"; cat "$work/$name.log"; return 1
}

schemathesis() { # schemathesis PORT [extra args]; runs in $work so no failure cache
  local port=$1; shift         # from an earlier run is replayed
  (cd "$work" && "$ST" run "http://127.0.0.1:$port/openapi.json" --checks all --max-examples 50 \
    --no-color --generation-database none --wait-for-schema 30 --seed 1 "$@")
}

port=$(free_port)
admin_email=root@example.com
admin_password=e2e-super-admin-password
# schemathesis fails hundreds of logins from one address; the address budget would then
# refuse the administrator's own logins below (its limits have their own tests).
start default target/debug/trellis "$port" \
  TRELLIS_MODULES__AUTH__BOOTSTRAP_ADMIN_EMAIL=$admin_email \
  TRELLIS_MODULES__AUTH__BOOTSTRAP_ADMIN_PASSWORD=$admin_password \
  TRELLIS_MODULES__AUTH__LOGIN_FAILURES_PER_ADDRESS=1000000
base="http://127.0.0.1:$port"

# An access token of the bootstrapped super-administrator, so schemathesis reaches past
# authentication on every protected operation.
token() {
  curl -fsS "$base/api/v1/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$admin_email\",\"password\":\"$admin_password\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

echo "e2e: /healthz and /readyz"
curl -fsS "$base/healthz" && echo
curl -fsS "$base/readyz" && echo

echo "e2e: promtool check metrics (HTTP, storage, domain events, message queue)"
curl -fsS "$base/healthz" >/dev/null
token >/dev/null # a login: its auth.logged_in event is handled (by bi)
curl -fsS "$base/api/v1/bi/events" -H 'content-type: application/json' \
  -d '[{"name":"e2e.check"},{"name":"e2e.check","properties":{"n":2}}]' && echo
sleep 0.5
metrics="$work/metrics.txt"
curl -fsS "$base/metrics" >"$metrics"
promtool check metrics <"$metrics"
for name in event_publications event_publications_completed_total mq_spool_bytes mq_spool_syncs_total mq_spool_written_bytes_total \
  mq_buffered_messages mq_messages_sent_total mq_up; do
  grep -q "^$name" "$metrics" || { echo "e2e: /metrics lacks $name"; exit 1; }
done
grep -c '"name":"e2e.check"' "$work/default-events/events.ndjson"

echo "e2e: Swagger UI renders in headless Chromium"
dom="$work/docs.html"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chromium" --virtual-time-budget=10000 \
  --dump-dom "$base/docs" >"$dom" 2>"$work/chromium.log"
for needle in 'class="swagger-ui' 'opblock' '/healthz' '/api/v1/modules'; do
  grep -q -- "$needle" "$dom" || { echo "e2e: /docs did not render ($needle missing)"; exit 1; }
done
echo "rendered $(grep -o 'opblock-summary-path' "$dom" | wc -l) operations"

echo "e2e: schemathesis on the default server"
schemathesis "$port" -H "Authorization: Bearer $(token)" \
  --exclude-operation-id logout --exclude-operation-id logoutAll
# Logging out ends the token's session, so these two run last, each with a fresh token.
for op in logout logoutAll; do
  schemathesis "$port" -H "Authorization: Bearer $(token)" --include-operation-id "$op"
done

echo "e2e: schemathesis on the test server (probe fixture)"
tport=$(free_port)
start test-server target/debug/trellis-test-server "$tport"
schemathesis "$tport" --exclude-operation-id probePanic --exclude-operation-id probeUnhandled \
  --exclude-operation-id probeSlow

echo "e2e: passed"
