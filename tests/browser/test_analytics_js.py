"""analytics.js (`@segment/analytics-next`, its UMD build) in headless Chromium, talking to the
gateway as its `apiHost`, from a page on another origin: what reaches mock_accoil.

The gateway runs as users run it, `python -m gateway serve` (the default two-process mode).
Per-call mode posts each call to `{apiHost}/i|g|t|p` with `Content-Type: text/plain`, the
write key in the body and a Basic header (so the browser preflights); batching mode posts
`{"batch", "writeKey", "sentAt"}` to `{apiHost}/b`.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mock_accoil.server import MockAccoilServer
from tests.browser.support import PageServer, chromium, require_browser
from tests.contract.test_process import WRITE_KEY, gateway_process

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Pricing - Acme</title>
<script src="/analytics-next/index.js"></script>
<script>
window.runAnalytics = async function (cfg) {
  const segment = { apiKey: cfg.writeKey, apiHost: cfg.apiHost, protocol: "http" };
  if (cfg.batching) {
    segment.deliveryStrategy = { strategy: "batching", config: { size: 100, timeout: 300 } };
  }
  // settings inline: nothing is fetched from Segment's CDN
  const cdnSettings = { integrations: { "Segment.io": segment }, metrics: { sampleRate: 0 } };
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
    { writeKey: cfg.writeKey, cdnURL: location.origin, cdnSettings: cdnSettings },
    { integrations: { "Segment.io": segment } }
  );
  const failures = [];
  analytics.on("error", (e) => failures.push(String(e && e.code)));
  await analytics.identify(cfg.user, {
    email: cfg.user + "@acme.io", name: "Ann", created_at: 1705312800 });
  await analytics.group(cfg.group, { name: "Acme", plan: "pro", mrr: "1200" });
  for (let i = 0; i < 3; i++) await analytics.track("Report Built", { format: "csv" });
  await analytics.page();  // the snippet's call: no name
  await analytics.page("Dashboard");
  await analytics.page("Docs", "Dashboard");  // category, name
  return failures;
};
</script></head><body>gateway test page</body></html>
"""

SOURCE = "browser"
MODES = {
    # mode: (apiHost suffix, the routes analytics.js must have used)
    "per-call": ("/v1", {"/v1/i", "/v1/g", "/v1/t", "/v1/p"}),
    "batching": ("", {"/b"}),
}


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def routes_with(seen: dict[str, float], status: str) -> set[str]:
    return {
        name.split('route="')[1].split('"')[0] for name, n in seen.items()
        if name.startswith("accoil_gateway_http_requests_total{") and f'status="{status}"' in name
        and n
    }


def wait_for(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the calls to reach Accoil"
        time.sleep(0.1)


def loaded(driver: Any, page: PageServer) -> None:
    """Open the test page and wait for its script. Once in CI the call that runs it found no
    `runAnalytics` (the page not there yet, or not the page): it is waited for, the page
    opened again once, and otherwise the failure says what the browser had."""
    for _ in range(2):
        driver.get(page.url + "/")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if driver.execute_script("return typeof window.runAnalytics === 'function'"):
                return
            time.sleep(0.1)
    raise AssertionError(
        f"the test page's script did not load: at {driver.current_url!r}, title "
        f"{driver.title!r}, ready state {driver.execute_script('return document.readyState')!r},"
        f" paths served {page.paths}")


@pytest.mark.parametrize("mode", list(MODES))
def test_analytics_js_reaches_accoil(mock_accoil: MockAccoilServer, tmp_path: Path, mode: str) -> None:
    require_browser()
    suffix, routes = MODES[mode]
    user, group = f"user-{mode}", f"acct-{mode}"
    data = tmp_path / "data"
    data.mkdir()
    with (
        gateway_process(mock_accoil.url, data, "--flush-interval", "0.1",
                        env_extra={"ACCOIL_NAME": SOURCE}) as (_, url),
        PageServer(PAGE) as page,
        chromium(tmp_path / "profile") as driver,
    ):
        assert page.url != url  # another origin: every call is cross-origin (CORS)
        loaded(driver, page)
        api_host = url.removeprefix("http://") + suffix
        failures = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.runAnalytics(arguments[0]).then(done, (e) => done(['threw: ' + e]));",
            {"writeKey": WRITE_KEY, "apiHost": api_host, "batching": mode == "batching",
             "user": user, "group": group},
        )
        assert failures == [], failures
        wait_for(lambda: mock_accoil.count(user, "Page Viewed Dashboard") == 2
                 and mock_accoil.count(user, "Report Built") == 3
                 and len(mock_accoil.users(user_id=user)) == 1
                 and len(mock_accoil.accounts(group_id=group)) == 1)
        seen = metrics(url)
        console = driver.get_log("browser") if hasattr(driver, "get_log") else []
    # what analytics.js sent is what Accoil got, as DESIGN 3 maps it
    (account,) = mock_accoil.accounts(group_id=group)
    assert account["traits"] == {"name": "Acme", "plan": "pro", "mrr": 1200}
    assert user in account["members"]
    (person,) = mock_accoil.users(user_id=user)
    assert person["traits"] == {"email": f"{user}@acme.io", "name": "Ann",
                                "created_at": "2024-01-15T10:00:00.000Z"}
    events = {r["event"]: r["count"] for r in mock_accoil.counts(user_id=user)}
    assert events == {"Report Built": 3, "Page Viewed Dashboard": 2}, events
    # nothing undocumented in any v2 body
    assert [(c["path"], c["unknown_fields"]) for c in mock_accoil.calls() if c["unknown_fields"]] == []
    # the unnamed page() was skipped and counted, not a dead letter
    assert seen['accoil_gateway_messages_skipped_total{reason="unnamed",source="' + SOURCE + '"}'] == 1
    # the routes analytics.js used, each preflighted (it sends Authorization) and answered 200
    assert routes_with(seen, "200") - {"/readyz"} == routes, console
    assert routes_with(seen, "204") == routes
    # the page, the SDK and nothing else came from the page server (no CDN)
    assert {p.split("?")[0] for p in page.paths} <= {"/", "/analytics-next/index.js", "/favicon.ico"}
