"""The pytest example of docs/mock_accoil.md runs as a reader would run it: copied into an
empty folder and run with pytest, with only the installed package (no project conftest,
no project pytest settings)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "mock_accoil.md"


def pytest_example() -> str:
    section = DOC.read_text().split("## In pytest", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the In pytest section should hold one Python example"
    return blocks[0]


def test_the_pytest_example_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "test_accoil.py").write_text(pytest_example())
    # an empty ini file pins the rootdir here: nothing of this project's config applies,
    # pytest-asyncio runs in its default (strict) mode
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_accoil.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 passed" in out, out
