#!/usr/bin/env bash
# The whole Trellis test suite, from a clean clone: installs what it needs, then runs
# formatting, lints, the feature-subset builds, every Rust test on SQLite + the in-process
# cache, the integration tests again on PostgreSQL 15 + Redis 7 (started here), the fault
# tests, three instances behind nginx, the end-to-end checks (promtool, Swagger UI in
# headless Chromium, schemathesis) against running servers, and the operator's kit (alert
# rules and their tests, the dashboard, checked against a real Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUN=${RUN:-$PWD/.run}
mkdir -p "$RUN"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# A one-off build of the whole suite gains nothing from incremental state, which would
# only double the disk the build needs.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "install test tools"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "feature subsets: build the server with each module selection"
# name|features|expected modules|more checks (tests/tests/subset.rs). Every subset lacks
# the redis and sqs features; those with a database have the SQLite driver only.
subsets=(
  "none|||creates-nothing"
  "common|common|common|creates-nothing"
  "common-user|common,user,sqlite|common,user|no-postgres"
  "common-user-auth|common,user,auth,sqlite|auth,common,user|no-postgres"
  "bi|bi|bi|"
)
for subset in "${subsets[@]}"; do
  IFS='|' read -r name features _ _ <<<"$subset"
  cargo build -p trellis-server --no-default-features ${features:+--features "$features"}
  cp target/debug/trellis "$RUN/trellis-$name"
  # Its document against its committed snapshot (openapi/snapshots/<modules>.json).
  cargo test -q -p trellis-server --no-default-features ${features:+--features "$features"} \
    --test openapi_snapshot
done

step "feature combinations: every module selection the server has compiles"
# Modules common, user, auth (which needs user), bi and events: twenty-four selections,
# each with the SQLite driver when it has a database. The subsets above are built; the
# rest are checked.
built=" $(for subset in "${subsets[@]}"; do IFS='|' read -r _ f _ _ <<<"$subset"; printf '[%s] ' "$f"; done)"
for common in "" common; do
  for accounts in "" user user,auth; do
    for bi in "" bi; do
      for events in "" events; do
        features=$(echo "$common,$accounts,$bi,$events" | tr -s ',' | sed 's/^,//; s/,$//')
        [ -n "$accounts$events" ] && features="$features,sqlite"
        case "$built" in *" [$features] "*) echo "features [$features]: built above"; continue ;; esac
        echo "features [$features]"
        cargo check -q -p trellis-server --no-default-features ${features:+--features "$features"}
      done
    done
  done
done
# Other drivers than SQLite: PostgreSQL alone, and Redis without the rest (the default
# build has every backend, SQS included).
for features in common,user,auth,postgres common,user,sqlite,redis; do
  echo "features [$features]"
  cargo check -q -p trellis-server --no-default-features --features "$features"
done

step "feature subsets: the common-only server links no AWS SDK, Redis or sqlx crate"
if cargo tree -p trellis-server --no-default-features --features common -e normal --prefix none \
  | grep -E '^(aws-|redis |sqlx)'; then
  echo "the common-only server depends on a backend it was built without (above)"
  exit 1
fi

step "OpenTelemetry: one version of each crate in the build (two would not see each other's spans)"
versions=$(cargo tree --workspace --all-features --prefix none --format '{p}' \
  | grep -E '^(opentelemetry|opentelemetry_sdk|opentelemetry-otlp|opentelemetry-proto|tracing-opentelemetry) v' \
  | sed 's/ (\*)$//' | sort -u)
echo "$versions"
if [ "$(echo "$versions" | cut -d' ' -f1 | uniq -d)" != "" ]; then
  echo "more than one version of an OpenTelemetry crate (above)"
  exit 1
fi

step "each module alone: its own tests, with only the core features it turns on"
for module in common user auth bi events; do
  cargo test -q -p "trellis-$module"
done

step "module generator: generate, build alone and with every module, test, document, remove"
scripts/check-generator.sh

step "OpenAPI document: redocly lint (recommended rules), no error"
"${TRELLIS_TOOLS:-$PWD/.run/tools}/redocly/node_modules/.bin/redocly" lint openapi/openapi.json \
  --format stylish

step "cargo test (workspace, all features)"
cargo test --workspace --all-features

step "PostgreSQL 15, Redis 7, moto (SQS): install and start"
scripts/services.sh install
services_env=$(scripts/services.sh start)
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
echo "$services_env"
pg_redis() { env $services_env "$@"; }

step "integration tests on PostgreSQL + Redis"
pg_redis cargo test -p trellis-tests --test api

step "fault tests: Redis outage and PostgreSQL restart under load"
pg_redis TEST_SERVICES_CTL="$PWD/scripts/services.sh" \
  cargo test -p trellis-tests --test api faults -- --ignored --test-threads=1 --nocapture

step "a full disk: the spool and the event files on a 2 MiB tmpfs"
cargo test -p trellis-tests --test api durability::a_full_disk -- --ignored --nocapture

step "BI events through SQS (moto): exactly once, outage, SIGTERM, SIGKILL, hostile input"
pg_redis TEST_SERVICES_CTL="$PWD/scripts/services.sh" \
  cargo test -p trellis-tests --test api sqs -- --ignored --test-threads=1 --nocapture

step "cluster: three instances behind nginx on PostgreSQL, Redis and moto"
pg_redis cargo test -p trellis-tests --test api cluster -- --ignored --test-threads=1 --nocapture

step "feature subsets: each binary serves and documents exactly its modules"
for subset in "${subsets[@]}"; do
  IFS='|' read -r name _ modules checks <<<"$subset"
  echo "subset '$name' -> modules [$modules], checks [$checks]"
  TEST_SUBSET_BIN="$RUN/trellis-$name" TEST_SUBSET_MODULES="$modules" TEST_SUBSET_WITHOUT_BACKENDS=1 \
    TEST_SUBSET_CHECKS="$checks" \
    cargo test -q -p trellis-tests --test subset -- --ignored
done

step "end-to-end: promtool, Swagger UI in Chromium, schemathesis"
cargo build -p trellis-server -p trellis-tests --bins
scripts/e2e.sh

step "operator's kit: promtool rules and their unit tests, the dashboard's structure"
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml
python3 scripts/check-dashboard.py deploy/grafana/trellis.json

step "operator's kit: a real Prometheus scrapes a loaded server (Redis taken down mid-load); every panel and recording rule has series"
pg_redis TEST_SERVICES_CTL="$PWD/scripts/services.sh" scripts/prometheus-check.sh target/debug/trellis

step "all checks passed"
