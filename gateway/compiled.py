"""The compiled parts (setup.py), each an optional accelerator beside a pure-Python path."""

from __future__ import annotations

import importlib
from types import ModuleType

# every extension setup.py builds: the check and split of a batch, a record's ledger hits
# taken into their actors, the dedupe window's loops (docs/internals.md)
EXTENSIONS = ("_check", "_route", "_window")


def load(name: str) -> ModuleType | None:
    """`gateway.<name>` where the install built it, else None: without a C compiler the
    extension is not built, and its caller runs the pure path, with the same outcome."""
    try:
        return importlib.import_module(f"gateway.{name}")
    except ImportError:
        return None


def built() -> dict[str, bool]:
    """Which extensions this install has, for the start-up log: a pure path is slower, so
    an operator who expected the compiled one should see it at a glance."""
    return {name: load(name) is not None for name in EXTENSIONS}
