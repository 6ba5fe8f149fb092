"""What every kind of test needs to reach a server: a free loopback port, Basic auth."""

from __future__ import annotations

import base64
import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (a server started on it may still lose a race for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(user: str) -> str:
    """HTTP Basic with `user` as the user name and an empty password, as Segment's write
    key travels."""
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()
