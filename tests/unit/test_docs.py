"""The README and docs/ against the code: links resolve, and every field, flag, route and
metric a user can meet is documented where the README says it is."""

from __future__ import annotations

import re
import types
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from gateway.admin import Admin
from gateway.cli import _parser
from gateway.config import Settings, Source
from gateway.ingest.routes import BATCH, SHORT, SINGLE
from gateway.loader import SERVER_ENV, SOURCE_ENV
from gateway.observability.metrics import Metrics
from mock_accoil.app import create_app
from mock_accoil.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted([*ROOT.glob("*.md"), *DOCS.glob("*.md")])

# [text](target), not images; code spans are removed first so examples do not count
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    return CODE_SPAN.sub("", CODE_BLOCK.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in CODE_BLOCK.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = _slug(heading.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links() -> list[tuple[Path, str]]:
    return [(page, m.group(1)) for page in PAGES for m in LINK.finditer(_prose(page.read_text()))]


def test_the_pages_have_links() -> None:
    # the checks below pass vacuously if the pattern stops matching
    assert len(_links()) > 40
    assert {p.name for p in PAGES} >= {"README.md", "configuration.md", "operations.md"}


@pytest.mark.parametrize(
    ("page", "target"),
    [pair for pair in _links() if not re.match(r"[a-z]+:", pair[1])],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_relative_links_and_anchors_resolve(page: Path, target: str) -> None:
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    assert dest.exists(), f"{page.name}: link to {target}: no file {dest}"
    if anchor:
        assert dest.suffix == ".md", f"{page.name}: anchor on a non-Markdown file: {target}"
        anchors = _anchors(dest)
        assert anchor in anchors, (
            f"{page.name}: no heading #{anchor} in {dest.name}: {sorted(anchors)}"
        )


def _table_names(page: str) -> set[str]:
    """The first cell of every table row of a docs page, without its backticks."""
    names = set()
    for line in (DOCS / page).read_text().splitlines():
        cell = re.match(r"\|\s*`([^`]+)`", line)
        if cell:
            names.add(cell.group(1))
    return names


def test_every_config_field_has_a_row_in_configuration_md() -> None:
    rows = _table_names("configuration.md")
    fields = {f.name for f in msgspec.structs.fields(Settings)} - {"sources"}
    fields |= {f.name for f in msgspec.structs.fields(Source)}
    assert fields - rows == set()
    assert rows & {"host", "write_key"} == {"host", "write_key"}


def test_every_flag_is_documented() -> None:
    gateway = {
        opt
        for sub in _parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        for action in sub._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert "--data-dir" in gateway
    text = (DOCS / "configuration.md").read_text()
    assert [f for f in sorted(gateway) if f"`{f}" not in text] == []
    mock = {
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert "--capacity-rate" in mock
    text = (DOCS / "mock_accoil.md").read_text()
    assert [f for f in sorted(mock) if f not in text] == []


def test_every_metric_has_a_row_in_operations_md() -> None:
    metrics = Metrics(["s"])
    names = set()
    for registry in (metrics.registry, metrics.pipeline_registry):
        assert isinstance(registry, CollectorRegistry)
        for family in registry.collect():
            # prometheus_client drops a counter's _total from the family name
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    assert "accoil_gateway_disk_full" in names
    assert names - _table_names("operations.md") == set()


def test_every_gateway_route_is_documented() -> None:
    settings = Settings(
        admin_token="t" * 8, sources=[Source(write_key="w" * 8, accoil_api_key="a" * 8)]
    )
    admin = {r.path for r in Admin(types.SimpleNamespace(settings=settings)).routes()}  # type: ignore[arg-type,attr-defined]
    assert "/admin/ledger" in admin
    ops = (DOCS / "operations.md").read_text()
    assert [p for p in sorted(admin) if f" {p}" not in ops] == []
    ingest = (DOCS / "ingest.md").read_text()
    paths = [*BATCH, *(f"/v1/{k}" for k in SINGLE), *(f"/v1/{s}" for s in SHORT)]
    assert [p for p in paths if not re.search(rf"[` ]{re.escape(p)}[`,]", ingest)] == []


def test_every_mock_route_is_documented() -> None:
    app = create_app(log_calls=False)
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert ("PUT", "/_mock/capacity") in routes
    text = (DOCS / "mock_accoil.md").read_text()
    missing = [
        (method, path)
        for method, path in sorted(routes)
        if not re.search(rf"{method}[^|\n]*`?{re.escape(path)}\b", text)
    ]
    assert missing == []


def test_every_project_path_named_in_the_pages_exists() -> None:
    named = {
        (page.name, m.group(0).rstrip(".,"))
        for page in PAGES
        for m in re.finditer(r"\b(?:scripts|tests|gateway|mock_accoil)/[\w./-]+", page.read_text())
    }
    assert ("README.md", "scripts/smoke_first_run.sh") in named
    # a module may be named without its .py (the flow diagram does)
    missing = [
        (page, path)
        for page, path in sorted(named)
        if not (ROOT / path).exists() and not (ROOT / f"{path}.py").exists()
    ]
    assert missing == []


def test_every_make_target_named_in_the_pages_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {m for page in PAGES for m in re.findall(r"`make ([\w-]+)", page.read_text())}
    named |= set(re.findall(r"^make ([\w-]+)", (ROOT / "README.md").read_text(), re.M))
    assert {"run", "test"} <= named
    assert named - targets == set()


def test_the_env_column_names_each_fields_variable() -> None:
    rows: dict[str, str] = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[2]
    expected = {field: f"`{var}`" for var, field in {**SERVER_ENV, **SOURCE_ENV}.items()}
    assert len(expected) > 30
    assert {f: rows.get(f) for f in expected if rows.get(f) != expected[f]} == {}


def test_every_variable_the_pages_name_exists() -> None:
    known = {*SERVER_ENV, *SOURCE_ENV, "GATEWAY_CONFIG", "GATEWAY_X"}
    named = {
        (page.name, var)
        for page in PAGES
        for var in re.findall(r"\b(?:GATEWAY|ACCOIL)_[A-Z_]+\b", page.read_text())
    }
    assert ("README.md", "GATEWAY_WRITE_KEY") in named
    assert sorted((page, var) for page, var in named if var not in known) == []
