"""What the real-client tests need: Segment's JS SDKs from tests/browser/node_modules, Debian's
Chromium driven by Selenium, node, a page server on a second origin, and the gateway as its
users run it (`python -m gateway serve`, the default two-process mode).

Nothing is downloaded here: `scripts/ensure_browser.sh` (run by `make test`) installs Chromium
and runs `npm ci`. When something is missing the tests fail with the reason on CI (CI=true)
and skip with it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
NODE_MODULES = HERE / "node_modules"
ANALYTICS_NEXT = NODE_MODULES / "@segment" / "analytics-next" / "dist" / "umd"
ANALYTICS_NODE = NODE_MODULES / "@segment" / "analytics-node"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SETUP = "run `bash scripts/ensure_browser.sh` (as root for apt) or `make test`"


def unavailable(reason: str) -> None:
    """Fail on CI, where the test must run; skip, saying why, elsewhere."""
    message = f"{reason}: {SETUP}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


def require_node_sdk() -> str:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed")
    assert node is not None
    if not (ANALYTICS_NODE / "package.json").is_file():
        unavailable(f"@segment/analytics-node is not installed in {NODE_MODULES}")
    return node


def require_browser() -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            unavailable(f"{path} is missing (Debian packages chromium and chromium-driver)")
    if not (ANALYTICS_NEXT / "index.js").is_file():
        unavailable(f"@segment/analytics-next is not installed in {NODE_MODULES}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")


class PageServer:
    """Serves `page` at `/` and the analytics-next UMD build under `/analytics-next/`, from an
    origin of its own (another port than the gateway's); records every path asked for."""

    def __init__(self, page: str) -> None:
        self.page = page.encode()
        self.paths: list[str] = []
        handler = partial(_Handler, self, directory=str(ANALYTICS_NEXT))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, server_state: PageServer, *args: Any, **kwargs: Any) -> None:
        self.state = server_state
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        # /analytics-next/index.js and /analytics-next/bundles/<chunk> -> dist/umd/<file>
        name = path.split("?", 1)[0].rsplit("/", 1)[-1]
        return str(ANALYTICS_NEXT / name)

    def do_GET(self) -> None:
        self.state.paths.append(self.path)
        if self.path.split("?", 1)[0] == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.state.page)))
            self.end_headers()
            self.wfile.write(self.state.page)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """Headless Chromium from the OS, through its chromedriver: nothing is downloaded
    (both paths are given, so selenium-manager has nothing to look for) and, by the
    host-resolver rule, no name but 127.0.0.1 resolves: nothing leaves the machine."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()
