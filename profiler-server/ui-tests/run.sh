#!/usr/bin/env bash
# End-to-end browser tests of the web UI.
#   PROFILER_SERVER_BIN=path/to/profiler-server bash profiler-server/ui-tests/run.sh
# Needs: node >= 18 + npm, Debian's chromium (apt-get install -y chromium),
# a built profiler-server binary (cargo build -p profiler-server).
# Arguments go to `node --test`, e.g. --test-name-pattern=overview.
set -euo pipefail
cd "$(dirname "$0")"
CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_BIN" ]; then
  echo "ui-tests: FAIL: chromium not found at $CHROMIUM_BIN; install it with: apt-get install -y chromium" >&2
  exit 1
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "ui-tests: FAIL: node and npm are required (apt-get install -y nodejs npm)" >&2
  exit 1
fi
# Without PROFILER_SERVER_BIN, the workspace's own test build (`cargo build`).
BIN="${PROFILER_SERVER_BIN:-$(cd ../.. && pwd)/target/debug/profiler-server}"
if [ ! -x "$BIN" ]; then
  echo "ui-tests: FAIL: profiler-server binary not found at $BIN (cargo build -p profiler-server, then set PROFILER_SERVER_BIN)" >&2
  exit 1
fi
export PROFILER_SERVER_BIN="$BIN" CHROMIUM_BIN
# playwright-core never downloads browsers; keep npm quiet and offline-friendly.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi
mkdir -p artifacts
exec node --test --test-concurrency=1 "$@" ui.test.mjs
