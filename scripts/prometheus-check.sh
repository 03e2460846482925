#!/usr/bin/env bash
# The operator's kit against a live server: starts Trellis (temporary SQLite database,
# event and spool folders, tracing on) and Prometheus from the Debian package scraping it
# every second with deploy/prometheus/rules.yml loaded, runs ~25 s of load, then asks
# Prometheus for every dashboard query (scripts/check-dashboard.py --exprs) and every
# recording rule. Each must return at least one series; every rule group must be healthy;
# every alert's runbook must point at a heading of docs/operations.md; /metrics must expose
# at most 2000 series.
#
#   scripts/prometheus-check.sh [TRELLIS_BINARY]      (default target/debug/trellis)
#
# With TEST_REDIS_URL (a Redis, as `scripts/services.sh start` prints it) and
# TEST_SERVICES_CTL (the path of scripts/services.sh) set, Trellis runs on that Redis and
# the load stops it for ~5 s, so that dependency_up, cache_up and cache_errors_total see
# an outage.
#
# The load makes what a quiet server never shows: 5xx (password hashes refused with
# modules.user.hash_queue = 0), 4xx, a failed database query (a duplicate registration),
# failed logins, a header timeout, a deleted account (a bus subscriber), trace spans
# exported (to a receiver in the load) and dropped (once that receiver is gone). Logs stay in .run/prometheus-check.* after a
# failure only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${1:-target/debug/trellis}
RUN=${RUN:-$ROOT/.run}
LOAD_SECONDS=${LOAD_SECONDS:-25}
MAX_SERIES=2000
[ -x "$BIN" ] || { echo "prometheus-check: $BIN is not an executable"; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
for tool in prometheus promtool curl python3; do
  command -v "$tool" >/dev/null || { echo "prometheus-check: $tool is missing"; exit 2; }
done
mkdir -p "$RUN"
work=$(mktemp -d "$RUN/prometheus-check.XXXXXX")
pids=()

stop() { # stop PID: TERM, up to 5 s, then KILL; never waits on a live process
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do stop "$pid"; done
  if [ "$status" -eq 0 ]; then
    rm -rf "$work"
  else
    echo "prometheus-check: failed; logs in $work (trellis.log, prometheus.log, load.log)"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { # wait_http URL SECONDS NAME LOG
  local url=$1 seconds=$2 name=$3 log=$4
  for _ in $(seq 1 $((seconds * 10))); do
    curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "prometheus-check: $name did not answer $url"; tail -n 40 "$log"; return 1
}

echo "prometheus-check: promtool check rules"
promtool check rules deploy/prometheus/rules.yml
python3 scripts/check-dashboard.py deploy/grafana/trellis.json

port=$(free_port)
prom_port=$(free_port)
trace_port=$(free_port)
echo "prometheus-check: trellis on 127.0.0.1:$port ($BIN)"
# hash_concurrency 1 and hash_queue 0: concurrent registrations are refused (503), which
# the load needs for the 5xx and refused-hash series. Registrations and failed logins per
# address are
# lifted; failed logins per e-mail and address (5) stay, so the load meets rate_limited.
(
  cd "$work"
  exec env TRELLIS_PROFILE=test TRELLIS_SERVER__PORT="$port" \
    TRELLIS_DATABASE__URL="sqlite://$work/trellis.db" TRELLIS_MQ__FILE__DIRECTORY="$work/events" \
    TRELLIS_MQ__SPOOL__DIRECTORY="$work/spool" \
    TRELLIS_MODULES__BI__RATE_PER_ADDRESS=1000000 TRELLIS_MODULES__BI__BURST_PER_ADDRESS=1000000 \
    TRELLIS_MODULES__AUTH__LOGIN_FAILURES_PER_ADDRESS=1000000 \
    TRELLIS_MODULES__USER__HASH_CONCURRENCY=1 TRELLIS_MODULES__USER__HASH_QUEUE=0 \
    TRELLIS_MODULES__USER__REGISTRATIONS_PER_ADDRESS=1000000 \
    TRELLIS_SERVER__HEADER_READ_TIMEOUT_MS=500 \
    TRELLIS_TELEMETRY__LEVEL=info TRELLIS_TELEMETRY__FORMAT=json \
    TRELLIS_TRACING__ENABLED=true TRELLIS_TRACING__ENDPOINT="http://127.0.0.1:$trace_port/v1/traces" \
    TRELLIS_TRACING__SCHEDULED_DELAY_MS=500 TRELLIS_TRACING__EXPORT_TIMEOUT_MS=1000 \
    ${TEST_REDIS_URL:+TRELLIS_CACHE__URL="$TEST_REDIS_URL"} \
    "$BIN"
) >"$work/trellis.log" 2>&1 &
pids+=("$!")
wait_http "http://127.0.0.1:$port/healthz" 30 trellis "$work/trellis.log"

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/prometheus/rules.yml
scrape_configs:
  - job_name: trellis
    static_configs:
      - targets: ["127.0.0.1:$port"]
EOF
echo "prometheus-check: prometheus on 127.0.0.1:$prom_port"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=("$!")
wait_http "http://127.0.0.1:$prom_port/-/ready" 60 prometheus "$work/prometheus.log"

echo "prometheus-check: load for ${LOAD_SECONDS}s"
cat >"$work/load.py" <<'PY'
import http.server, json, os, socket, subprocess, sys, threading, time, urllib.error, urllib.request

base, trace_port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
counts, lock = {}, threading.Lock()
stop_at = time.monotonic() + seconds


def call(method, path, body=None, token=None, raw=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    except OSError:
        status, payload = "error", b""
    with lock:
        key = f"{method} {path.split('?')[0]} {status}"
        counts[key] = counts.get(key, 0) + 1
    return status, payload


def register(email):
    """Registers an account; retries a refused hash (503) for up to 20 s."""
    body = {"email": email, "password": "check password 123", "first_name": "Check", "last_name": "User"}
    status = None
    for _ in range(200):
        status = call("POST", "/api/v1/users", body)[0]
        if status != 503:
            break
        time.sleep(0.1)
    return status


def login(email, password="check password 123"):
    for _ in range(50):  # a login may be refused (503) while a registration hashes
        status, payload = call("POST", "/api/v1/auth/login", {"email": email, "password": password})
        if status == 200:
            return json.loads(payload)["access_token"]
        time.sleep(0.1)
    raise SystemExit(f"load: no login for {email}")


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


# Spans are exported while the receiver runs, dropped (export_failed) once it is gone.
receiver = http.server.ThreadingHTTPServer(("127.0.0.1", trace_port), Receiver)
threading.Thread(target=receiver.serve_forever, daemon=True).start()

users = [f"user{i}-{os.getpid()}@example.com" for i in range(3)]
for email in users:
    if register(email) != 201:
        raise SystemExit(f"load: cannot register {email}")
register(users[0])  # 409: a unique violation, counted in db_query_errors_total
tokens = [login(email) for email in users]


def worker(n):
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        call("GET", "/healthz")
        call("GET", "/readyz")
        call("GET", "/api/v1/info")
        call("GET", "/api/v1/users/me", token=tokens[n % len(tokens)])
        call("POST", "/api/v1/bi/events", [{"name": "check.event", "properties": {"n": i}},
                                           {"name": "check.event", "properties": {"n": i + 1}}])
        call("GET", "/api/v1/no-such-route")
        call("POST", "/api/v1/users", raw=b"{not json")
        if i % 10 == n:
            login(users[n % len(users)])
        time.sleep(0.05)


def failed_logins():
    # Wrong passwords: 401 (invalid_credentials), then 429 past the per-pair budget.
    while time.monotonic() < stop_at:
        call("POST", "/api/v1/auth/login", {"email": users[-1], "password": "wrong password 123"})
        time.sleep(1.5)


def registration_bursts():
    # Concurrent registrations with a hash queue of 0: all but one are refused (503).
    k = 0
    while time.monotonic() < stop_at:
        burst = [threading.Thread(target=call, args=("POST", "/api/v1/users", {
                     "email": f"burst{k}-{j}-{os.getpid()}@example.com", "password": "check password 123",
                     "first_name": "Burst", "last_name": "User"})) for j in range(5)]
        k += 1
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        time.sleep(4)


def header_timeout():
    # A request header that never ends: closed after server.header_read_timeout_ms.
    host, port = base.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: check\r\n")
        try:
            s.recv(1024)
        except OSError:
            pass


def delete_user():
    # Deleting an account publishes user.deleted on the bus (auth's subscriber runs).
    time.sleep(seconds * 0.5)
    email = f"deleted-{os.getpid()}@example.com"
    if register(email) != 201:
        raise SystemExit(f"load: cannot register {email}")
    token = login(email)
    _, me = call("GET", "/api/v1/users/me", token=token)
    call("DELETE", f"/api/v1/users/{json.loads(me)['id']}", token=token)


def outages():
    time.sleep(seconds * 0.3)
    receiver.shutdown()
    receiver.server_close()
    ctl = os.environ.get("TEST_SERVICES_CTL")
    if ctl and os.environ.get("TEST_REDIS_URL"):
        print("load: stopping redis for 5 s", flush=True)
        subprocess.run([ctl, "stop", "redis"], check=True, timeout=30)
        time.sleep(5)
        subprocess.run([ctl, "start", "redis"], check=True, timeout=30, stdout=subprocess.DEVNULL)
        print("load: redis started again", flush=True)


threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
threads += [threading.Thread(target=f) for f in (failed_logins, registration_bursts, header_timeout, delete_user, outages)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for key in sorted(counts):
    print(f"load: {counts[key]:6d} {key}")
PY
timeout $((LOAD_SECONDS + 90)) python3 "$work/load.py" "http://127.0.0.1:$port" "$trace_port" "$LOAD_SECONDS" \
  >"$work/load.log" 2>&1 || { echo "prometheus-check: the load failed"; tail -n 30 "$work/load.log"; exit 1; }
grep -E ' (5..|error)$' "$work/load.log" || true

curl -fsS "http://127.0.0.1:$port/metrics" >"$work/metrics.txt"
series=$(grep -cv -e '^#' -e '^$' "$work/metrics.txt" || true)
echo "prometheus-check: /metrics exposes $series series (at most $MAX_SERIES)"

python3 scripts/check-dashboard.py --exprs deploy/grafana/trellis.json >"$work/exprs.json"
sleep 3 # two more scrapes and rule evaluations after the load
python3 - "http://127.0.0.1:$prom_port" "$work/exprs.json" docs/operations.md "$series" "$MAX_SERIES" <<'PY'
import json, os, re, sys, time, urllib.parse, urllib.request

prom, exprs_path, docs, series, max_series = sys.argv[1:6]


def api(path, **params):
    url = f"{prom}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


deadline = time.monotonic() + 60
while not any(s["value"][1] == "1" for s in api("query", query='up{job="trellis"}')["result"]):
    if time.monotonic() > deadline:
        sys.exit("prometheus-check: Prometheus never scraped Trellis (up != 1)")
    time.sleep(0.5)

failures = []
if int(series) > int(max_series):
    failures.append(f"/metrics exposes {series} series, above {max_series}")


def substitute(expr):
    for name, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("${instance}", ".*"),
                        ("$instance", ".*"), ("${route}", ".*"), ("$route", ".*")):
        expr = expr.replace(name, value)
    return expr


rows = []
for q in json.load(open(exprs_path)):
    rows.append(("panel", q["panel"], q["refId"] or "-", substitute(q["expr"])))

groups = api("rules")["groups"]
for g in groups:
    for rule in g["rules"]:
        if rule["health"] != "ok" or rule.get("lastError"):
            failures.append(f"rule {rule['name']} (group {g['name']}): health {rule['health']} {rule.get('lastError', '')}")
        if rule["type"] == "recording":
            rows.append(("rule", rule["name"], "-", rule["query"]))
if {g["name"] for g in groups} != {"trellis-http", "trellis-slo", "trellis-slo-alerts", "trellis-alerts"}:
    failures.append(f"unexpected rule groups loaded: {sorted(g['name'] for g in groups)}")


def slug(heading, seen):
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen.get(s, 0)
    seen[s] = n + 1
    return s if n == 0 else f"{s}-{n}"


seen, anchors, fence = {}, set(), False
for line in open(docs, encoding="utf-8"):
    if line.startswith("```"):
        fence = not fence
    m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
        anchors.add(slug(m.group(1), seen))
alerts = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
for rule in alerts:
    runbook = rule.get("annotations", {}).get("runbook", "")
    target = runbook.partition("#")
    if target[0] != "docs/operations.md" or target[2] not in anchors:
        failures.append(f"alert {rule['name']}: runbook {runbook!r} is not a heading of {docs}")
    if rule.get("labels", {}).get("severity") not in ("page", "ticket"):
        failures.append(f"alert {rule['name']}: severity must be page or ticket")

if os.environ.get("TEST_SERVICES_CTL") and os.environ.get("TEST_REDIS_URL"):
    # Redis was down for ~5 s: the gauges must have seen it and be back at 1.
    for gauge in ('cache_up', 'dependency_up{dependency="core.cache"}'):
        low = api("query", query=f"min_over_time({gauge}[2m])")["result"]
        now = api("query", query=gauge)["result"]
        if not low or low[0]["value"][1] != "0" or not now or now[0]["value"][1] != "1":
            failures.append(f"{gauge}: expected a 0 during the Redis outage and 1 after it "
                            f"(lowest {low and low[0]['value'][1]}, now {now and now[0]['value'][1]})")

print(f"{'kind':5} {'series':>6}  {'name':45} {'ref':3}  expr")
empty = []
for kind, name, ref, expr in rows:
    try:
        result = api("query", query=expr)["result"]
        count = str(len(result))
    except Exception as e:  # a query Prometheus refuses is a failure like an empty one
        result, count = [], f"error: {e}"
    print(f"{kind:5} {count:>6}  {name[:45]:45} {ref:3}  {expr[:110]}")
    if not result:
        empty.append(f"{kind} {name!r} {ref}: {expr}")
print(f"prometheus-check: {len(rows)} queries, {len(alerts)} alerts, {len(groups)} rule groups")
for f in failures:
    print(f"prometheus-check: FAIL {f}")
for e in empty:
    print(f"prometheus-check: EMPTY {e}")
sys.exit(1 if failures or empty else 0)
PY
echo "prometheus-check: passed"
