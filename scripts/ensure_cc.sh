#!/usr/bin/env bash
# Install a C compiler when missing: `make install` builds the compiled check of the common
# batch (gateway/_check.c, setup.py). It is optional (without it the pure-Python check gives
# the same verdicts, slower), so a machine that cannot install one still installs; the test
# that the module is built (tests/unit/test_fast_check.py) skips there.
set -uo pipefail

have() { command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; }

if have; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q gcc libc6-dev >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 \
             && apt-get install -y -q gcc libc6-dev >/dev/null 2>&1; }
fi
if have; then
    echo "ensure_cc: installed $(cc --version | head -n1)"
else
    echo "ensure_cc: no C compiler and none could be installed: the check runs in pure Python" >&2
fi
exit 0
