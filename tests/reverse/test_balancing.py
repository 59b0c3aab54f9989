"""
Integration tests of the reverse listener's backend side (real sockets on
loopback): the waiting room of a capped route, balancing between backends,
ejection and return of a backend, which requests are retried on another
backend, the WebSocket tunnel, and mutual TLS to a backend.

The backends live in the test process: L{RecordingOrigin}, the WebSocket
echo server of C{tests/ws_backend.py}, and the small servers below (one
that counts the requests it has in flight and can listen on a given port,
one that resets a POST after its first body bytes, one that demands a
client certificate).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loopback_server import LoopbackServer
from conftest import (
    LOOPBACK,
    LogWatch,
    ProxyProcess,
    RawConnection,
    Response,
    _make_ca,
    assert_short_text_error,
    build_request,
    get_free_port,
)
from recording_origin import RecordingOrigin
from ws_backend import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WebSocketEchoServer,
    accept_key,
    encode_frame,
    handshake_request,
    new_key,
    read_frame,
)

PUBLIC_HOST = "public.test"


# ---------------------------------------------------------------------------
# Backends in the test process
# ---------------------------------------------------------------------------


def read_request(rfile) -> tuple[str, str, dict[str, str]] | None:
    """One request head from a buffered socket file: (method, target, lower-cased headers); None at EOF."""
    line = rfile.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while True:
        field = rfile.readline(65537)
        if field in (b"\r\n", b"\n", b""):
            return method, target, headers
        name, _, value = field.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


def respond(sock, status: int, payload: dict, head_only: bool = False) -> None:
    """A JSON response with a Content-Length (and no body bytes for a HEAD)."""
    body = json.dumps(payload).encode()
    head = (b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body)))
    sock.sendall(head if head_only else head + body)


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class CountingBackend(LoopbackServer):
    """
    An HTTP/1.1 backend (keep-alive, bodies by Content-Length) that records
    C{requests} as (method, target) in arrival order and the highest number
    of requests it had in flight at once (C{max_in_flight}).  C{/delay/MS}
    answers MS ms after the head; C{/health} answers C{health_status} and is
    recorded in C{health} instead.  The JSON answer names the backend.
    """

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.requests: list[tuple[str, str]] = []
        self.health: list[str] = []
        self.health_status = 200
        self.in_flight = 0
        self.max_in_flight = 0
        super().__init__(port)

    def targets(self) -> list[str]:
        with self.lock:
            return [t for _, t in self.requests]

    def wait_requests(self, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                seen = list(self.requests)
            if len(seen) >= count or time.monotonic() > deadline:
                return seen
            time.sleep(0.01)

    def handle(self, sock: socket.socket) -> None:
        with sock.makefile("rb") as rfile:
            while (request := read_request(rfile)) is not None:
                method, target, headers = request
                rfile.read(int(headers.get("content-length", "0")))
                if target.startswith("/health"):
                    with self.lock:
                        self.health.append(target)
                        status = self.health_status
                    respond(sock, status, {"backend": self.name, "health": status}, method == "HEAD")
                    continue
                with self.lock:
                    self.requests.append((method, target))
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    if target.startswith("/delay/"):
                        time.sleep(int(target.split("/")[2].split("?")[0]) / 1000.0)
                finally:
                    with self.lock:  # before the answer: the proxy may send the next one at once
                        self.in_flight -= 1
                respond(sock, 200, {"backend": self.name, "target": target}, method == "HEAD")
                if headers.get("connection", "").lower() == "close":
                    return


class ResetBackend(LoopbackServer):
    """
    Answers GETs like a backend would (JSON naming it, keep-alive); a request
    with a body is reset (RST) as soon as its first body byte has arrived.
    C{resets} records (method, target) of each request it reset.
    """

    def __init__(self) -> None:
        self.resets: list[tuple[str, str]] = []
        super().__init__()

    def handle(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        while (request := read_request(rfile)) is not None:
            method, target, headers = request
            if int(headers.get("content-length", "0")) or "transfer-encoding" in headers:
                rfile.read(1)
                with self.lock:
                    self.resets.append((method, target))
                rfile.close()
                reset(sock)
                return
            respond(sock, 200, {"backend": "reset", "target": target}, method == "HEAD")
        rfile.close()


class MutualTLSBackend(LoopbackServer):
    """
    An HTTPS backend that requires a client certificate from C{client_ca};
    each request is answered with the client's common name and the target.
    C{failures} records the handshakes that failed.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.context.load_verify_locations(str(client_ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.set_alpn_protocols(["http/1.1"])
        self.failures: list[str] = []
        super().__init__()

    def handle(self, sock: socket.socket) -> None:
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as e:
            with self.lock:
                self.failures.append(str(e))
            # Let the alert reach the peer before the close (unread bytes would turn it into a RST).
            tls.shutdown(socket.SHUT_WR)
            tls.settimeout(2.0)
            try:
                while tls.recv(65536):
                    pass
            finally:
                tls.close()
            return
        with tls, tls.makefile("rb") as rfile:
            subject = dict(part[0] for part in tls.getpeercert()["subject"])
            while (request := read_request(rfile)) is not None:
                method, target, headers = request
                rfile.read(int(headers.get("content-length", "0")))
                respond(tls, 200, {"client_cn": subject.get("commonName"), "target": target})


@pytest.fixture
def servers():
    """A function registering a backend to be closed after the test; it returns the backend."""
    started = []

    def register(server):
        started.append(server)
        return server

    yield register
    for server in started:
        server.close()


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


def app_route(backends: list[str], **keys) -> dict:
    """The route C{/app/} (named C{app}) to C{backends}."""
    return {"prefix": "/app/", "name": "app", "backends": backends, **keys}


def send(proxy: ProxyProcess, method: str, target: str, body: bytes | None = None) -> RawConnection:
    """A new connection to the reverse listener with one request sent on it."""
    c = RawConnection(proxy.reverse_port)
    c.send(build_request(method, target, [("Host", PUBLIC_HOST)], body))
    return c


def exchange(proxy: ProxyProcess, method: str, target: str, body: bytes | None = None) -> Response:
    with send(proxy, method, target, body) as c:
        return c.read_response(method)


def assert_retry_after(resp: Response) -> None:
    value = resp.get("retry-after")
    assert value is not None and value.strip().isdigit(), f"503 without a Retry-After in seconds: {resp.headers}"


def log_line(proxy: ProxyProcess, pattern: str, timeout: float = 5.0) -> str:
    """The first line of the proxy's whole output matching C{pattern} (waiting for it)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in proxy.output().splitlines():
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            pytest.fail(f"no proxy log line matches {pattern!r}; output:\n{proxy.output()[-4000:]}")
        time.sleep(0.05)


def backend_state(route: str, url: str, state: str) -> str:
    """The pattern of the log line saying backend C{url} of C{route} is C{state} (down or up)."""
    return rf"reverse route {re.escape(route)}: backend {re.escape(url)} {state}\b"


# ---------------------------------------------------------------------------
# The waiting room
# ---------------------------------------------------------------------------


def test_waiting_room_holds_one_and_refuses_the_next(reverse_factory, servers):
    """
    max_concurrent=1, queue_size=1: while one request is in flight the
    second waits and is then served; a third finds the room full and gets a
    503 with Retry-After at once; the backend never has two at a time.
    """
    backend = servers(CountingBackend("capped"))
    proxy = reverse_factory([app_route([backend.url + "/"], max_concurrent=1, queue_size=1, queue_timeout=1.0)])
    first = send(proxy, "GET", "/app/delay/600?first")
    assert backend.wait_requests(1), "the first request never reached the backend"
    started = time.monotonic()
    second = send(proxy, "GET", "/app/second")
    time.sleep(0.2)
    sentThird = time.monotonic()
    third = send(proxy, "GET", "/app/third")
    full = third.read_response()
    refusedAfter = time.monotonic() - sentThird
    assert_short_text_error(full, 503)
    assert_retry_after(full)
    assert refusedAfter < 0.5, f"the full room answered after {refusedAfter:.2f} s, not at once"
    assert first.read_response().status == 200
    served = second.read_response()
    waited = time.monotonic() - started
    assert served.status == 200, served.body[:300]
    assert served.json() == {"backend": "capped", "target": "/second"}
    assert waited >= 0.3, f"the second request was answered after {waited:.2f} s: it did not wait"
    for c in (first, second, third):
        c.close()
    time.sleep(0.2)
    assert backend.targets() == ["/delay/600?first", "/second"]
    assert backend.max_in_flight == 1
    lines = proxy.wait_access_lines(lambda l: "/app/third" in l)
    assert lines and lines[0]["status"] == "503", lines


def test_waiting_room_is_served_in_arrival_order(reverse_factory, servers):
    """Waiters are let in first come, first served, one at a time."""
    backend = servers(CountingBackend("fifo"))
    proxy = reverse_factory([app_route([backend.url + "/"], max_concurrent=1, queue_size=3, queue_timeout=5.0)])
    connections = [send(proxy, "GET", "/app/delay/400?0")]
    assert backend.wait_requests(1), "the first request never reached the backend"
    for n in (1, 2, 3):
        connections.append(send(proxy, "GET", f"/app/delay/50?{n}"))
        time.sleep(0.1)
    statuses = [c.read_response().status for c in connections]
    for c in connections:
        c.close()
    assert statuses == [200] * 4
    assert backend.targets() == ["/delay/400?0", "/delay/50?1", "/delay/50?2", "/delay/50?3"]
    assert backend.max_in_flight == 1


def test_waiter_past_queue_timeout_gets_503(reverse_factory, servers):
    """A request that waited queue_timeout is answered 503 + Retry-After and never reaches the backend."""
    backend = servers(CountingBackend("slow"))
    proxy = reverse_factory([app_route([backend.url + "/"], max_concurrent=1, queue_size=1, queue_timeout=1.0)])
    first = send(proxy, "GET", "/app/delay/2500?hold")
    assert backend.wait_requests(1), "the first request never reached the backend"
    started = time.monotonic()
    with send(proxy, "GET", "/app/late") as late:
        resp = late.read_response()
    waited = time.monotonic() - started
    assert_short_text_error(resp, 503)
    assert_retry_after(resp)
    assert 0.8 <= waited <= 2.0, f"the waiter was answered after {waited:.2f} s (queue_timeout = 1 s)"
    assert first.read_response().status == 200
    first.close()
    time.sleep(0.2)
    assert backend.targets() == ["/delay/2500?hold"]
    assert backend.max_in_flight == 1
    lines = proxy.wait_access_lines(lambda l: "/app/late" in l)
    assert lines and lines[0]["status"] == "503", lines


# ---------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------


def served_by(origins: list[RecordingOrigin], marks: list[int]) -> int:
    """The index of the one origin that recorded a request since its mark."""
    got = [i for i, (o, m) in enumerate(zip(origins, marks)) if o.wait_requests(m, 1, timeout=0.0)]
    assert len(got) == 1, f"expected one backend to get the request, got {got}"
    return got[0]


def test_round_robin_alternates_between_backends(reverse_factory, servers):
    """Per request, on one kept-alive client connection and on fresh ones alike."""
    origins = [servers(RecordingOrigin()), servers(RecordingOrigin())]
    proxy = reverse_factory([app_route([o.url + "/" for o in origins], balance="round_robin")])
    order = []
    with RawConnection(proxy.reverse_port) as c:
        for n in range(6):
            marks = [o.mark() for o in origins]
            c.send(build_request("GET", f"/app/kept?{n}", [("Host", PUBLIC_HOST)]))
            resp = c.read_response()
            assert resp.status == 200 and resp.json()["target"] == f"/kept?{n}", resp.body[:300]
            order.append(served_by(origins, marks))
    for n in range(6):
        marks = [o.mark() for o in origins]
        resp = exchange(proxy, "GET", f"/app/fresh?{n}")
        assert resp.status == 200 and resp.json()["target"] == f"/fresh?{n}", resp.body[:300]
        order.append(served_by(origins, marks))
    assert order.count(0) == order.count(1) == 6, order
    assert all(a != b for a, b in zip(order, order[1:])), f"not round robin: {order}"


def test_least_connections_prefers_the_idle_backend(reverse_factory, servers):
    """While one backend holds a slow request, the others go to the idle one."""
    origins = [servers(RecordingOrigin()), servers(RecordingOrigin())]
    proxy = reverse_factory([app_route([o.url + "/" for o in origins], balance="least_connections")])
    marks = [o.mark() for o in origins]
    slow = send(proxy, "GET", "/app/delay/3000?slow")
    deadline = time.monotonic() + 3
    while not any(o.requests_since(m) for o, m in zip(origins, marks)) and time.monotonic() < deadline:
        time.sleep(0.01)
    holder = served_by(origins, marks)
    idle = 1 - holder
    idleMark = origins[idle].mark()
    for n in range(4):
        resp = exchange(proxy, "GET", f"/app/quick?{n}")
        assert resp.status == 200, resp.body[:300]
    assert [r["target"] for r in origins[idle].requests_since(idleMark)] == [f"/quick?{n}" for n in range(4)]
    assert [r["target"] for r in origins[holder].requests_since(marks[holder])] == ["/delay/3000?slow"]
    assert slow.read_response().status == 200
    slow.close()


# ---------------------------------------------------------------------------
# Ejection and return
# ---------------------------------------------------------------------------


def test_refused_backend_is_ejected_and_requests_still_succeed(reverse_factory, servers, closed_port):
    live = servers(RecordingOrigin())
    down = f"http://{LOOPBACK}:{closed_port}/"
    proxy = reverse_factory([app_route([down, live.url + "/"])])
    mark = live.mark()
    for n in range(6):
        resp = exchange(proxy, "GET", f"/app/item?{n}")
        assert resp.status == 200, (n, resp.status, resp.body[:300])
        assert resp.json()["target"] == f"/item?{n}"
    assert [r["target"] for r in live.requests_since(mark)] == [f"/item?{n}" for n in range(6)]
    line = log_line(proxy, backend_state("app", down, "down") + r" \(")
    assert "app" in line
    assert len(proxy.wait_access_lines(lambda l: "/app/item" in l and "status=200" in l, count=6)) == 6


def test_backend_is_used_again_once_its_health_check_passes(reverse_factory, servers):
    """
    A backend refusing connections is out (eject_seconds is long); once
    something listens on its port and answers the health check, the log says
    it is up and it gets its share again.
    """
    port = get_free_port()
    comebackURL = f"http://{LOOPBACK}:{port}/"
    live = servers(CountingBackend("live"))
    proxy = reverse_factory([app_route([comebackURL, live.url + "/"], health_check="/health",
                                       health_interval=0.2, eject_seconds=60.0)])
    for n in range(4):
        resp = exchange(proxy, "GET", f"/app/before?{n}")
        assert resp.status == 200, (n, resp.status, resp.body[:300])
        assert resp.json() == {"backend": "live", "target": f"/before?{n}"}
    log_line(proxy, backend_state("app", comebackURL, "down"))
    watch = LogWatch(proxy)
    comeback = servers(CountingBackend("comeback", port=port))
    watch.wait(backend_state("app", comebackURL, "up"), timeout=5.0)
    assert comeback.health, "the comeback was declared up without a health check reaching it"
    assert all(t.startswith("/health") for t in comeback.health)
    served = []
    for n in range(6):
        resp = exchange(proxy, "GET", f"/app/after?{n}")
        assert resp.status == 200, (n, resp.status, resp.body[:300])
        served.append(resp.json()["backend"])
    assert served.count("comeback") == served.count("live") == 3, served
    assert comeback.targets() == [f"/after?{n}" for n in range(6) if served[n] == "comeback"]


def test_failing_health_check_takes_a_backend_out_and_back(reverse_factory, servers):
    a = servers(CountingBackend("a"))
    b = servers(CountingBackend("b"))
    proxy = reverse_factory([app_route([a.url + "/", b.url + "/"], health_check="/health",
                                       health_interval=0.2, eject_seconds=60.0)])
    watch = LogWatch(proxy)
    a.health_status = 503
    watch.wait(backend_state("app", a.url + "/", "down"), timeout=5.0)
    for n in range(4):
        resp = exchange(proxy, "GET", f"/app/while-down?{n}")
        assert resp.status == 200 and resp.json()["backend"] == "b", (n, resp.status, resp.body[:300])
    assert a.targets() == []
    watch = LogWatch(proxy)
    a.health_status = 200
    watch.wait(backend_state("app", a.url + "/", "up"), timeout=5.0)
    served = [exchange(proxy, "GET", f"/app/back?{n}").json()["backend"] for n in range(4)]
    assert served.count("a") == served.count("b") == 2, served


def test_all_backends_down_is_503(reverse_factory, closed_port):
    downs = [f"http://{LOOPBACK}:{closed_port}/", f"http://{LOOPBACK}:{get_free_port()}/"]
    proxy = reverse_factory([app_route(downs)])
    first = exchange(proxy, "GET", "/app/first")
    assert first.status in (502, 503), (first.status, first.body[:300])
    for url in downs:
        log_line(proxy, backend_state("app", url, "down"))
    started = time.monotonic()
    resp = exchange(proxy, "GET", "/app/while-all-down")
    assert_short_text_error(resp, 503)
    assert time.monotonic() - started < 1.0
    lines = proxy.wait_access_lines(lambda l: "/app/while-all-down" in l)
    assert lines and lines[0]["status"] == "503", lines


# ---------------------------------------------------------------------------
# Retry rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_idempotent_request_whose_connect_failed_is_retried(reverse_factory, servers, closed_port, method):
    """
    Two requests with two backends in turn: one of them is first sent to
    the refusing backend, and is retried on the other; each reaches it once.
    """
    live = servers(CountingBackend("live"))
    down = f"http://{LOOPBACK}:{closed_port}/"
    proxy = reverse_factory([app_route([down, live.url + "/"])])
    for n in range(2):
        resp = exchange(proxy, method, f"/app/idempotent?{n}")
        assert resp.status == 200, (n, resp.status, resp.body[:300])
        if method != "HEAD":
            assert resp.json() == {"backend": "live", "target": f"/idempotent?{n}"}
    log_line(proxy, backend_state("app", down, "down"))
    assert live.wait_requests(2) == [(method, "/idempotent?0"), (method, "/idempotent?1")]


def test_post_is_not_retried_after_its_bytes_were_sent(reverse_factory, servers):
    """
    A POST whose backend reset the connection after receiving body bytes is
    answered 502, and the other backend never sees it.
    """
    resetter = servers(ResetBackend())
    other = servers(RecordingOrigin())
    proxy = reverse_factory([app_route([resetter.url + "/", other.url + "/"], name="submissions")])
    # Learn the rotation: the request after one the other backend served goes to the resetter.
    mark = other.mark()
    probe = exchange(proxy, "GET", "/app/probe")
    assert probe.status == 200, probe.body[:300]
    if not other.requests_since(mark):
        mark = other.mark()
        probe = exchange(proxy, "GET", "/app/probe-again")
        assert probe.status == 200 and other.requests_since(mark), "round robin did not alternate"
    mark = other.mark()
    resp = exchange(proxy, "POST", "/app/submit", body=os.urandom(64 * 1024))
    assert_short_text_error(resp, 502)
    assert resetter.resets == [("POST", "/submit")]
    time.sleep(0.5)
    assert other.requests_since(mark) == [], "the POST was sent a second time, to the other backend"
    lines = proxy.wait_access_lines(lambda l: "/app/submit" in l)
    assert lines and lines[0]["status"] == "502", lines
    log_line(proxy, rf"submissions\b.*{re.escape(f'{LOOPBACK}:{resetter.port}')}")


# ---------------------------------------------------------------------------
# WebSocket
# ---------------------------------------------------------------------------


@pytest.fixture
def ws_proxy(reverse_factory, servers) -> SimpleNamespace:
    """A reverse listener routing C{/ws/} to the echo backend's C{/chat/} (websocket on by default)."""
    backend = servers(WebSocketEchoServer())
    proxy = reverse_factory([{"prefix": "/ws/", "name": "ws", "backends": [backend.url + "/chat/"]}])
    return SimpleNamespace(proxy=proxy, backend=backend)


def open_websocket(proxy: ProxyProcess, target: str) -> tuple[RawConnection, Response, str]:
    """Send the opening handshake; return the connection, the response head and the key sent."""
    key = new_key()
    c = RawConnection(proxy.reverse_port)
    c.send(handshake_request(target, PUBLIC_HOST, key))
    return c, c.read_head(), key


def upgraded(proxy: ProxyProcess, target: str) -> RawConnection:
    """A WebSocket through the proxy, past the 101 and the backend's greeting."""
    c, head, key = open_websocket(proxy, target)
    assert head.status == 101, head.raw_head
    assert head.get("sec-websocket-accept") == accept_key(key)
    hello = read_frame(c.read_exact)
    assert (hello.opcode, hello.payload) == (OP_TEXT, b"hello")
    return c


def test_websocket_upgrade_and_echo(ws_proxy):
    c, head, key = open_websocket(ws_proxy.proxy, "/ws/echo?room=1")
    with c:
        assert head.status == 101, head.raw_head
        assert (head.get("upgrade") or "").lower() == "websocket"
        assert "upgrade" in head.tokens("connection")
        assert head.get("sec-websocket-accept") == accept_key(key)
        handshake = ws_proxy.backend.handshakes[0]
        assert handshake["target"] == "/chat/echo?room=1"
        sent = {n.lower(): v for n, v in handshake["headers"]}
        assert sent["upgrade"].lower() == "websocket"
        assert "upgrade" in {t.strip().lower() for t in sent["connection"].split(",")}
        assert sent["sec-websocket-key"] == key
        assert sent["sec-websocket-version"] == "13"
        # The backend's frame written right behind its 101 head.
        hello = read_frame(c.read_exact)
        assert (hello.fin, hello.opcode, hello.payload, hello.masked) == (True, OP_TEXT, b"hello", False)
        blob = os.urandom(3000)
        for opcode, payload in ((OP_TEXT, "안녕 mydata".encode()), (OP_BINARY, blob), (OP_TEXT, b"")):
            c.send(encode_frame(opcode, payload, mask=True))
            echo = read_frame(c.read_exact)
            assert (echo.opcode, echo.payload) == (opcode, payload)
        c.send(encode_frame(OP_PING, b"are you there", mask=True))
        pong = read_frame(c.read_exact)
        assert (pong.opcode, pong.payload) == (OP_PONG, b"are you there")
        c.send(encode_frame(OP_TEXT, b"frag", mask=True, fin=False)
               + encode_frame(OP_CONTINUATION, b"mented", mask=True))
        echo = read_frame(c.read_exact)
        assert (echo.fin, echo.opcode, echo.payload) == (True, OP_TEXT, b"fragmented")
        close = struct.pack("!H", 1000) + b"done"
        c.send(encode_frame(OP_CLOSE, close, mask=True))
        answer = read_frame(c.read_exact)
        assert (answer.opcode, answer.payload) == (OP_CLOSE, close)
        c.settimeout(5.0)
        assert c.read_to_eof() == b"", "bytes after the close frame"
    ended = ws_proxy.backend.wait_closes(1)
    assert ended and ended[0]["messages"] == 4 and ended[0]["close_payload"] == close, ended


def test_websocket_large_messages_both_ways(ws_proxy):
    """1 MiB in one frame and 1 MiB in sixteen fragments, echoed intact."""
    with upgraded(ws_proxy.proxy, "/ws/big") as c:
        whole = os.urandom(1 << 20)
        sender = threading.Thread(target=c.send, args=(encode_frame(OP_BINARY, whole, mask=True),), daemon=True)
        sender.start()
        echo = read_frame(c.read_exact)
        sender.join(10)
        assert echo.opcode == OP_BINARY and len(echo.payload) == len(whole)
        assert hashlib.sha256(echo.payload).digest() == hashlib.sha256(whole).digest()
        pieces = [os.urandom(1 << 16) for _ in range(16)]
        frames = b"".join(
            encode_frame(OP_BINARY if i == 0 else OP_CONTINUATION, piece, mask=True, fin=i == 15)
            for i, piece in enumerate(pieces)
        )
        sender = threading.Thread(target=c.send, args=(frames,), daemon=True)
        sender.start()
        echo = read_frame(c.read_exact)
        sender.join(10)
        assert echo.payload == b"".join(pieces)


def test_websocket_client_half_close(ws_proxy):
    """
    The client sends its close frame and shuts its write side: the backend
    gets the frame and then the EOF, and its close frame still comes back.
    """
    with upgraded(ws_proxy.proxy, "/ws/half") as c:
        close = struct.pack("!H", 1001) + b"going away"
        c.send(encode_frame(OP_CLOSE, close, mask=True))
        c.shutdown_write()
        answer = read_frame(c.read_exact)
        assert (answer.opcode, answer.payload) == (OP_CLOSE, close)
        c.settimeout(5.0)
        assert c.read_to_eof() == b""
    ended = ws_proxy.backend.wait_closes(1)
    assert ended and ended[0]["close_payload"] == close, ended
    assert ended[0]["eof_after_close"], "the client's half-close never reached the backend"


def test_websocket_backend_closes_first(ws_proxy):
    """
    The backend sends its close frame and shuts its write side: the client
    reads the frame, then EOF, and can still send its own close frame.
    """
    with upgraded(ws_proxy.proxy, "/ws/bye") as c:
        c.send(encode_frame(OP_TEXT, b"bye", mask=True))
        closing = read_frame(c.read_exact)
        assert (closing.opcode, closing.payload) == (OP_CLOSE, struct.pack("!H", 1000) + b"bye")
        c.settimeout(5.0)
        assert c.read_to_eof() == b"", "the backend's half-close did not reach the client"
        reply = struct.pack("!H", 1000)
        try:
            c.send(encode_frame(OP_CLOSE, reply, mask=True))
            time.sleep(0.2)
            c.shutdown_write()
        except OSError as e:
            pytest.fail(f"the proxy closed the client's side too when the backend half-closed: {e!r}")
    ended = ws_proxy.backend.wait_closes(1)
    assert ended and ended[0]["close_payload"] == reply, ended
    assert ended[0]["eof_after_close"], "the client's EOF never reached the backend"


def test_websocket_false_does_not_relay_the_upgrade(reverse_factory, servers):
    """
    On a route with websocket = false, Upgrade is a hop-by-hop header like
    any other: the request is not tunnelled, the backend never sees Upgrade
    (nor the upgrade token in Connection), and the client gets no 101.
    """
    origin = servers(RecordingOrigin())
    proxy = reverse_factory([{"prefix": "/plain/", "name": "plain", "backends": [origin.url + "/"],
                              "websocket": False}])
    mark = origin.mark()
    with RawConnection(proxy.reverse_port) as c:
        c.send(handshake_request("/plain/socket", PUBLIC_HOST, new_key()))
        resp = c.read_response()
        assert resp.status != 101, resp.raw_head
        assert resp.get("upgrade") is None, resp.raw_head
        seen = origin.requests_since(mark)
        if resp.status == 200:
            assert len(seen) == 1 and seen[0]["target"] == "/socket", seen
            names = {n.lower(): v for n, v in seen[0]["headers"]}
            assert "upgrade" not in names, seen[0]["headers"]
            assert "upgrade" not in {t.strip().lower() for t in names.get("connection", "").split(",")}
            # Still HTTP on this connection, not a tunnel.
            c.send(build_request("GET", "/plain/after", [("Host", PUBLIC_HOST)]))
            after = c.read_response()
            assert after.status == 200 and after.json()["target"] == "/after", after.body[:300]
        else:
            assert 400 <= resp.status < 500, (resp.status, resp.body[:300])
            assert seen == [], "a refused upgrade reached the backend"


# ---------------------------------------------------------------------------
# Mutual TLS to a backend
# ---------------------------------------------------------------------------

CLIENT_CN = "reverse-test-client"


@pytest.fixture(scope="module")
def client_identity(tmp_path_factory) -> SimpleNamespace:
    """A client CA (C{ca}) and a PEM key store (C{identity}: key + certificate with clientAuth) it issued."""
    d = tmp_path_factory.mktemp("reverse-client-tls")
    ca_key, ca_cert = _make_ca("Reverse Test Client CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLIENT_CN)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = d / "client-ca.pem"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    identity = d / "client-identity.pem"
    identity.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return SimpleNamespace(ca=ca, identity=identity)


def test_mutual_tls_to_backend(reverse_factory, servers, tls_files, client_identity, untrusted_tls_origin, tmp_path):
    """
    A backend demanding a client certificate: reached as C{localhost}, the
    upstream TLS profile for that name presents one; reached as 127.0.0.1
    (no profile) there is none, a 502 that says so.  Backend certificates
    are verified: one from an untrusted CA is a 502.
    """
    backend = servers(MutualTLSBackend(tls_files.cert_pem, tls_files.key_pem, client_identity.ca))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    proxy = reverse_factory(
        [
            {"prefix": "/mtls/", "name": "mtls-route", "backends": [f"https://localhost:{backend.port}/base/"]},
            {"prefix": "/nocert/", "name": "nocert-route", "backends": [f"https://{LOOPBACK}:{backend.port}/base/"]},
            {"prefix": "/untrusted/", "name": "untrusted-route", "backends": [untrusted_tls_origin.url + "/"]},
        ],
        upstream={"tls": {"profiles": [{"name": "backend client", "hosts": ["localhost"],
                                        "key_store": str(client_identity.identity)}]}},
        resolver={"hosts_file": str(hosts)},
    )
    ok = exchange(proxy, "GET", "/mtls/who?x=1")
    assert ok.status == 200, ok.body[:300]
    assert ok.json() == {"client_cn": CLIENT_CN, "target": "/base/who?x=1"}

    missing = exchange(proxy, "GET", "/nocert/who")
    assert_short_text_error(missing, 502)
    assert b"client certificate" in missing.body, missing.body
    deadline = time.monotonic() + 3.0
    while not backend.failures and time.monotonic() < deadline:  # the alert may beat the record
        time.sleep(0.01)
    assert backend.failures, "the backend saw no failed handshake"
    log_line(proxy, rf"nocert-route\b.*{re.escape(f'{LOOPBACK}:{backend.port}')}")

    untrusted = exchange(proxy, "GET", "/untrusted/echo")
    assert_short_text_error(untrusted, 502)
    assert b"untrusted issuer" in untrusted.body, untrusted.body
    lines = proxy.wait_access_lines(lambda l: "/nocert/who" in l or "/untrusted/echo" in l, count=2)
    assert sorted(l["status"] for l in lines) == ["502", "502"], lines
