#!/usr/bin/env python3
"""Trellis benchmark harness: Trellis beside bare poem and bare poem-openapi, in one run.

Servers run pinned to CPU 0, wrk to CPU 1 (2 threads, 64 connections). Servers alternate
A B C for BENCH_ROUNDS rounds (default 5: the p99 of one run on a shared machine can
swing tenfold, and a median of three flipped verdicts) of BENCH_DURATION seconds (default 10); the
results file reports medians with min-max, the load average, and every command used.
Run it through tests/bench/run.sh, which builds the release binaries first.

BENCH_PREVIOUS names an earlier build's `trellis` binary: it then runs in the same rounds
(`/healthz`, `/api/v1/users/me`, login) on its own defaults plus BENCH_PREVIOUS_ENV
(`KEY=value` pairs, e.g. the limits it needs lifted), so a change on the request path is
measured against the code before it in one run.

Trellis also runs with tracing on, sampling 1 % and all requests, exporting over OTLP/HTTP
to a receiver in this process that reads and drops what it is sent, and sampling all
requests towards an endpoint that never answers.

With TEST_POSTGRES_URL and TEST_REDIS_URL (run.sh starts the services), the rounds also
run Trellis on PostgreSQL + Redis, and two such instances behind nginx (nginx and both
instances on CPU 0): authenticated reads and BI batches through the proxy.
"""

import http.server
import json
import os
import threading
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "tests" / "bench" / "RESULTS.md"))
PREVIOUS = os.environ.get("BENCH_PREVIOUS")
PREVIOUS_ENV = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_PREVIOUS_ENV", "").split())
PREVIOUS_NAME = "trellis, previous build"
WRK = ["taskset", "-c", "1", "wrk", "-t2", "-c64", f"-d{DURATION}s", "--latency"]
PASSWORD = "benchmark password"
BI_BATCH = 100
# Trellis again, with less logging: what the span and the access line cost, in this run.
QUIETER = (
    ("trellis, no access line", {"TRELLIS_TELEMETRY__ACCESS_LOG": "false"}),
    ("trellis, level warn (no request span or access line)", {"TRELLIS_TELEMETRY__LEVEL": "warn"}),
)
commands = []
POSTGRES = os.environ.get("TEST_POSTGRES_URL")
REDIS = os.environ.get("TEST_REDIS_URL")
PSQL = "/usr/lib/postgresql/15/bin/psql"
NGINX = "/usr/sbin/nginx"
SHARED_NAME = "trellis, PostgreSQL + Redis"
MEMORY_NAME = "trellis, mq.durability = memory"
PROXY_NAME = "nginx, two instances (PostgreSQL + Redis)"
# Trellis again, with tracing on: the share of requests sampled, and whether the endpoint
# answers (a listener that never accepts stands for one that hangs).
TRACED = (("trellis, tracing 1 % sampled", "0.01", True),
          ("trellis, tracing all sampled", "1.0", True),
          ("trellis, tracing all sampled, endpoint never answers", "1.0", False))


def log(msg):
    print(f"bench: {msg}", flush=True)


def wait_ok(url, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.002)
    raise SystemExit(f"bench: {url} did not answer 200")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def settle(pid, timeout=60.0):
    """Waits until the disk has written back what earlier scenarios left (a BI ingest run
    leaves gigabytes, and PostgreSQL's commits would wait behind them) and the server is
    idle (under 5% of a CPU over 250 ms), so that work left from one scenario (queued
    events, password hashes) does not slow the next one."""
    os.sync()
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - before < 0.0125:
            return
        before = now
    log(f"  warning: the server was still busy after {timeout:.0f} s")


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


