"""
Regression tests for the forward (client-facing) side of issue 7, "Defects
found by outside review": real C{twistd mydataproxy} processes, raw sockets
on loopback, and L{RecordingOrigin} to see exactly what reached the origin.

Each test is named after the behaviour it pins down; the issue's item number
is in its docstring.  The last section guards what the client channel must
keep doing (pipelining, C{Expect: 100-continue}, a head arriving byte by
byte).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import uuid

import bcrypt
import pytest

from conftest import (
    LOOPBACK,
    LogWatch,
    ProxyLauncher,
    RawConnection,
    Response,
    Route,
    assert_short_text_error,
    build_request,
    parse_access_line,
)
from recording_origin import RecordingOrigin

#: How long a prompt answer or close may take.  The proxies here keep
#: forward.client_idle_timeout at 60 s, so a hang cannot pass for prompt.
PROMPT = 5.0


def tag() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorder():
    r = RecordingOrigin()
    yield r
    r.close()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    launcher = ProxyLauncher(tmp_path_factory.mktemp("review-forward"), ca_pem, session_connect_ports, dns_server)
    yield launcher
    problems = launcher.stop_all()
    assert not problems, problems


@pytest.fixture(scope="module")
def pooled(launcher):
    """One upstream connection per destination: the next client reuses it."""
    return launcher(upstream={"max_connections_per_destination": 1})


BODY_LIMIT = 100_000


@pytest.fixture(scope="module")
def limited(launcher):
    """limits.max_body_bytes = BODY_LIMIT."""
    return launcher(limits={"max_body_bytes": BODY_LIMIT})


@pytest.fixture(scope="module")
def tls_limited(launcher, tls_files, tmp_path_factory):
    """limits.max_body_bytes = BODY_LIMIT on a TLS listener (a PEM key store from the test CA)."""
    store = tmp_path_factory.mktemp("review-tls") / "listener.pem"
    store.write_bytes(tls_files.cert_pem.read_bytes() + tls_files.key_pem.read_bytes())
    return launcher(limits={"max_body_bytes": BODY_LIMIT}, forward={"tls": {"key_store": str(store)}})


@pytest.fixture(scope="module")
def denying(launcher):
    """No loopback client is allowed (403)."""
    return launcher(forward={"client_allow": ["10.0.0.0/8"]})


@pytest.fixture(scope="module")
def authenticating(launcher, tmp_path_factory):
    """Proxy authentication on (407 without credentials)."""
    path = tmp_path_factory.mktemp("review-auth") / "htpasswd"
    path.write_text("alice:%s\n" % bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)).decode())
    return launcher(forward={"auth_file": str(path)})


@pytest.fixture(scope="module")
def trusting(launcher):
    """The loopback client is a trusted proxy (its X-Forwarded-For is believed)."""
    return launcher(forward={"trusted_proxies": ["127.0.0.1/32"]})


LISTED = f"listed-{tag()}.example"


@pytest.fixture(scope="module")
def hosts_only(launcher):
    """egress.default = deny and a single host-only rule for LISTED."""
    return launcher(egress={"default": "deny", "rules": [{"name": "listed only", "action": "allow", "hosts": [LISTED]}]})


@pytest.fixture(scope="module")
def one_connection(launcher):
    """limits.max_connections_per_client = 1."""
    return launcher(limits={"max_connections_per_client": 1})


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class PacedSender(threading.Thread):
    """
    Sends C{block} C{count} times on C{sock}, C{interval} seconds apart,
    from a thread started at once; C{sent} counts the bytes sent, C{error}
    is the C{OSError} that stopped it, if any.
    """

    def __init__(self, sock: socket.socket, block: bytes, count: int, interval: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.block = block
        self.count = count
        self.interval = interval
        self.sent = 0
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        try:
            for _ in range(self.count):
                self.sock.sendall(self.block)
                self.sent += len(self.block)
                if self.interval:
                    time.sleep(self.interval)
        except OSError as e:
            self.error = e


def closed_within(c: RawConnection, seconds: float) -> float | None:
    """
    Seconds until the proxy closed C{c} (EOF or reset), dropping whatever
    else arrives; L{None} if it is still open after C{seconds}.
    """
    started = time.monotonic()
    while True:
        left = started + seconds - time.monotonic()
        if left <= 0:
            return None
        c.sock.settimeout(left)
        try:
            data = c.sock.recv(65536)
        except socket.timeout:
            return None
        except OSError:  # a reset, or a TLS connection cut without close_notify
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def access_lines(proxy, client_port: int, since: int, timeout: float = 3.0) -> list[dict]:
    """
    The parsed access lines of the client connection from C{client_port},
    among those after the first C{since} (a shared proxy sees earlier
    connections that had the same ephemeral port).
    """
    needle = f"client={LOOPBACK}:{client_port} "
    deadline = time.monotonic() + timeout
    while True:
        lines = [parse_access_line(l) for l in proxy.access_lines()[since:] if needle in l]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def header_values(request: dict, name: str) -> list[str]:
    return [v for n, v in request["headers"] if n.lower() == name.lower()]


def exchange(proxy, raw: bytes, method: str = "GET", timeout: float = PROMPT) -> Response:
    with RawConnection(proxy.port, timeout=timeout) as c:
        c.send(raw)
        return c.read_response(method)


def absolute(method: str, origin, path: str, headers=(), body=None, chunks=None, version="HTTP/1.1") -> bytes:
    return build_request(method, origin.url + path, [("Host", origin.authority), *headers], body, chunks, version)


# ---------------------------------------------------------------------------
# 1. The proxy frames every request itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listed",
    [
        "Content-Length",
        "content-length",
        "Keep-Alive, Content-Length",
        "Content-Length, Transfer-Encoding, Host",
    ],
)
def test_connection_listing_content_length_cannot_unframe_the_body(pooled, recorder, listed):
    """
    Item 1: a body that looks like a request, sent with C{Connection}
    listing C{Content-Length}, reaches the origin as the body of one request
    with the right C{Content-Length}; the next client, on the same pooled
    upstream connection, gets its own response.
    """
    smuggled = f"/delay/300/smuggled-{tag()}"
    inner = build_request("GET", smuggled, [("Host", recorder.authority)])
    mark = recorder.mark()
    with RawConnection(pooled.port, timeout=PROMPT) as a:
        a.send(absolute("POST", recorder, "/upload", [("Connection", listed)], body=inner))
        first = a.read_response()
    with RawConnection(pooled.port, timeout=PROMPT) as b:
        b.send(absolute("GET", recorder, "/second-client"))
        second = b.read_response()
    assert second.status == 200 and second.json()["target"] == "/second-client", (
        f"the second client got another request's response: {second.status} {second.body[:200]!r}"
    )
    assert first.status == 200 and first.json() == {"target": "/upload", "body_length": len(inner)}, first.body[:200]
    time.sleep(0.4)  # anything smuggled would be answered after 300 ms
    seen = recorder.requests_since(mark)
    assert [(r["method"], r["target"]) for r in seen] == [("POST", "/upload"), ("GET", "/second-client")]
    assert seen[0]["body"] == inner and seen[0]["complete"]
    assert header_values(seen[0], "content-length") == [str(len(inner))]
    assert header_values(seen[0], "host") == [recorder.authority]


@pytest.mark.parametrize("listed", ["Transfer-Encoding", "Transfer-Encoding, Content-Length, Host"])
def test_chunked_upload_reaches_origin_framed_by_the_proxy(proxy, recorder, listed):
    """
    Item 1: a chunked upload (whatever C{Connection} lists) reaches the origin
    with exactly one framing of the proxy's own: chunked, or a
    C{Content-Length} equal to the body.
    """
    mark = recorder.mark()
    resp = exchange(proxy, absolute("POST", recorder, "/chunked-up", [("Connection", listed)],
                                    chunks=[b"hello ", b"world"]))
    assert resp.status == 200 and resp.json() == {"target": "/chunked-up", "body_length": 11}
    [seen] = recorder.wait_requests(mark, 1)
    assert seen["body"] == b"hello world" and seen["complete"]
    lengths = header_values(seen, "content-length")
    codings = header_values(seen, "transfer-encoding")
    assert (codings == ["chunked"] and lengths == []) or (codings == [] and lengths == ["11"]), seen["headers"]
    assert header_values(seen, "host") == [recorder.authority]


# ---------------------------------------------------------------------------
# 3. An early origin answer during an upload
# ---------------------------------------------------------------------------

UPLOAD = 8 * 1024 * 1024
BLOCK = b"u" * 65536


@pytest.mark.parametrize("pace", ["fast", "slow"])
@pytest.mark.parametrize("answer", ["origin-closes", "origin-drains"])
def test_early_origin_answer_during_upload_is_relayed_promptly(proxy, recorder, origin, pace, answer):
    """
    Item 3: the origin answers 413 after reading only the head, while the
    client is still sending 8 MB: the client gets the whole 413 at once,
    the connection then closes, and the access line has the true duration.
    """
    since = len(proxy.access_lines())
    if answer == "origin-closes":  # Connection: close, then a lingering close
        url, expected = recorder.url + "/early-status/413", b"refused early by the origin\n"
    else:  # keeps the connection and drains the body (tests/origin.py)
        url, expected = origin.url + "/status/413?early=1", b"status 413\n"
    host = url.split("/")[2]
    c = RawConnection(proxy.port, timeout=PROMPT)
    try:
        port = c.local_port
        c.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (url.encode(), host.encode(), UPLOAD))
        started = time.monotonic()
        PacedSender(c.sock, BLOCK, UPLOAD // len(BLOCK), interval=0.02 if pace == "slow" else 0.0)
        try:
            resp = c.read_response()
        except socket.timeout:
            pytest.fail(f"no complete response within {PROMPT} s of an early 413 from the origin")
        answered = time.monotonic() - started
        assert resp.status == 413 and resp.body == expected, (resp.status, resp.body[:200])
        assert answered < PROMPT
        closed = closed_within(c, PROMPT)
        assert closed is not None, f"the connection was still open {PROMPT} s after the early response"
    finally:
        c.close()
    [line] = access_lines(proxy, port, since)
    assert line["status"] == "413"
    assert float(line["ms"]) < (answered + closed + 1.0) * 1000, line["_line"]


@pytest.mark.parametrize("failure", ["connect-refused", "nxdomain"])
def test_upstream_failure_while_body_is_held_back_is_prompt_502(proxy, closed_port, failure):
    """
    Item 3: the connection to the origin fails (refused, or the name does
    not exist) while more than 64 KiB of body, sent right behind the head,
    is held back: 502 at once, then the connection closes.
    """
    if failure == "connect-refused":
        url = f"http://{LOOPBACK}:{closed_port}/held-back"
    else:
        url = f"http://nxdomain-{tag()}.example/held-back"
    size = 1024 * 1024
    c = RawConnection(proxy.port, timeout=PROMPT)
    try:
        started = time.monotonic()
        c.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (url.encode(), size))
        PacedSender(c.sock, BLOCK, size // len(BLOCK))
        try:
            resp = c.read_response()
        except socket.timeout:
            pytest.fail(f"no response within {PROMPT} s to a request whose origin cannot be reached")
        assert_short_text_error(resp, 502)
        assert time.monotonic() - started < PROMPT
        assert closed_within(c, PROMPT) is not None, "the connection stayed open with the body never read"
    finally:
        c.close()


# ---------------------------------------------------------------------------
# 5. Chunk sizes bounded
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size_line",
    [
        pytest.param(b"10000000000000000000000000000005", id="32-digits"),
        pytest.param(b"00000000000000005", id="17-digits-small-value"),
        pytest.param(b"fffffffffffffffff", id="17-f"),
    ],
)
def test_chunk_size_of_more_than_16_hex_digits_is_400_and_close(proxy, recorder, size_line):
    """Item 5: refused at once, not waited for."""
    watch = LogWatch(proxy)
    with RawConnection(proxy.port, timeout=PROMPT) as c:
        c.send(absolute("POST", recorder, "/huge-chunk", [("Transfer-Encoding", "chunked")]) + size_line + b"\r\nhello")
        started = time.monotonic()
        try:
            resp = c.read_response()
        except socket.timeout:
            pytest.fail(f"chunk size {size_line!r}: no answer within {PROMPT} s")
        assert_short_text_error(resp, 400)
        assert closed_within(c, 2.0) is not None, "the connection stayed open after a bad chunk size"
        assert time.monotonic() - started < PROMPT
    watch.wait(r"400 .*from 127\.0\.0\.1")


def test_chunk_size_above_max_body_bytes_is_refused_before_its_data(limited, recorder):
    """Item 5: a chunk announced bigger than limits.max_body_bytes → 413 (or 400) and close, without its data."""
    with RawConnection(limited.port, timeout=PROMPT) as c:
        c.send(absolute("POST", recorder, "/announced-too-big", [("Transfer-Encoding", "chunked")])
               + b"%x\r\n" % (BODY_LIMIT * 16) + b"x" * 10)
        try:
            resp = c.read_response()
        except socket.timeout:
            pytest.fail(f"a chunk announced over the body limit got no answer within {PROMPT} s")
        assert resp.status in (413, 400), resp.status
        assert_short_text_error(resp, resp.status)
        assert closed_within(c, 2.0) is not None


# ---------------------------------------------------------------------------
# 6. A refused request stops reading
# ---------------------------------------------------------------------------

HUGE = 10 * 1024 ** 3


@pytest.mark.parametrize(
    "kind,status",
    [("client-not-allowed", 403), ("authentication", 407), ("content-length-over-limit", 413)],
)
def test_refused_request_with_body_coming_is_closed_promptly(request, recorder, kind, status):
    """
    Item 6: a refusal sent while a 10 GB body keeps coming is followed by a
    close within seconds, not by reading the declared body.
    """
    proxy = request.getfixturevalue(
        {"client-not-allowed": "denying", "authentication": "authenticating",
         "content-length-over-limit": "limited"}[kind]
    )
    mark = recorder.mark()
    c = RawConnection(proxy.port, timeout=PROMPT)
    try:
        c.send(b"POST %s/refused-upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
               % (recorder.url.encode(), recorder.authority.encode(), HUGE))
        sender = PacedSender(c.sock, BLOCK, HUGE // len(BLOCK), interval=0.01)
        resp = c.read_response()
        assert_short_text_error(resp, status)
        closed = closed_within(c, PROMPT)
        assert closed is not None, (
            f"{status}: the proxy kept reading the body ({sender.sent} bytes sent) {PROMPT} s after refusing"
        )
    finally:
        c.close()
    assert [r["target"] for r in recorder.requests_since(mark)] == []


def test_chunked_body_over_limit_stops_being_read(limited, recorder):
    """
    Item 6: an endless chunked body past limits.max_body_bytes: 413, and
    the proxy stops reading (the connection is closed while the client is
    still sending).
    """
    c = RawConnection(limited.port, timeout=PROMPT)
    try:
        c.send(absolute("POST", recorder, "/endless-chunked", [("Transfer-Encoding", "chunked")]))
        frame = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        sender = PacedSender(c.sock, frame, 100_000, interval=0.01)
        try:
            resp = c.read_response()
        except socket.timeout:
            pytest.fail(f"no 413 within {PROMPT} s for a chunked body past the limit")
        assert_short_text_error(resp, 413)
        closed = closed_within(c, PROMPT)
        assert closed is not None, f"still reading {PROMPT} s after the 413 ({sender.sent} bytes sent)"
        sender.join(PROMPT)
        assert sender.error is not None, "the client could send its whole endless body"
    finally:
        c.close()


# ---------------------------------------------------------------------------
# 9. x-target-host base paths
# ---------------------------------------------------------------------------


def header_routed(proxy, base_url: str, path: str) -> bytes:
    return build_request("GET", path, [("Host", f"{LOOPBACK}:{proxy.port}"), ("x-target-host", base_url)])


@pytest.mark.parametrize("base", ["/base%20ok", "/a-b_c.d~e!$&'()*+,;=:@/f"])
def test_x_target_host_base_path_of_path_characters_is_used(proxy, recorder, base):
    """Item 9, control: RFC 3986 path characters and percent-escapes pass as they are."""
    mark = recorder.mark()
    resp = exchange(proxy, header_routed(proxy, recorder.url + base, "/leaf?q=1"))
    assert resp.status == 200, (resp.status, resp.body[:200])
    assert [r["target"] for r in recorder.wait_requests(mark, 1)] == [base + "/leaf?q=1"]


@pytest.mark.parametrize(
    "base",
    [
        pytest.param("/ba se", id="space"),
        pytest.param("/ba\tse", id="tab"),
        pytest.param("/ba\x01se", id="control"),
        pytest.param("/b\x80", id="byte-0x80"),
        pytest.param("/caf\xc3\xa9", id="utf-8"),
        pytest.param("/b%zz", id="bad-percent-escape"),
    ],
)
def test_x_target_host_base_path_with_bad_characters_is_400(proxy, recorder, base):
    """Item 9: refused by the proxy; nothing reaches the origin."""
    watch = LogWatch(proxy)
    mark = recorder.mark()
    path = f"/bad-base-{tag()}"
    resp = exchange(proxy, header_routed(proxy, recorder.url + base, path))
    assert_short_text_error(resp, 400)
    watch.wait(r"400 .*from 127\.0\.0\.1")
    time.sleep(0.2)
    assert recorder.requests_since(mark) == []
    assert path.encode() not in recorder.all_raw()


# ---------------------------------------------------------------------------
# 10. X-Forwarded-For appends the socket peer
# ---------------------------------------------------------------------------


def test_x_forwarded_for_from_trusted_proxy_appends_the_socket_peer(trusting, recorder):
    """Item 10: the hop appended is the peer we talk to, not the client derived from the chain."""
    mark = recorder.mark()
    resp = exchange(trusting, absolute("GET", recorder, "/xff", [("X-Forwarded-For", "10.9.9.9")]))
    assert resp.status == 200
    [seen] = recorder.wait_requests(mark, 1)
    assert ", ".join(header_values(seen, "x-forwarded-for")) == "10.9.9.9, 127.0.0.1"


# ---------------------------------------------------------------------------
# 11. Max-Forwards
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["absolute", "header"])
@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_zero_is_answered_by_the_proxy(proxy, recorder, method, form):
    """Item 11: OPTIONS and TRACE with Max-Forwards: 0 are answered here and not forwarded."""
    mark = recorder.mark()
    resp = exchange(proxy, Route(form, proxy, recorder).request(method, "/max-forwards-0", [("Max-Forwards", "0")]),
                    method)
    assert resp.status == 200, (resp.status, resp.body[:200])
    time.sleep(0.2)
    assert recorder.requests_since(mark) == []


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_is_decremented(proxy, recorder, method):
    """Item 11."""
    mark = recorder.mark()
    resp = exchange(proxy, absolute(method, recorder, "/max-forwards-5", [("Max-Forwards", "5")]), method)
    assert resp.status == 200
    [seen] = recorder.wait_requests(mark, 1)
    assert header_values(seen, "max-forwards") == ["4"]


@pytest.mark.parametrize("method,value", [("GET", "0"), ("POST", "5")])
def test_max_forwards_of_other_methods_is_untouched(proxy, recorder, method, value):
    """Item 11: only OPTIONS and TRACE are concerned."""
    mark = recorder.mark()
    body = b"x" if method == "POST" else None
    resp = exchange(proxy, absolute(method, recorder, "/max-forwards-other", [("Max-Forwards", value)], body=body))
    assert resp.status == 200
    [seen] = recorder.wait_requests(mark, 1)
    assert header_values(seen, "max-forwards") == [value]


# ---------------------------------------------------------------------------
# 12. No DNS query for a destination refused by name
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["absolute", "header"])
def test_destination_refused_by_name_is_never_resolved(hosts_only, dns_server, form):
    """
    Item 12: egress.default = deny and only a host rule for another name:
    403, and the DNS server never hears of the refused name.
    """
    name = f"unlisted-{tag()}.example"
    dns_server.set(name, ["127.0.0.1"])
    if form == "absolute":
        raw = build_request("GET", f"http://{name}/exfiltrate", [("Host", name)])
    else:
        raw = header_routed(hosts_only, f"http://{name}", "/exfiltrate")
    resp = exchange(hosts_only, raw)
    assert_short_text_error(resp, 403)
    time.sleep(0.3)
    assert dns_server.queries(name) == [], "the refused name was sent to DNS"


def test_destination_allowed_by_name_is_resolved(hosts_only, dns_server):
    """Item 12, control: the listed name is resolved (DNS is asked), so the proxy does use DNS here."""
    dns_server.set(LISTED, ["127.0.0.1"])
    exchange(hosts_only, build_request("GET", f"http://{LISTED}/listed", [("Host", LISTED)]))
    assert dns_server.queries(LISTED) != []


# ---------------------------------------------------------------------------
# 15. Ports for absolute-form and header-routed requests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["absolute", "header"])
@pytest.mark.parametrize("port", [25, 6379])
def test_non_http_port_is_refused_naming_forward_http_ports(proxy, port, form):
    """Item 15: SMTP and Redis ports are not reachable through plain HTTP requests."""
    watch = LogWatch(proxy)
    base = f"http://{LOOPBACK}:{port}"
    if form == "absolute":
        raw = build_request("GET", base + "/cross-protocol", [("Host", f"{LOOPBACK}:{port}")])
    else:
        raw = header_routed(proxy, base, "/cross-protocol")
    resp = exchange(proxy, raw)
    assert_short_text_error(resp, 403)
    watch.wait(r"403 .*cross-protocol.*forward\.http_ports")


def test_port_listed_in_forward_http_ports_is_reachable(launcher, recorder):
    """Item 15: the allow-list is configurable; what is not on it stays refused."""
    p = launcher(forward={"http_ports": [80, 443, recorder.port]})
    mark = recorder.mark()
    assert exchange(p, absolute("GET", recorder, "/listed-port")).status == 200
    assert exchange(p, header_routed(p, recorder.url, "/listed-port-header")).status == 200
    assert [r["target"] for r in recorder.wait_requests(mark, 2)] == ["/listed-port", "/listed-port-header"]
    refused = exchange(p, build_request("GET", f"http://{LOOPBACK}:6379/", [("Host", "x")]))
    assert_short_text_error(refused, 403)


# ---------------------------------------------------------------------------
# 18. Header names keep the client's spelling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["absolute", "header"])
def test_request_header_names_reach_origin_spelled_as_sent(proxy, recorder, form):
    """Item 18: the Java product kept the case; some origins care."""
    fields = [("X-MyData-Custom", "1"), ("x-api-tran-id", "T-123"), ("X-API-TYPE", "user-search"),
              ("authorization", "Bearer abc")]
    mark = recorder.mark()
    resp = exchange(proxy, Route(form, proxy, recorder).request("GET", "/case", fields))
    assert resp.status == 200
    [seen] = recorder.wait_requests(mark, 1)
    sent = [name for name, _ in fields]
    assert [name for name, _ in seen["headers"] if name in sent] == sent, seen["headers"]


# ---------------------------------------------------------------------------
# 19. Via, access lines of early refusals, 413 after the response started
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_via_names_the_request_version(proxy, recorder, version):
    """Item 19: an HTTP/1.0 request is forwarded with C{Via: 1.0 ...}."""
    mark = recorder.mark()
    resp = exchange(proxy, absolute("GET", recorder, "/via", [("Via", "1.1 gateway")], version=version))
    assert resp.status == 200
    [seen] = recorder.wait_requests(mark, 1)
    via = ", ".join(header_values(seen, "via"))
    assert re.fullmatch(rf"1\.1 gateway, {re.escape(version[5:])} mydataproxy\S*", via), via


@pytest.mark.parametrize(
    "raw,status",
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed-request-line"),
        pytest.param(b"GET http://x/ HTTP/1.1 more\r\n\r\n", 400, id="four-parts"),
        pytest.param(b"GET http://x/ HTTP/2.0\r\n\r\n", 400, id="bad-version"),
        pytest.param(b"GET http://x/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, id="uri-too-long"),
    ],
)
def test_request_line_refusal_has_an_access_line(proxy, raw, status):
    """Item 19."""
    since = len(proxy.access_lines())
    with RawConnection(proxy.port, timeout=PROMPT) as c:
        port = c.local_port
        c.send(raw)
        assert c.read_response().status == status
    lines = access_lines(proxy, port, since)
    assert [line["status"] for line in lines] == [str(status)], lines


def test_connection_limit_503_has_an_access_line(one_connection, recorder):
    """Item 19."""
    since = len(one_connection.access_lines())
    # The start-up probe (wait_for_port) holds the one slot until the proxy
    # has seen it close: until then the held connection is refused too.
    deadline = time.monotonic() + 2.0
    while True:
        held = RawConnection(one_connection.port, timeout=PROMPT)
        held.send(absolute("GET", recorder, "/held"))
        status = held.read_response().status
        if status == 200 or time.monotonic() > deadline:
            break
        held.close()
        time.sleep(0.05)
    with held:
        assert status == 200
        with RawConnection(one_connection.port, timeout=PROMPT) as refused:
            port = refused.local_port
            assert refused.read_response().status == 503
    lines = access_lines(one_connection, port, since)
    assert [line["status"] for line in lines] == ["503"], lines


@pytest.mark.parametrize("listener", ["tcp", "tls"])
def test_413_after_the_response_started_is_not_called_malformed_chunked(request, recorder, tls_files, listener):
    """
    Item 19: a chunked upload outgrows the limit while the origin is already
    streaming its response: the log says 413 (body too large), never "400
    malformed chunked", and neither does the access line.  (On a TLS
    listener, cutting the connection marks it as disconnecting, which is what
    today's code mistakes for a chunked-decoding failure.)
    """
    limited = request.getfixturevalue("limited" if listener == "tcp" else "tls_limited")
    since = len(limited.access_lines())
    watch = LogWatch(limited)
    c = RawConnection(limited.port, timeout=PROMPT)
    try:
        port = c.local_port
        if listener == "tls":
            context = ssl.create_default_context(cafile=str(tls_files.ca_pem))
            c.sock = context.wrap_socket(c.sock, server_hostname=LOOPBACK)
        c.send(absolute("POST", recorder, "/stream-early", [("Transfer-Encoding", "chunked")]))
        assert c.read_head().status == 200  # the origin answers at once and keeps streaming
        frame = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        try:
            c.send(frame * (BODY_LIMIT // len(BLOCK) + 2) + b"0\r\n\r\n")
        except OSError:
            pass  # the proxy may cut the connection while we send
        closed_within(c, PROMPT)
    finally:
        c.close()
    watch.wait(r"413 POST \S*/stream-early from 127\.0\.0\.1: request body too large")
    time.sleep(0.3)
    assert "malformed chunked" not in watch.new(), watch.new()
    lines = access_lines(limited, port, since)
    assert len(lines) == 1 and lines[0]["status"] != "400", lines


# ---------------------------------------------------------------------------
# Guards for the channel rewrite
# ---------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(proxy, recorder):
    mark = recorder.mark()
    raw = (
        absolute("GET", recorder, "/delay/200/first")
        + absolute("POST", recorder, "/second", body=b"0123456789")
        + absolute("POST", recorder, "/third", chunks=[b"abc", b"de"])
        + absolute("GET", recorder, "/fourth")
    )
    with RawConnection(proxy.port, timeout=PROMPT) as c:
        c.send(raw)
        answers = [c.read_response().json() for _ in range(4)]
    assert answers == [
        {"target": "/delay/200/first", "body_length": 0},
        {"target": "/second", "body_length": 10},
        {"target": "/third", "body_length": 5},
        {"target": "/fourth", "body_length": 0},
    ]
    assert [r["target"] for r in recorder.wait_requests(mark, 4)] == [a["target"] for a in answers]


def test_expect_100_continue_is_answered(proxy, recorder):
    with RawConnection(proxy.port, timeout=PROMPT) as c:
        c.send(b"POST %s/expect HTTP/1.1\r\nHost: %s\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
               % (recorder.url.encode(), recorder.authority.encode()))
        interim = c.read_head()
        assert interim.status == 100
        c.send(b"hello")
        resp = c.read_response()
    assert resp.status == 200 and resp.json() == {"target": "/expect", "body_length": 5}


def test_head_arriving_one_byte_at_a_time(proxy, recorder):
    raw = absolute("POST", recorder, "/bytewise", [("X-MyData-Slow", "yes")], body=b"body")
    with RawConnection(proxy.port, timeout=PROMPT) as c:
        for i in range(len(raw)):
            c.send(raw[i:i + 1])
            time.sleep(0.002)
        resp = c.read_response()
    assert resp.status == 200 and resp.json() == {"target": "/bytewise", "body_length": 4}
