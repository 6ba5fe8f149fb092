"""The compiled parts (setup.py), each an optional accelerator beside a pure-Python path."""

from __future__ import annotations

import importlib
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """`gateway.<name>` where the install built it, else None: without a C compiler the
    extension is not built, and its caller runs the pure path, with the same outcome."""
    try:
        return importlib.import_module(f"gateway.{name}")
    except ImportError:
        return None
