"""The README's first run, as a newcomer meets it: `make run`'s script in an empty folder,
the README's requests, Ctrl-C, and nothing left running; and the ways a first run goes
wrong (a busy port, a data directory that cannot be made or that another gateway holds)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.compiled import EXTENSIONS
from tests.contract.test_process import free_port

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DEMO = ROOT / "scripts" / "run_demo.py"
WRITE_KEY = "wk_first_run_0003"
API_KEY = "ak_first_run_0003"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def running(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children are in other sessions: a process
    group would not find them)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@dataclass
class Output:
    """A child's output, read as it comes (a pipe left unread would stall the child)."""

    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: threading.Event = field(default_factory=threading.Event)

    def read(self, stream: Any) -> None:
        try:
            for raw in stream:
                with self.lock:
                    self.lines.append(raw.decode(errors="replace"))
        finally:
            self.ended.set()

    def wait_ended(self, within: float = 30.0) -> None:
        """Until the stream closed and every line the child wrote is read (a sleep after
        the child exits is no such promise on a loaded machine)."""
        assert self.ended.wait(within), f"output still open after {within} s:\n{self.text}"

    @property
    def text(self) -> str:
        with self.lock:
            return "".join(self.lines)

    def wait_for(self, needle: str, proc: subprocess.Popen[bytes], within: float) -> None:
        deadline = time.monotonic() + within
        while needle not in self.text:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {needle!r} within {within} s:\n{self.text}"
            time.sleep(0.05)


@contextmanager
def demo(
    cwd: Path, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], Output, Output]]:
    """`make run`'s script, as `make run` starts it (the venv's python), in `cwd`."""
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), *args], cwd=cwd, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = Output(), Output()
    readers = [threading.Thread(target=o.read, args=(s,), daemon=True)
               for o, s in ((out, proc.stdout), (err, proc.stderr))]
    for reader in readers:
        reader.start()
    try:
        yield proc, out, err
    finally:
        # whatever the test saw, nothing it started may outlive it
        left = descendants(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in left:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def curl(command: str, port: int, mock_port: int) -> tuple[int, Any]:
    """Run a `curl` command line the way curl would, against the demo's actual ports."""
    command = command.replace(":8088/", f":{port}/").replace(":8089/", f":{mock_port}/")
    args = shlex.split(command.replace("\\\n", " "))
    assert args[0] == "curl", command
    headers: dict[str, str] = {}
    body: bytes | None = None
    url = ""
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "-s":
            pass
        elif arg == "-u":
            i += 1
            headers["Authorization"] = "Basic " + base64.b64encode(args[i].encode()).decode()
        elif arg == "-H":
            i += 1
            name, _, value = args[i].partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            i += 1
            body = args[i].encode()
            # curl's -d sends this type unless -H says otherwise
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        else:
            assert arg.startswith("http://"), f"unexpected curl argument {arg!r}"
            url = arg
        i += 1
    return http("POST" if body is not None else "GET", url, body, headers)


def readme_first_run() -> list[tuple[str, str]]:
    """The README's first run: each `$ curl ...` command with the output printed under it."""
    text = README.read_text()
    section = text.split("## A first run", 1)[1]
    block = re.search(r"```console\n(.*?)```", section, flags=re.S)
    assert block is not None
    steps: list[tuple[str, str]] = []
    for chunk in block.group(1).split("\n$ ")[1:]:
        command, _, output = _split_command(chunk)
        steps.append((command, output))
    return steps


def _split_command(chunk: str) -> tuple[str, str, str]:
    """A console chunk: the command (up to its URL, across lines) and what follows."""
    match = re.match(r"(curl .*?http://\S+)(.*?)\n(.*)", chunk, flags=re.S)
    assert match is not None, chunk
    return match.group(1), match.group(2), match.group(3)


def wait_until(check: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def without_time(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["path"], {k: v for k, v in c["body"].items() if k != "timestamp"})
            for c in calls]


def test_the_readme_first_run_as_a_newcomer_does(tmp_path: Path) -> None:
    cwd = tmp_path / "fresh-clone"
    cwd.mkdir()  # empty: no ./data yet
    port, mock_port = free_port(), free_port()
    with demo(cwd, GATEWAY_PORT=str(port), MOCK_PORT=str(mock_port)) as (proc, out, err):
        out.wait_for("Ctrl-C stops both.", proc, within=60)
        assert (cwd / "data" / f"demo-{port}").is_dir()
        started = descendants(proc.pid)
        assert len(started) >= 3, started  # mock, gateway, the gateway's worker

        # the README's batch: the reply, then what reached Accoil, then the dead letter
        steps = readme_first_run()
        commands = [c for c, _ in steps]
        assert commands[0].startswith("curl -s -u demo_write_key: -d ")
        status, reply = curl(commands[0], port, mock_port)
        assert status == 200 and reply == json.loads(steps[0][1].strip())

        mock = f"http://127.0.0.1:{mock_port}"
        readme_counts = json.loads(steps[1][1])
        wait_until(lambda: len(http("GET", mock + "/_mock/counts")[1]) == len(readme_counts))
        _, counts = curl(commands[1], port, mock_port)
        strip_day = [{k: v for k, v in c.items() if k != "day"} for c in counts]
        assert strip_day == [{k: v for k, v in c.items() if k != "day"} for c in readme_counts]

        readme_calls = json.loads(steps[2][1])
        wait_until(lambda: len(http("GET", mock + "/_mock/calls")[1]) == len(readme_calls))
        _, calls = curl(commands[2], port, mock_port)
        assert sorted(without_time(calls), key=str) == sorted(without_time(readme_calls), key=str)
        assert {c["status"] for c in calls} == {202}

        readme_letters = json.loads(steps[3][1].replace("src_…", "src"))["dead_letters"]
        _, letters = curl(commands[3], port, mock_port)
        keep = ("stage", "reason", "status", "path", "repeat", "replayed_at", "payload")
        assert [{k: d[k] for k in keep} for d in letters["dead_letters"]] == [
            {k: d[k] for k in keep} for d in readme_letters
        ]

        # the curl the demo prints, as printed
        printed = out.text.split("Send an event:\n", 1)[1].split("\n\n", 1)[0].strip()
        status, reply = curl(printed, port, mock_port)
        assert status == 200 and reply == {"success": True}
        wait_until(lambda: http("GET", mock + "/_mock/counts?event=Signed%20Up")[1][0]["count"] == 2)

        # the README's Segment Python client example, as written (its host is the demo's)
        code = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S)
        assert code is not None
        example = code.group(1).replace(":8088", f":{port}")
        ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                             timeout=60)
        assert ran.returncode == 0, ran.stderr
        wait_until(lambda: http(
            "GET", mock + "/_mock/counts?event=Report%20Exported")[1] != [])
        assert http("GET", mock + "/_mock/counts?event=Report%20Exported")[1][0]["count"] == 1

        started |= descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0, err.text
    assert not [pid for pid in started if running(pid)], err.text
    assert port_free(port) and port_free(mock_port)
    assert "Traceback" not in err.text


