"""benchkit.stack starts a child on a port picked beforehand: the child it returns is the
one listening there, not whichever program took the port in between."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from benchkit.stack import listens, start_mock, stopping


class Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def other_program() -> Iterator[int]:
    """An HTTP server in this process on a free 127.0.0.1 port, answering any GET."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_listens_names_the_process_holding_the_port(tmp_path: Path) -> None:
    with other_program() as taken:
        mock = start_mock(tmp_path)
        with stopping(mock):
            assert listens(mock.child.pid, mock.port)
            assert not listens(mock.child.pid, taken)
            assert listens(os.getpid(), taken)


def test_a_port_another_program_answers_on_is_not_taken_for_the_child(tmp_path: Path) -> None:
    # the probe gets an answer at once, from the other program; the child cannot bind
    with other_program() as taken, pytest.raises(RuntimeError, match="another program"):
        start_mock(tmp_path, port=taken)
