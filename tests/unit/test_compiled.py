"""The optional extensions: what setup.py builds is what the gateway looks for and reports."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from gateway import compiled

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def test_setup_builds_exactly_the_extensions_the_gateway_knows() -> None:
    calls = [
        node for node in ast.walk(ast.parse(SETUP.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == "compiled"
    ]
    names = [str(c.args[0].value) for c in calls if isinstance(c.args[0], ast.Constant)]
    assert sorted(names) == sorted(compiled.EXTENSIONS)
    for name in names:
        assert (SETUP.parent / "gateway" / f"{name}.c").is_file(), name


def test_a_missing_extension_loads_as_none() -> None:
    assert compiled.load("_no_such_extension") is None


def test_built_reports_every_extension_where_a_compiler_is() -> None:
    have = compiled.built()
    assert list(have) == list(compiled.EXTENSIONS)
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert all(have.values()), f"not built: {[n for n, ok in have.items() if not ok]}; run `make install`"


def test_built_reports_an_extension_that_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    real = compiled.load
    monkeypatch.setattr(compiled, "load", lambda name: None if name == "_route" else real(name))
    assert compiled.built()["_route"] is False
