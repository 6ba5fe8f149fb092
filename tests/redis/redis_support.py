"""The Redis test harness: the servers of `benchkit.redis_server`, and what to do when the
OS package is missing (skip locally, fail on CI)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from benchkit.redis_server import (  # noqa: E402 (after the path it is found on)
    CLI,
    SERVER,
    RedisClusterNodes,
    RedisServer,
)
from benchkit.stack import free_port, wait_for  # noqa: E402

__all__ = ["RedisClusterNodes", "RedisServer", "free_port", "require_redis", "wait_for"]


def require_redis() -> None:
    """Skip (locally) or fail (on CI) when the OS package is missing."""
    missing = [tool for tool in (SERVER, CLI) if shutil.which(tool) is None]
    if not missing:
        return
    why = (f"{' and '.join(missing)} not installed: `bash scripts/ensure_redis.sh` installs "
           "the redis-server and redis-tools packages")
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)
