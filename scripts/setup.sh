#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: promtool (Debian `prometheus`), headless
# Chromium, curl, Node.js and npm (Debian), a Python virtualenv with schemathesis and the
# OpenAPI linter @redocly/cli (npm) under $TRELLIS_TOOLS (default .run/tools).
# Idempotent: present tools are not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${TRELLIS_TOOLS:-$PWD/.run/tools}
mkdir -p "$TOOLS"

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (Debian packages)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$TOOLS/venv/bin/schemathesis" ]; then
  echo "setup: installing schemathesis into $TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q 'schemathesis>=4,<5'
fi
if [ ! -x "$TOOLS/redocly/node_modules/.bin/redocly" ]; then
  echo "setup: installing @redocly/cli into $TOOLS/redocly"
  mkdir -p "$TOOLS/redocly"
  npm install --prefix "$TOOLS/redocly" --silent --no-audit --no-fund '@redocly/cli@1.25.0' >/dev/null
fi
echo "setup: promtool, chromium, schemathesis and redocly are ready"
