#!/usr/bin/env bash
# What the real-client tests (tests/browser) need: Debian's chromium and chromium-driver
# (installed with apt when missing; needs root, as on CI) and Segment's JS SDKs, pinned in
# tests/browser/package-lock.json (`npm ci` when node_modules is missing). No browser is
# downloaded by npm or selenium. When something cannot be had, the tests say so: they fail
# when CI=true and skip elsewhere; this script fails only when BROWSER_REQUIRED=1 (or CI=true).
set -uo pipefail
cd "$(dirname "$0")/.."

required=0
if [ "${BROWSER_REQUIRED:-0}" = "1" ] || [ "${CI:-}" = "true" ]; then
    required=1
fi
missing=()

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }
    fi
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        echo "ensure_browser: installed $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
    else
        missing+=("chromium and chromium-driver (apt-get install chromium chromium-driver, as root)")
    fi
fi

if [ ! -d tests/browser/node_modules/@segment/analytics-next ] \
    || [ ! -d tests/browser/node_modules/@segment/analytics-node ]; then
    if command -v npm >/dev/null 2>&1; then
        (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) \
            || missing+=("Segment's JS SDKs (npm ci in tests/browser failed)")
    else
        missing+=("node and npm (for Segment's JS SDKs in tests/browser)")
    fi
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
for what in "${missing[@]}"; do
    echo "ensure_browser: missing $what" >&2
done
exit "$required"
