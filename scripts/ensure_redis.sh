#!/usr/bin/env bash
# Install redis-server and redis-tools (redis-cli, redis-benchmark) when missing: the Redis
# tests (tests/redis) start real servers and a 3-primary Cluster from these OS packages.
# Debian's packages; needs root (as on CI). Locally without them the Redis tests skip with
# the reason; on CI (CI=true) they fail, so a missing install is never a silent green.
set -uo pipefail

have() { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; }

if have; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q redis-server redis-tools >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 \
             && apt-get install -y -q redis-server redis-tools >/dev/null 2>&1; }
    # the package's own service is not what the tests use: they start theirs on free ports
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
fi
if have; then
    echo "ensure_redis: installed $(redis-server --version | head -n1)"
    exit 0
fi
echo "ensure_redis: redis-server/redis-cli not installed and could not be (apt-get install redis-server redis-tools as root)" >&2
if [ "${CI:-}" = "true" ] || [ "${REDIS_REQUIRED:-0}" = "1" ]; then
    exit 1
fi
exit 0