def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    port, mock_port = free_port(), free_port()
    with demo(tmp_path, GATEWAY_PORT=str(port), MOCK_PORT=str(mock_port)) as (proc, out, err):
        out.wait_for("Ctrl-C stops both.", proc, within=60)
        started = descendants(proc.pid)
        # the gateway's line says which accelerators run, so a slow pure path shows at a glance
        up = [json.loads(x) for x in err.text.splitlines() if '"listening"' in x]
        assert [sorted(x["compiled"] + x["pure"]) for x in up if "compiled" in x] == [
            sorted(EXTENSIONS)], up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err.text
    assert started and not [pid for pid in started if running(pid)]
    assert port_free(port) and port_free(mock_port)


def test_ctrl_c_while_starting_leaves_nothing(tmp_path: Path) -> None:
    port, mock_port = free_port(), free_port()
    with demo(tmp_path, GATEWAY_PORT=str(port), MOCK_PORT=str(mock_port)) as (proc, _, err):
        err.wait_for('"listening"', proc, within=60)  # the mock is up, the gateway starting
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, err.text
    assert started and not [pid for pid in started if running(pid)]
    assert port_free(port) and port_free(mock_port)


def test_a_busy_port_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        mock_port = free_port()
        with demo(tmp_path, GATEWAY_PORT=str(busy), MOCK_PORT=str(mock_port)) as (proc, _, err):
            assert proc.wait(timeout=30) == 1
            err.wait_ended()
            assert err.text.strip().splitlines() == [
                f"make run: 127.0.0.1:{busy} is in use (another `make run`?); stop it, or move "
                "this demo: GATEWAY_PORT=... MOCK_PORT=... make run"
            ]
            assert descendants(proc.pid) == set()
        assert port_free(mock_port)
        assert not (tmp_path / "data").exists()


def test_a_gateway_that_fails_to_start_takes_the_mock_down_too(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    port, mock_port = free_port(), free_port()
    with demo(tmp_path, GATEWAY_PORT=str(port), MOCK_PORT=str(mock_port),
              GATEWAY_DATA_DIR=str(tmp_path / "not-a-folder" / "data")) as (proc, _, err):
        assert proc.wait(timeout=60) == 1
        err.wait_ended()
        lines = err.text.strip().splitlines()
        assert "cannot create the data directory" in err.text
        assert "make run: the gateway did not start: exited with 1 (see above)" in lines
        assert "Traceback" not in err.text
    assert port_free(mock_port) and port_free(port)


def serve(port: int, data_dir: Path, mock_url: str = "http://127.0.0.1:9") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--data-dir",
         str(data_dir), "--log-format", "json"],
        env={**os.environ, "GATEWAY_WRITE_KEY": WRITE_KEY, "ACCOIL_API_KEY": API_KEY,
             "ACCOIL_BASE_URL": mock_url},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = serve(busy, tmp_path / "data")
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert [line["event"] for line in lines] == [
        "starting",
        f"cannot start: cannot listen on 127.0.0.1:{busy}: Address already in use; another "
        "program (another gateway?) uses it: stop it, or choose --port / GATEWAY_PORT",
    ]
    assert "exception" not in lines[-1] and lines[-1]["level"] == "error"


