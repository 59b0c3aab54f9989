"""
How the proxy writes a response to the client: a head with a known body
length goes out with the first body bytes (one segment), however the
origin's reads split; bodyless responses go out at once.
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import LOOPBACK, ProxyLauncher
from hostile_origin import HOLD, HostileOrigin, Received, Reply


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    launcher = ProxyLauncher(tmp_path_factory.mktemp("response-writes"), ca_pem, session_connect_ports, dns_server)
    p = launcher(forward={"http_ports": ["1024-65535"]}, upstream={"read_timeout": 5.0})
    yield p
    problems = launcher.stop_all()
    assert not problems, problems


def ask(relay, origin: HostileOrigin, method: str = "GET") -> socket.socket:
    sock = socket.create_connection((LOOPBACK, relay.port), timeout=8)
    sock.sendall(f"{method} {origin.url}/x HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
    return sock


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, f"closed after {data!r}"
        data += piece
    return data


def test_a_head_whose_body_comes_in_a_later_read_arrives_with_it(relay):
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"hello", b"world"]
    with HostileOrigin(lambda request: Reply(pieces, pause=0.3)) as origin:
        sock = ask(relay, origin)
        started = time.monotonic()
        first = sock.recv(65536)
        # Nothing before the first body bytes, and those with the head.
        assert time.monotonic() - started >= 0.25
        assert first.endswith(b"\r\n\r\nhello")
        data = read_until(sock, b"world", first)
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 10" in head
    assert body == b"helloworld"


@pytest.mark.parametrize(
    "method, response",
    [
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_a_bodyless_response_is_written_at_once(relay, method, response):
    # The origin then holds the connection: only the head can have ended the exchange.
    with HostileOrigin(lambda request: Reply([response], then=HOLD)) as origin:
        sock = ask(relay, origin, method)
        sock.settimeout(3)
        head = read_until(sock, b"\r\n\r\n")
        sock.close()
    assert head.split(b"\r\n", 1)[0] == response.split(b"\r\n", 1)[0]


def test_a_chunked_head_is_written_before_its_first_chunk(relay):
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"]
    with HostileOrigin(lambda request: Reply(pieces, pause=1.0)) as origin:
        sock = ask(relay, origin)
        started = time.monotonic()
        read_until(sock, b"\r\n\r\n")
        assert time.monotonic() - started < 0.9  # a stream's head is not held back
        read_until(sock, b"0\r\n\r\n")
        sock.close()