class Server:
    def __init__(self, name, argv, port, env=None, cwd=None):
        self.name, self.port = name, port
        full_env = dict(os.environ, **(env or {}))
        self.argv = ["taskset", "-c", "0"] + argv
        commands.append(" ".join(f"{k}={v}" for k, v in (env or {}).items()) + " " + " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, env=full_env, cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ok(f"http://127.0.0.1:{port}/healthz")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def wrk(url, headers=(), script=None):
    argv = list(WRK)
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", str(script)]
    argv.append(url)
    shown = [re.sub(r"Bearer \S+", "Bearer $TOKEN", a) for a in argv]
    commands.append(" ".join(a if " " not in a else repr(a) for a in shown))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = parse_latency(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(non2xx.group(1)) if non2xx else 0
    return {"rps": rps, "p99_ms": p99, "non2xx": non2xx, "requests": requests,
            "ok_rps": rps * (requests - non2xx) / requests if requests else 0.0,
            "socket_errors": errors.group(1) if errors else ""}


def parse_latency(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def summary(values):
    return statistics.median(values), min(values), max(values)


def fmt(values, digits=0):
    med, lo, hi = summary(values)
    return f"{med:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def metric(server, name):
    """The sum of a metric's series on `server`'s /metrics."""
    with urllib.request.urlopen(server.url("/metrics")) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(rf"{re.escape(name)}(\{{| )", line))


def post_json(url, body, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


# Each server's token is taken once, at its start, and five rounds take longer than the
# default 15-minute lifetime: an expired token would turn the last rounds of /me into 401s.
TOKENS_OUTLIVE_THE_RUN = {"TRELLIS_MODULES__AUTH__ACCESS_TTL_MS": str(6 * 3600 * 1000)}


def trellis_env(port, data):
    return {
        "TRELLIS_SERVER__PORT": str(port),
        "TRELLIS_DATABASE__URL": f"sqlite://{data}/trellis.db",
        # A folder per server: the file backend locks its own.
        "TRELLIS_MQ__FILE__DIRECTORY": f"{data}/events",
        "TRELLIS_MQ__SPOOL__DIRECTORY": f"{data}/spool",
        # The login scenario logs in from one address as fast as it can, 64 at a time: an
        # attempt holds its share of the login budgets until it succeeds.
        "TRELLIS_MODULES__AUTH__LOGIN_FAILURES_PER_PAIR": "1000000000",
        "TRELLIS_MODULES__AUTH__LOGIN_FAILURES_PER_ADDRESS": "1000000000",
        "TRELLIS_MODULES__USER__REGISTRATIONS_PER_ADDRESS": "1000000000",
        "TRELLIS_MODULES__USER__HASH_QUEUE": "1000000",
        **TOKENS_OUTLIVE_THE_RUN,
        # The load comes from one address and every event is counted on disk afterwards:
        # neither the ingest limits nor the event files' retention may get in the way.
        "TRELLIS_MODULES__BI__RATE_PER_ADDRESS": "1000000000",
        "TRELLIS_MODULES__BI__BURST_PER_ADDRESS": "1000000000",
        "TRELLIS_MODULES__BI__RATE_PER_USER": "1000000000",
        "TRELLIS_MODULES__BI__BURST_PER_USER": "1000000000",
        "TRELLIS_MQ__FILE__MAX_TOTAL_BYTES": str(1 << 50),
        "TRELLIS_MQ__FILE__MAX_FILES": "1000000",
    }


def start_trellis(port, data, workdir, name="trellis", extra_env=None):
    env = dict(trellis_env(port, data), **(extra_env or {}))
    return Server(name, [str(RELEASE / "trellis")], port, env, cwd=workdir)


class Receiver(http.server.BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports, counts them, answers an empty ExportTraceServiceResponse."""
    exports, body_bytes = 0, 0

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        Receiver.exports += 1
        Receiver.body_bytes += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start_receiver(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}/v1/traces"


def create_database(name):
    """A fresh PostgreSQL database on the services' server; its URL."""
    for statement in (f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"):
        subprocess.run([PSQL, POSTGRES, "-q", "-c", statement], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


def shared_env(database, prefix, events):
    return {
        "TRELLIS_DATABASE__URL": database,
        "TRELLIS_CACHE__URL": REDIS,
        "TRELLIS_CACHE__PREFIX": prefix,
        "TRELLIS_MQ__FILE__DIRECTORY": str(events),
    }


def start_nginx(work, port, upstreams):
    """nginx on CPU 0 in front of `upstreams` (ports), as the cluster tests run it."""
    conf = work / "nginx.conf"
    servers = "".join(f"server 127.0.0.1:{p} max_fails=0; " for p in upstreams)
    conf.write_text(
        f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {work}/nb; proxy_temp_path {work}/np;\n"
        f"  fastcgi_temp_path {work}/nf; uwsgi_temp_path {work}/nu; scgi_temp_path {work}/ns;\n"
        f"  upstream trellis {{ {servers} keepalive 64; }}\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://trellis;\n"
        "    proxy_http_version 1.1; proxy_set_header Connection \"\";\n"
        "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        "    proxy_next_upstream error timeout http_502; } } }\n")
    os.chmod(work, 0o755)
    return Server(PROXY_NAME, [NGINX, "-c", str(conf), "-p", str(work)], port)


def token_for(server, email):
    try:
        post_json(server.url("/api/v1/users"), {"email": email, "password": PASSWORD,
                                                 "first_name": "Bench", "last_name": "Mark"})
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
    return post_json(server.url("/api/v1/auth/login"), {"email": email, "password": PASSWORD})["access_token"]


def seed_users(db_path, count):
    """Adds `count` users straight into the SQLite file (one shared password hash)."""
    conn = sqlite3.connect(db_path)
    (hash_,) = conn.execute("SELECT password_hash FROM users LIMIT 1").fetchone()
    now = int(time.time() * 1000)
    rows = ((str(uuid.uuid4()), f"seed-{uuid.uuid4().hex}@example.com", hash_, "Seed", "User", now, now)
            for _ in range(count))
    conn.executemany("INSERT INTO users (id, email, password_hash, first_name, last_name, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    (total,) = conn.execute("SELECT COUNT(*) FROM users").fetchone()
    conn.close()
    return total


def startup_times(workdir, data, n=5):
    times = []
    for _ in range(n):
        env = dict(os.environ, **trellis_env(18190, data))
        t0 = time.perf_counter()
        p = subprocess.Popen(["taskset", "-c", "0", str(RELEASE / "trellis")], env=env, cwd=workdir,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ok("http://127.0.0.1:18190/healthz")
        times.append((time.perf_counter() - t0) * 1000)
        p.terminate()
        p.wait()
    return times


def main():
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (tests/bench/run.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    data = work / "data"
    data.mkdir()
    load_before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    log("start-up time to the first 200 (embedded default)")
    startup = startup_times(work, data)

    trellis = start_trellis(18181, data, work)
    rss_idle = rss_mib(trellis.proc.pid)
    poem = Server("bare poem", [str(RELEASE / "bare-poem")], 18182, {"BENCH_ADDR": "127.0.0.1:18182"})
    openapi = Server("bare poem-openapi", [str(RELEASE / "bare-openapi")], 18183, {"BENCH_ADDR": "127.0.0.1:18183"})
    quieter = []
    for index, (name, extra_env) in enumerate(QUIETER):
        quiet_data = work / f"data-quiet-{index}"
        quiet_data.mkdir()
        quieter.append(start_trellis(18184 + index, quiet_data, work, name, extra_env))
    memory_data = work / "data-memory"
    memory_data.mkdir()
    memory = start_trellis(18189, memory_data, work, MEMORY_NAME, {"TRELLIS_MQ__DURABILITY": "memory"})
    token = token_for(trellis, "bench@example.com")
    auth = [f"Authorization: Bearer {token}"]
    endpoint = start_receiver(18199)
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(1)
    black_hole_endpoint = "http://127.0.0.1:%d/v1/traces" % black_hole.getsockname()[1]
    traced = []
    for index, (name, ratio, answers) in enumerate(TRACED):
        traced_data = work / f"data-traced-{index}"
        traced_data.mkdir()
        traced.append(start_trellis(18193 + index, traced_data, work, name, {
            "TRELLIS_TRACING__ENABLED": "true",
            "TRELLIS_TRACING__ENDPOINT": endpoint if answers else black_hole_endpoint,
            "TRELLIS_TRACING__SAMPLER": "ratio",
            "TRELLIS_TRACING__RATIO": ratio,
        }))
    previous, previous_auth = None, []
    if PREVIOUS:
        previous_data = work / "data-previous"
        previous_data.mkdir()
        # Its own settings only: an earlier build refuses keys it does not know.
        previous = Server(PREVIOUS_NAME, [PREVIOUS], 18187, {
            "TRELLIS_SERVER__PORT": "18187",
            "TRELLIS_DATABASE__URL": f"sqlite://{previous_data}/trellis.db",
            "TRELLIS_MQ__FILE__DIRECTORY": str(previous_data / "events"),
            **TOKENS_OUTLIVE_THE_RUN,
            **PREVIOUS_ENV,
        }, cwd=work)
        previous_auth = [f"Authorization: Bearer {token_for(previous, 'bench@example.com')}"]
    tokens = {trellis.name: auth, PREVIOUS_NAME: previous_auth}
    for server in traced:
        tokens[server.name] = [f"Authorization: Bearer {token_for(server, 'bench@example.com')}"]
    shared, proxy, instances = None, None, []
    if POSTGRES and REDIS:
        for tool in (PSQL, NGINX):
            if not Path(tool).exists():
                raise SystemExit(f"bench: {tool} is missing (scripts/services.sh install installs it)")
        shared_data = work / "data-shared"
        shared_data.mkdir()
        shared = start_trellis(18188, shared_data, work, SHARED_NAME, shared_env(
            create_database("bench_single"), f"bench-{uuid.uuid4().hex}", shared_data / "events"))
        tokens[SHARED_NAME] = [f"Authorization: Bearer {token_for(shared, 'bench@example.com')}"]
        cluster_db = create_database("bench_cluster")
        cluster_prefix = f"bench-{uuid.uuid4().hex}"
        for index, port in enumerate((18191, 18192)):
            instance_data = work / f"data-instance-{index}"
            instance_data.mkdir()
            instances.append(start_trellis(port, instance_data, work, f"instance {index}", dict(
                shared_env(cluster_db, cluster_prefix, instance_data / "events"),
                TRELLIS_SERVER__TRUSTED_PROXIES='["127.0.0.1"]')))
        proxy = start_nginx(work, 18190, (18191, 18192))
        tokens[PROXY_NAME] = [f"Authorization: Bearer {token_for(proxy, 'bench@example.com')}"]

    bi_lua = work / "bi.lua"
    events = [{"name": "bench.page_view", "properties": {"path": f"/products/{i}", "position": i},
               "utm": {"source": "bench", "campaign": "load"}} for i in range(BI_BATCH)]
    bi_lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [=[{json.dumps(events)}]=]\n")

    results = {}
    bi_runs, bi_memory_runs = [], []
    spool = {"syncs": 0.0, "bytes": 0.0, "events": 0, "seconds": 0.0}
    for round_ in range(ROUNDS):
        for scenario, path, headers in (("healthz", "/healthz", []), ("me", "/api/v1/users/me", auth)):
            servers = (trellis, poem, openapi, *quieter) if scenario == "healthz" else (trellis, poem, openapi)
            servers += (*traced, *((previous,) if previous else ()))
            if scenario == "me" and shared:
                servers += (shared, proxy)
            for server in servers:
                log(f"round {round_ + 1}/{ROUNDS}: {scenario} on {server.name}")
                settle(trellis.proc.pid)
                r = wrk(server.url(path), tokens.get(server.name, []) if headers else [])
                if r["non2xx"] or r["socket_errors"]:
                    log(f"  warning: {r['non2xx']} non-2xx, socket errors: {r['socket_errors']}")
                results.setdefault((scenario, server.name), []).append(r)
        log(f"round {round_ + 1}/{ROUNDS}: BI ingest, batches of {BI_BATCH}, on trellis")
        settle(trellis.proc.pid)
        syncs, written = metric(trellis, "mq_spool_syncs_total"), metric(trellis, "mq_spool_written_bytes_total")
        r = wrk(trellis.url("/api/v1/bi/events"), script=bi_lua)
        if r["non2xx"] or r["socket_errors"]:
            log(f"  warning: {r['non2xx']} non-2xx, socket errors: {r['socket_errors']}")
        bi_runs.append(r)
        spool["syncs"] += metric(trellis, "mq_spool_syncs_total") - syncs
        spool["bytes"] += metric(trellis, "mq_spool_written_bytes_total") - written
        spool["events"] += (r["requests"] - r["non2xx"]) * BI_BATCH
        spool["seconds"] += DURATION
        log(f"round {round_ + 1}/{ROUNDS}: BI ingest, batches of {BI_BATCH}, on {MEMORY_NAME}")
        settle(memory.proc.pid)
        r = wrk(memory.url("/api/v1/bi/events"), script=bi_lua)
        if r["non2xx"] or r["socket_errors"]:
            log(f"  warning: {r['non2xx']} non-2xx, socket errors: {r['socket_errors']}")
        bi_memory_runs.append(r)
        if proxy:
            log(f"round {round_ + 1}/{ROUNDS}: BI ingest, batches of {BI_BATCH}, through nginx")
            settle(trellis.proc.pid)
            r = wrk(proxy.url("/api/v1/bi/events"), script=bi_lua)
            if r["non2xx"] or r["socket_errors"]:
                log(f"  warning: {r['non2xx']} non-2xx, socket errors: {r['socket_errors']}")
            results.setdefault(("bi", PROXY_NAME), []).append(r)

    log("login rate and CPU per login")
    login_lua = work / "login.lua"
    login_lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                         f'wrk.body = \'{{"email":"bench@example.com","password":"{PASSWORD}"}}\'\n')
    settle(trellis.proc.pid)
    cpu0 = cpu_seconds(trellis.proc.pid)
    login = wrk(trellis.url("/api/v1/auth/login"), script=login_lua)
    cpu1 = cpu_seconds(trellis.proc.pid)
    logins = login["rps"] * DURATION
    cpu_per_login_ms = (cpu1 - cpu0) / logins * 1000 if logins else float("nan")
    previous_login = None
    if previous:
        settle(previous.proc.pid)
        cpu0 = cpu_seconds(previous.proc.pid)
        r = wrk(previous.url("/api/v1/auth/login"), script=login_lua)
        cpu1 = cpu_seconds(previous.proc.pid)
        n = r["rps"] * DURATION
        previous_login = (r, (cpu1 - cpu0) / n * 1000 if n else float("nan"))

    log("registration rate (each emits user.registered, handled by bi)")
    registrations = {}
    for name, server in (("trellis", trellis), *(((PREVIOUS_NAME, previous),) if previous else ())):
        settle(server.proc.pid)
        # The server's name, as a slug, keeps the e-mail addresses valid and unique per server.
        tag = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        registrations[name] = wrk(server.url("/api/v1/users"), script=registration_script(work, tag))

    rss_after = rss_mib(trellis.proc.pid)
    traced_spans = {s.name: (metric(s, "trace_spans_exported_total"),
                             metric(s, "trace_spans_dropped_total"), rss_mib(s.proc.pid)) for s in traced}
    for s in (poem, openapi, memory, *quieter, *traced, *((previous,) if previous else ()),
              *((shared, proxy, *instances) if shared else ())):
        s.stop()

    log("authenticated read with 1,000,000 users vs 1,000")
    me_small = []
    seed_users(str(data / "trellis.db"), 999 - 2)  # ~1,000 accounts
    for _ in range(ROUNDS):
        settle(trellis.proc.pid)
        me_small.append(wrk(trellis.url("/api/v1/users/me"), auth)["rps"])
    trellis.stop()
    total = seed_users(str(data / "trellis.db"), 1_000_000 - 1_000)
    trellis = start_trellis(18181, data, work)
    token = token_for(trellis, "bench@example.com")
    auth = [f"Authorization: Bearer {token}"]
    me_large = []
    for _ in range(ROUNDS):
        settle(trellis.proc.pid)
        me_large.append(wrk(trellis.url("/api/v1/users/me"), auth)["rps"])
    trellis.stop()
    load_after = loadavg()

    bi_events = count_events(work / "data" / "events")
    write_results(results, startup, rss_idle, rss_after, login, cpu_per_login_ms, me_small, me_large, total,
                  (bi_runs, bi_memory_runs, spool), bi_events, load_before, load_after, started,
                  previous_login, registrations, traced_spans)
    shutil.rmtree(work, ignore_errors=True)
    log(f"results written to {RESULTS}")


def count_events(directory):
    """Client events in the embedded message-queue files (domain events from the logins
    are left out)."""
    return sum(sum('"source":"client"' in line for line in f.open()) for f in directory.glob("*.ndjson"))


def write_results(results, startup, rss_idle, rss_after, login, cpu_per_login_ms, me_small, me_large, users,
                  bi, bi_events, load_before, load_after, started, previous_login=None,
                  registrations=None, traced_spans=None):
    bi_runs, bi_memory_runs, spool = bi
    def rps(scenario, server):
        return [r["rps"] for r in results[(scenario, server)]]

    def p99(scenario, server):
        return [r["p99_ms"] for r in results[(scenario, server)]]

    def ratio(a, b):
        return statistics.median(a) / statistics.median(b)

    health_vs_poem = ratio(rps("healthz", "trellis"), rps("healthz", "bare poem"))
    me_vs_poem = ratio(rps("me", "trellis"), rps("me", "bare poem"))
    me_vs_openapi = ratio(rps("me", "trellis"), rps("me", "bare poem-openapi"))
    p99_vs_poem = ratio(p99("healthz", "trellis"), p99("healthz", "bare poem"))
    me_p99_vs_poem = ratio(p99("me", "trellis"), p99("me", "bare poem"))
    large_vs_small = statistics.median(me_large) / statistics.median(me_small)
    startup_ms = statistics.median(startup)
    bi_rates = [r["ok_rps"] * BI_BATCH for r in bi_runs]
    bi_accepted = sum((r["requests"] - r["non2xx"]) * BI_BATCH for r in bi_runs)
    bi_rate = statistics.median(bi_rates)
    bi_memory_rates = [r["ok_rps"] * BI_BATCH for r in bi_memory_runs]
    durable_vs_memory = bi_rate / statistics.median(bi_memory_rates)
    syncs_per_second = spool["syncs"] / spool["seconds"]
    bytes_per_event = spool["bytes"] / spool["events"] if spool["events"] else float("nan")
    events_per_sync = spool["events"] / spool["syncs"] if spool["syncs"] else float("nan")

    def verdict(ok):
        return "met" if ok else "**missed**"

    shared_rows, shared_section = [], []
    if ("me", SHARED_NAME) in results:
        shared_vs_embedded = ratio(rps("me", SHARED_NAME), rps("me", "trellis"))
        shared_rows = [
            f"| authenticated `GET /api/v1/users/me`, PostgreSQL + Redis vs embedded default | ≥ 0.80 × | "
            f"{shared_vs_embedded:.2f} × | {verdict(shared_vs_embedded >= 0.8)} |",
        ]
        proxy_me = rps("me", PROXY_NAME)
        proxy_bi = [r["ok_rps"] * BI_BATCH for r in results[("bi", PROXY_NAME)]]
        shared_section = [
            "## Several instances behind nginx",
            "",
            "Two instances on one PostgreSQL and one Redis behind nginx (round robin, upstream "
            "keep-alive), nginx and both instances pinned to CPU 0 with wrk on CPU 1: on two cores "
            "this measures what the proxy and the shared state cost, not scaling.",
            "",
            "| scenario | one instance, embedded | one instance, PostgreSQL + Redis | nginx, two instances |",
            "|---|---|---|---|",
            f"| `GET /api/v1/users/me`, req/s | {fmt(rps('me', 'trellis'))} | {fmt(rps('me', SHARED_NAME))} | "
            f"{fmt(proxy_me)} |",
            f"| BI ingest, events/s (batches of {BI_BATCH}) | {fmt(bi_rates)} | | {fmt(proxy_bi)} |",
            "",
        ]

    lines = [
        "# Trellis benchmark results",
        "",
        f"Run {started} on `{os.uname().nodename}` ({os.cpu_count()} CPUs); load average before "
        f"{' '.join(load_before)}, after {' '.join(load_after)}. Servers pinned to CPU 0, wrk to CPU 1 "
        f"(2 threads, 64 connections, {DURATION} s per run), {ROUNDS} rounds alternating "
        "Trellis, bare poem, bare poem-openapi. Medians with min–max. Trellis runs its embedded "
        "default (SQLite, in-process cache, info-level logs with one access line per request).",
        "",
        "## Targets",
        "",
        "| figure | target | measured | verdict |",
        "|---|---|---|---|",
        f"| `GET /healthz`, req/s vs bare poem | ≥ 0.90 × | {health_vs_poem:.2f} × | {verdict(health_vs_poem >= 0.9)} |",
        f"| authenticated `GET /api/v1/users/me`, req/s vs bare poem | ≥ 0.70 × | {me_vs_poem:.2f} × | {verdict(me_vs_poem >= 0.7)} |",
        f"| authenticated `GET /api/v1/users/me`, req/s vs bare poem-openapi | ≥ 0.90 × | {me_vs_openapi:.2f} × | {verdict(me_vs_openapi >= 0.9)} |",
        f"| p99 latency at 64 connections, `/healthz` vs bare poem | ≤ 1.5 × | {p99_vs_poem:.2f} × | {verdict(p99_vs_poem <= 1.5)} |",
        f"| p99 latency at 64 connections, `/api/v1/users/me` vs bare poem | ≤ 1.5 × | {me_p99_vs_poem:.2f} × | {verdict(me_p99_vs_poem <= 1.5)} |",
        f"| BI ingest, events/s accepted (embedded default, on disk before the 202, batches of {BI_BATCH}) | ≥ 200,000 | {fmt(bi_rates)} | {verdict(bi_rate >= 200_000)} |",
        f"| BI ingest, on disk (`mq.durability = disk`) vs in memory, same run | ≥ 0.80 × | {durable_vs_memory:.2f} × | {verdict(durable_vs_memory >= 0.8)} |",
        f"| start to first 200, embedded default | ≤ 100 ms | {fmt(startup, 1)} ms | {verdict(startup_ms <= 100)} |",
        f"| RSS idle / after the load | ≤ 32 MB / ≤ 96 MB | {rss_idle:.1f} MiB / {rss_after:.1f} MiB | {verdict(rss_idle <= 32 and rss_after <= 96)} |",
        f"| authenticated read, {users:,} users vs ~1,000 | ≥ 0.9 × | {large_vs_small:.2f} × | {verdict(large_vs_small >= 0.9)} |",
        *shared_rows,
        "",
        "## Throughput and latency",
        "",
        "| scenario | server | req/s | p99 ms |",
        "|---|---|---|---|",
    ]
    for (scenario, server), runs in results.items():
        lines.append(f"| {scenario} | {server} | {fmt([r['rps'] for r in runs])} | "
                     f"{fmt([r['p99_ms'] for r in runs], 2)} |")
    poem_health = statistics.median(rps("healthz", "bare poem"))
    lines += [
        "",
        "## What logging costs `/healthz`",
        "",
        "The same build, started with less logging, in the same rounds; ratios to bare poem.",
        "",
        "| server | req/s | vs bare poem |",
        "|---|---|---|",
    ]
    for server in ("trellis", *(name for name, _ in QUIETER), "bare poem-openapi"):
        runs = rps("healthz", server)
        lines.append(f"| {server} | {fmt(runs)} | {statistics.median(runs) / poem_health:.2f} × |")
    lines += [
        "",
        "## Login (argon2id-bound, no ratio target)",
        "",
        f"{login['rps']:,.1f} logins/s on one core; {cpu_per_login_ms:.1f} ms of server CPU per login "
        f"(p99 {login['p99_ms']:.0f} ms at 64 connections).",
        "",
        *previous_section(results, login, cpu_per_login_ms, previous_login, registrations or {}),
        *tracing_section(results, traced_spans or {}),
        *shared_section,
        "## BI ingest",
        "",
        f"`POST /api/v1/bi/events` with {BI_BATCH} events per request: {fmt(bi_rates)} events/s accepted "
        f"(202), p99 {fmt([r['p99_ms'] for r in bi_runs], 1)} ms. {bi_accepted:,} events were accepted "
        f"in all (wrk counts completed requests); the event files hold {bi_events:,} client events "
        "after the server stopped.",
        "",
        f"Each of them was in the spool and synced before its 202: {syncs_per_second:,.0f} syncs/s "
        f"(`fdatasync`, one per group commit: {events_per_sync:,.0f} events per sync), "
        f"{bytes_per_event:,.0f} bytes written to the spool per event (counted by "
        "`mq_spool_syncs_total` and `mq_spool_written_bytes_total` around each run). The same build "
        f"with `mq.durability = memory` (a crash loses its buffer) accepted {fmt(bi_memory_rates)} "
        f"events/s in the same rounds: {durable_vs_memory:.2f} ×.",
        "",
        "## Authenticated read and table size",
        "",
        f"`GET /api/v1/users/me` with ~1,000 users: {fmt(me_small)} req/s; with {users:,} users: "
        f"{fmt(me_large)} req/s.",
        "",
        "## Commands",
        "",
        "```",
        "tests/bench/run.sh",
        *dict.fromkeys(commands),
        "```",
        "",
    ]
    RESULTS.write_text("\n".join(lines) + kept_history())


def tracing_section(results, traced_spans):
    """Tracing on against off (the same build, the same rounds)."""
    if not traced_spans:
        return []
    lines = [
        "## What tracing costs",
        "",
        "The same build with `tracing.enabled = true`, `sampler = ratio`, exporting over OTLP/HTTP to "
        "a receiver in the benchmark's process (on any CPU), or to a listener that never answers, in "
        "the same rounds; ratios to tracing off.",
        "",
        "| scenario | server | req/s | vs tracing off | target |",
        "|---|---|---|---|---|",
    ]
    for scenario in ("healthz", "me"):
        off = statistics.median(r["rps"] for r in results[(scenario, "trellis")])
        lines.append(f"| {scenario} | trellis (tracing off) | {fmt([r['rps'] for r in results[(scenario, 'trellis')]])} | 1.00 × | |")
        for name, ratio, _ in TRACED:
            runs = [r["rps"] for r in results[(scenario, name)]]
            value = statistics.median(runs) / off
            target = "≥ 0.95 ×: " + ("met" if value >= 0.95 else "**missed**") if ratio == "0.01" else "reported"
            lines.append(f"| {scenario} | {name} | {fmt(runs)} | {value:.2f} × | {target} |")
    lines += ["", "| server | spans exported | spans dropped | RSS after the run |", "|---|---|---|---|"]
    lines += [f"| {name} | {exported:,.0f} | {dropped:,.0f} | {rss:.1f} MiB |"
              for name, (exported, dropped, rss) in traced_spans.items()]
    lines.append("")
    return lines


def registration_script(work, name):
    """A wrk script registering a new account per request: e-mails unique per thread and
    per run."""
    script = work / f"register-{name}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        "local threads = 0\n"
        "function setup(thread) threads = threads + 1; thread:set('tid', threads) end\n"
        "local n = 0\n"
        "function request()\n  n = n + 1\n"
        f"  return wrk.format(nil, nil, nil, '{{\"email\":\"r{name}-' .. tid .. '-' .. n .. "
        f"'@example.com\",\"password\":\"{PASSWORD}\",\"first_name\":\"Bench\",\"last_name\":\"Mark\"}}')\n"
        "end\n")
    return script


def previous_section(results, login, cpu_per_login_ms, previous_login, registrations):
    """The same rounds against the previous build (BENCH_PREVIOUS), as ratios."""
    if previous_login is None:
        return []
    lines = [
        "## Against the previous build, same run",
        "",
        f"`{PREVIOUS}` ran in the same rounds on its own defaults.",
        "",
        "| scenario | this build, req/s | previous build, req/s | ratio |",
        "|---|---|---|---|",
    ]
    for scenario in ("healthz", "me"):
        now = [r["rps"] for r in results[(scenario, "trellis")]]
        before = [r["rps"] for r in results[(scenario, PREVIOUS_NAME)]]
        lines.append(f"| {scenario} | {fmt(now)} | {fmt(before)} | "
                     f"{statistics.median(now) / statistics.median(before):.3f} × |")
    r, cpu_ms = previous_login
    lines += [
        f"| login | {login['rps']:,.1f} ({cpu_per_login_ms:.1f} ms CPU each) | {r['rps']:,.1f} "
        f"({cpu_ms:.1f} ms CPU each) | {login['rps'] / r['rps']:.3f} × |",
    ]
    if PREVIOUS_NAME in registrations:
        now, before = registrations["trellis"], registrations[PREVIOUS_NAME]
        ratio = f"{now['ok_rps'] / before['ok_rps']:.3f} ×" if before["ok_rps"] else "no 201 from the previous build"
        lines.append(f"| registration, 201s/s | {now['ok_rps']:,.1f} | {before['ok_rps']:,.1f} | {ratio} |")
    lines.append("")
    return lines


HISTORY = "## What each optimisation bought"


def kept_history():
    """The hand-written section at the end of the results file, kept across runs."""
    if not RESULTS.exists():
        return ""
    text = RESULTS.read_text()
    at = text.find(HISTORY)
    return "\n" + text[at:] if at >= 0 else ""


if __name__ == "__main__":
    sys.exit(main())