def test_serve_makes_a_nested_data_dir_and_a_second_gateway_says_whom_it_waits_for(
    tmp_path: Path,
) -> None:
    data = tmp_path / "does" / "not" / "exist" / "yet"
    first_port, second_port = free_port(), free_port()
    first = serve(first_port, data)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: _ready(first_port), within=30)
        assert (data / "lock").read_text().strip() == str(first.pid)
        second = serve(second_port, data)
        err = Output()
        threading.Thread(target=err.read, args=(second.stderr,), daemon=True).start()
        err.wait_for("waiting for the data directory", second, within=30)
        waiting = next(json.loads(line) for line in err.text.splitlines()
                       if "waiting for the data directory" in line)
        assert waiting["holder"] == f"pid {first.pid}"
        assert waiting["data_dir"] == str(data)
        assert not _ready(second_port)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        wait_until(lambda: _ready(second_port), within=30)
        assert (data / "lock").read_text().strip() == str(second.pid)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_a_second_demo_on_other_ports_runs_beside_the_first(tmp_path: Path) -> None:
    # the README: GATEWAY_PORT=... MOCK_PORT=... make run moves the demo; in the same folder
    # as a running demo it gets a store of its own instead of waiting on the first one's
    ports = [(free_port(), free_port()), (free_port(), free_port())]
    with demo(tmp_path, GATEWAY_PORT=str(ports[0][0]), MOCK_PORT=str(ports[0][1])) as (a, a_out, _):
        a_out.wait_for("Ctrl-C stops both.", a, within=60)
        with demo(tmp_path, GATEWAY_PORT=str(ports[1][0]),
                  MOCK_PORT=str(ports[1][1])) as (b, b_out, b_err):
            b_out.wait_for("Ctrl-C stops both.", b, within=30)
            assert "waiting for the data directory" not in b_err.text
            assert f"Its store is ./data/demo-{ports[1][0]}." in b_out.text
            started = descendants(a.pid) | descendants(b.pid)
            for proc in (b, a):
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=60) == 0
    assert not [pid for pid in started if running(pid)]
    assert all(port_free(p) for pair in ports for p in pair)


def own_keys_command() -> str:
    section = README.read_text().split("## Your own keys and config", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert block is not None
    (line,) = block.group(1).strip().splitlines()
    return line


def test_the_readme_own_keys_command_serves(tmp_path: Path) -> None:
    # as written, with the placeholders filled in; port and store moved by the environment.
    # (bash runs a lone command in its own process: the SIGTERM below reaches the gateway)
    command = own_keys_command()
    assert command == "GATEWAY_WRITE_KEY=wk_... ACCOIL_API_KEY=... accoil-gateway serve"
    command = command.replace("wk_...", WRITE_KEY).replace("=...", f"={API_KEY}")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GATEWAY_PORT": str(port), "GATEWAY_DATA_DIR": str(tmp_path / "data"),
           "ACCOIL_BASE_URL": "http://127.0.0.1:9", "GATEWAY_LOG_FORMAT": "json"}
    proc = subprocess.Popen(["bash", "-c", command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _ready(port) or proc.poll() is not None, within=30)
        assert _ready(port)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert WRITE_KEY.encode() not in stderr and API_KEY.encode() not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_configuration_example_checks_out(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", doc.split("### Examples", 1)[1], flags=re.S)
    assert toml is not None
    text = toml.group(1)
    for n, placeholder in enumerate(re.findall(r'"((?:wk_web_|wk_backend_|stg_)?\.\.\.)"', text)):
        text = text.replace(f'"{placeholder}"', f'"{placeholder[:-3]}filled_in_{n:04d}"', 1)
    (tmp_path / "gateway.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ACCOIL_"))}
    ran = subprocess.run(
        [str(Path(sys.executable).parent / "accoil-gateway"), "check-config", "--config",
         "gateway.toml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    rows = {line.split()[0]: line.split() for line in ran.stdout.splitlines()[2:4]}
    assert rows["web"][1:3] == ["v2", "https://in.accoil.com"]
    # the backend source has a stg_ key on the segment dialect: its calls go to staging
    assert rows["backend"][1:3] == ["segment", "https://instaging.accoil.com"]
    assert "backend: stg_ key on the segment dialect: calls go to " \
        "https://instaging.accoil.com/segment" in ran.stdout
    assert "filled_in" not in ran.stdout
