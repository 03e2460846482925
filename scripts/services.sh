#!/usr/bin/env bash
# The services the test suite runs against, on private ports: PostgreSQL 15 and Redis 7
# from Debian's packages (PostgreSQL's data under /tmp: it must be able to traverse the
# path), and moto's SQS-compatible server from PyPI in a virtualenv. `install` also
# installs nginx (Debian), which the cluster tests start themselves, each with its own
# configuration in front of the instances they run (tests/tests/api/cluster.rs).
#
#   scripts/services.sh install                  install what is missing
#   scripts/services.sh start [pg|redis|sqs]     start (all by default); prints the settings
#   scripts/services.sh stop  [pg|redis|sqs]     stop (all: also removes PostgreSQL's data)
#   scripts/services.sh restart pg|redis|sqs     stop, then start
#   scripts/services.sh pause|resume sqs         freeze / thaw the SQS server (SIGSTOP/SIGCONT)
#
# Ports: TEST_PG_PORT (15432), TEST_REDIS_PORT (16379), TEST_SQS_PORT (15000).
# State: $RUN/services; the moto virtualenv: $RUN/tools/moto.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-$PWD/.run}
STATE="$RUN/services"
PG_PORT=${TEST_PG_PORT:-15432}
REDIS_PORT=${TEST_REDIS_PORT:-16379}
SQS_PORT=${TEST_SQS_PORT:-15000}
MOTO="$RUN/tools/moto"
PGBIN=/usr/lib/postgresql/15/bin
mkdir -p "$STATE"

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then (cd /tmp && runuser -u postgres -- "$@"); else (cd /tmp && "$@"); fi
}

install_packages() {
  local need=()
  [ -x "$PGBIN/initdb" ] || need+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  [ -x /usr/sbin/nginx ] || need+=(nginx)
  if [ ${#need[@]} -gt 0 ]; then
    echo "services: installing ${need[*]} (Debian packages)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if [ ! -x "$MOTO/bin/moto_server" ]; then
    echo "services: installing moto's server into $MOTO (PyPI)"
    python3 -m venv "$MOTO"
    "$MOTO/bin/pip" install -q 'moto[server]>=5,<6'
  fi
}

pg_data() {
  if [ ! -f "$STATE/pgdata.path" ]; then
    local dir
    dir=$(mktemp -d /tmp/trellis-pg.XXXXXX)
    chmod 755 "$dir"
    echo "$dir/data" >"$STATE/pgdata.path"
  fi
  cat "$STATE/pgdata.path"
}

pg_start() {
  local data
  data=$(pg_data)
  if [ -f "$data/PG_VERSION" ] && as_postgres "$PGBIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      install -d -o postgres -g postgres -m 700 "$data"
    else
      install -d -m 700 "$data"
    fi
    as_postgres "$PGBIN/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
      --locale=C.UTF-8 >/dev/null
  fi
  as_postgres "$PGBIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$data \
        -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null
}

pg_stop() {
  local data
  data=$(pg_data)
  [ -f "$data/postmaster.pid" ] || return 0
  as_postgres "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null
}

# The data is scratch for tests: a full stop removes it, so runs leave nothing under /tmp.
pg_remove() {
  [ -f "$STATE/pgdata.path" ] || return 0
  rm -rf "$(dirname "$(cat "$STATE/pgdata.path")")"
  rm -f "$STATE/pgdata.path"
}

redis_start() {
  redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save '' \
    --appendonly no --dir "$STATE" --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log"
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
    sleep 0.05
  done
  echo "services: redis did not start"; return 1
}

redis_stop() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || return 0
    sleep 0.05
  done
}

sqs_up() { curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$SQS_PORT/moto-api/" 2>/dev/null; }

sqs_start() {
  if [ -f "$STATE/moto.pid" ] && kill -0 "$(cat "$STATE/moto.pid")" 2>/dev/null; then
    kill -CONT "$(cat "$STATE/moto.pid")"
    sqs_up && return 0
  fi
  nohup "$MOTO/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >"$STATE/moto.log" 2>&1 &
  echo $! >"$STATE/moto.pid"
  for _ in $(seq 1 200); do
    sqs_up && return 0
    sleep 0.05
  done
  echo "services: moto did not start (see $STATE/moto.log)"; return 1
}

sqs_stop() {
  [ -f "$STATE/moto.pid" ] || return 0
  local pid
  pid=$(cat "$STATE/moto.pid")
  kill -CONT "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  rm -f "$STATE/moto.pid"
}

sqs_signal() { kill "-$1" "$(cat "$STATE/moto.pid")"; }

urls() {
  echo "TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
  echo "TEST_SQS_ENDPOINT=http://127.0.0.1:$SQS_PORT"
  # Explicit dummy credentials; never look for cloud metadata.
  echo "AWS_ACCESS_KEY_ID=test"
  echo "AWS_SECRET_ACCESS_KEY=test"
  echo "AWS_REGION=us-east-1"
  echo "AWS_EC2_METADATA_DISABLED=true"
}

what=${2:-all}
case "${1:-}" in
  install) install_packages ;;
  start)
    case $what in
      pg) pg_start ;; redis) redis_start ;; sqs) sqs_start ;;
      all) pg_start; redis_start; sqs_start ;;
    esac
    urls ;;
  stop)
    case $what in
      pg) pg_stop ;; redis) redis_stop ;; sqs) sqs_stop ;;
      all) sqs_stop; redis_stop; pg_stop; pg_remove ;;
    esac ;;
  restart)
    case $what in pg) pg_stop; pg_start ;; redis) redis_stop; redis_start ;; sqs) sqs_stop; sqs_start ;; esac ;;
  pause) sqs_signal STOP ;;
  resume) sqs_signal CONT ;;
  *) echo "usage: $0 install|start|stop|restart [pg|redis|sqs|all] | pause|resume sqs"; exit 2 ;;
esac
