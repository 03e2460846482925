#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: promtool (Debian `prometheus`), headless
# Chromium, curl, and a Python virtualenv with schemathesis under $TRELLIS_TOOLS
# (default .run/tools). Idempotent: present tools are not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${TRELLIS_TOOLS:-$PWD/.run/tools}
mkdir -p "$TOOLS"

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
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
echo "setup: promtool, chromium and schemathesis are ready"
