#!/usr/bin/env bash
# Install wrk (the HTTP load generator bench_ingest.py drives) when it is missing.
# Debian's package; needs root (as on CI). Without it the benchmarks fall back to an
# aiohttp generator and the tests skip their wrk path, so a failed install is not fatal
# unless WRK_REQUIRED=1.
set -uo pipefail

if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q wrk >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; }
fi
if command -v wrk >/dev/null 2>&1; then
    echo "ensure_wrk: installed $(wrk -v 2>&1 | head -n1)"
    exit 0
fi
echo "ensure_wrk: wrk is not installed and could not be installed (apt-get install wrk as root)" >&2
if [ "${WRK_REQUIRED:-0}" = "1" ]; then
    exit 1
fi
exit 0
