"""Issue 28 item 12 on the tiny model, through uvicorn as `steer serve` runs it: a request head
that does not arrive in time gets 408 and the connection closes (h11 alone never times it out),
a connection limit answers 503, a method outside the allow-list gets 405, an oversized head 400.
Sockets on loopback only; the waits are bounds on a hang, not speed assertions."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from server.app import create_app
from server.security.frontdoor import uvicorn_limits
from server.settings import Settings
from testkit.server import free_port, wait_ready

HANG_S = 30  # a socket read that waits longer than this means the server never answered


@contextmanager
def served(app, settings):
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, log_config=None, **uvicorn_limits(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, alive=thread.is_alive, interval_s=0.1)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(HANG_S)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def server(tiny_lm, tiny_pack):
    settings = Settings(header_timeout_s=1.0, keep_alive_s=1, max_connections=4,
                        max_header_bytes=4096)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with served(app, settings) as port:
        yield port


def test_a_request_head_that_never_completes_gets_408(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request_timeout" in reply


def test_trickling_bytes_does_not_extend_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        sent, closed = 0, False
        for _ in range(40):  # one header byte every 0.1 s: 4 s of trickle against a 1 s deadline
            try:
                s.sendall(b"X")
                sent += 1
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        reply = b"" if closed else read_all(s)
    assert closed or reply.startswith(b"HTTP/1.1 408"), reply


def test_a_silent_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        assert read_all(s).startswith(b"HTTP/1.1 408")  # it sent nothing at all


def test_complete_requests_are_served_and_keep_alive_still_works(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server}") as c:
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
        time.sleep(1.5)  # past keep_alive_s: the pool opens a new connection
        assert c.get("/healthz").status_code == 200


def test_connection_limit_answers_503(server):
    idle = [socket.create_connection(("127.0.0.1", server)) for _ in range(4)]
    try:
        time.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{server}/healthz", timeout=HANG_S)
        assert r.status_code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + HANG_S  # the idle ones are gone: served again
    while httpx.get(f"http://127.0.0.1:{server}/healthz", timeout=HANG_S).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("method", [b"PROPFIND", b"TRACE", b"PUT", b"X" * 200])
def test_methods_outside_the_allow_list_get_405(server, method):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(method + b" /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 405"), reply[:200]
    assert b"\r\nallow: DELETE, GET, HEAD, POST\r\n" in reply and b"method_not_allowed" in reply


def test_an_oversized_head_is_refused(server):
    with socket.create_connection(("127.0.0.1", server)) as s:  # all at once: 431
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                  + b"a" * 8000 + b"\r\n\r\n")
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    with socket.create_connection(("127.0.0.1", server)) as s:  # never ending: h11 stops at 4 KiB
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000)
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
