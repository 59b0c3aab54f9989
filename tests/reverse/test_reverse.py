"""
Integration tests of the reverse listener, part A: real clients (curl,
requests, raw sockets) -> a real C{twistd mydataproxy} with a C{[reverse]}
listener -> backends on loopback (L{backend.Backend} in this process, the
C{tests/origin.py} subprocess for large bodies and hop-by-hop answers).

Most tests share one proxy (C{rp}) whose routes cover every case; the tests
that need another C{[reverse]} config (a trusted front) start their own with
C{reverse_factory}.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid

import pytest
import requests

from backend import Backend
from conftest import (
    LOOPBACK,
    LogWatch,
    ProxyLauncher,
    RawConnection,
    Response,
    RSSSampler,
    assert_short_text_error,
    build_request,
    get_free_port,
    peak_growth_kib,
)
from origin import iterPattern, patternBytes, patternSha256

KiB = 1024
MiB = 1024 * KiB
BIG = 100 * MiB
RSS_BUDGET_KIB = 16 * 1024
PUBLIC = "public.example"


def tag() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------------------
# Fixtures: two in-process backends, the session origin, one shared proxy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a():
    backend = Backend("a")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def b():
    backend = Backend("b")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def rp(tmp_path_factory, ca_pem, session_connect_ports, dns_server, origin, closed_port, a, b):
    """
    The proxy most tests share, one route per case (see the prefixes): the
    same config as C{reverse_factory} builds, but started once per module.
    """
    routes = [
        {"prefix": "/api/", "backends": [a.url + "/base/"], "name": "api"},
        {"prefix": "/api/v2", "backends": [b.url + "/v2base"], "name": "api-v2"},
        {"prefix": "/vh/", "hosts": ["one.example"], "backends": [a.url + "/one/"], "name": "vh-one"},
        {"prefix": "/vh/", "hosts": ["two.example", "*.two.example"], "backends": [b.url + "/two/"],
         "name": "vh-two"},
        {"prefix": "/mix/", "hosts": ["one.example"], "backends": [a.url + "/mixone/"], "name": "mix-one"},
        {"prefix": "/mix/", "backends": [b.url + "/mixany/"], "name": "mix-any"},
        {"prefix": "/pres/", "backends": [a.url + "/pres/"], "preserve_host": True, "name": "pres"},
        {"prefix": "/small/", "backends": [a.url + "/small/"], "max_body_bytes": 1024, "name": "small"},
        {"prefix": "/cookie/", "backends": [a.url + "/cbase/"], "cookie_domain": PUBLIC,
         "name": "cookie"},
        {"prefix": "/o/", "backends": [origin.url + "/"], "name": "origin"},
        {"prefix": "/down/", "backends": [f"http://{LOOPBACK}:{closed_port}/"], "name": "down-route"},
        {"prefix": "/slow/", "backends": [origin.url + "/"], "read_timeout": 1.0, "name": "slow-route"},
    ]
    launcher = ProxyLauncher(tmp_path_factory.mktemp("reverse"), ca_pem, session_connect_ports,
                             dns_server)
    proxy = launcher(reverse={"listen": f"tcp:{get_free_port()}:interface={LOOPBACK}", "routes": routes})
    yield proxy
    assert not launcher.stop_all()


@pytest.fixture
def alive(rp):
    """The shared proxy, checked to be still running after the test."""
    yield rp
    assert rp.alive(), f"the proxy died during this test; output:\n{rp.output()[-4000:]}"


def exchange(proxy, method: str, target: str, headers=(), body: bytes | None = None,
             host: str | None = PUBLIC, chunks=None, timeout: float = 10.0) -> Response:
    """One request on a fresh connection to the reverse listener (Host first unless None)."""
    head = ([("Host", host)] if host is not None else []) + list(headers)
    with RawConnection(proxy.reverse_port, timeout=timeout) as c:
        c.send(build_request(method, target, head, body, chunks))
        return c.read_response(method)


def through(proxy, backend: Backend, target: str, headers=(), method: str = "GET",
            body: bytes | None = None, host: str | None = PUBLIC):
    """Send one request, expect it answered 200 by C{backend}: (response, what the backend saw)."""
    mark = backend.mark()
    resp = exchange(proxy, method, target, headers, body, host)
    assert resp.status == 200, (target, resp.status, resp.body[:300])
    seen = backend.wait(mark, 1)
    assert len(seen) == 1, f"{target}: expected one request at backend {backend.name}, got {seen}"
    return resp, seen[0]


def echo_values(echoed: dict, name: str) -> list[str]:
    return [v for n, v in echoed["headers"] if n.lower() == name.lower()]


def forwarded_elements(values: list[str]) -> list[dict]:
    """RFC 7239 C{Forwarded} values as a list of {param: value} (quotes removed)."""
    elements = []
    for value in values:
        for element in value.split(","):
            params = {}
            for pair in element.split(";"):
                key, _, val = pair.strip().partition("=")
                params[key.lower()] = val.strip('"')
            elements.append(params)
    return elements


def assert_nothing_reached(a: Backend, b: Backend, origin, marks: tuple[int, int, int], proxy) -> None:
    """Since C{marks} nothing reached C{a}, C{b} or C{origin}, checked behind a sentinel request."""
    sentinel = f"/api/sentinel/{tag()}"
    through(proxy, a, sentinel)
    assert [s.target for s in a.since(marks[0])] == ["/base" + sentinel[len("/api"):]], \
        f"backend a received {[s.target for s in a.since(marks[0])]}"
    assert b.since(marks[1]) == [], f"backend b received {[s.target for s in b.since(marks[1])]}"
    assert origin.stats()["requests"] == marks[2], "the origin received a request"


# ---------------------------------------------------------------------------
# Byte-exact bodies, both ways
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 64 * KiB], ids=lambda n: f"{n}B")
def test_download_byte_exact_with_requests(alive, size):
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"{alive.reverse_url}/o/bytes/{size}", stream=True, timeout=30)
    assert r.status_code == 200
    h = hashlib.sha256()
    n = 0
    for piece in r.iter_content(64 * KiB):
        h.update(piece)
        n += len(piece)
    assert (n, h.hexdigest()) == (size, patternSha256(size))
    assert r.headers.get("content-length") == str(size)


@pytest.mark.parametrize("size", [0, 64 * KiB], ids=lambda n: f"{n}B")
def test_download_chunked_byte_exact(alive, size):
    resp = exchange(alive, "GET", f"/o/chunked/{size}")
    assert resp.status == 200
    assert resp.body == patternBytes(size)


@pytest.mark.parametrize("size", [0, 64 * KiB], ids=lambda n: f"{n}B")
def test_download_byte_exact_with_curl(alive, curl, tmp_path, size):
    out = tmp_path / "down"
    done = subprocess.run([curl, "-sS", "--max-time", "20", "-o", str(out), "-w", "%{http_code}",
                           f"{alive.reverse_url}/o/bytes/{size}"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"200"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == patternSha256(size)


@pytest.mark.parametrize("size", [0, 64 * KiB], ids=lambda n: f"{n}B")
def test_upload_byte_exact_with_requests(alive, size):
    s = requests.Session()
    s.trust_env = False
    r = s.put(f"{alive.reverse_url}/o/sha256", data=patternBytes(size), timeout=30)
    assert r.status_code == 200
    assert r.json() == {"sha256": patternSha256(size), "length": size}
    chunked = s.post(f"{alive.reverse_url}/o/sha256", data=iterPattern(size), timeout=30)
    assert chunked.status_code == 200
    assert chunked.json() == {"sha256": patternSha256(size), "length": size}


@pytest.mark.parametrize("size", [0, 64 * KiB], ids=lambda n: f"{n}B")
def test_upload_byte_exact_with_curl(alive, curl, tmp_path, size):
    payload = tmp_path / "up"
    payload.write_bytes(patternBytes(size))
    done = subprocess.run([curl, "-sS", "--max-time", "20", "-T", str(payload),
                           f"{alive.reverse_url}/o/sha256"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sha256": patternSha256(size), "length": size}


def _warm_up(proxy) -> None:
    for _ in range(2):
        assert exchange(proxy, "GET", "/o/bytes/10485760").status == 200
        assert exchange(proxy, "PUT", "/o/count", body=patternBytes(10 * MiB)).status == 200


def _hash_exact(c: RawConnection, n: int) -> str:
    """Read exactly C{n} body bytes from C{c}, hashing them as they come (nothing kept)."""
    h = hashlib.sha256()
    take = min(n, len(c.buf))
    h.update(c.buf[:take])
    del c.buf[:take]
    n -= take
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    while n:
        got = c.sock.recv_into(view, min(n, len(chunk)))
        assert got, f"connection closed with {n} body bytes still expected"
        h.update(view[:got])
        n -= got
    return h.hexdigest()


def test_download_100mib_byte_exact_with_flat_rss(alive):
    _warm_up(alive)
    time.sleep(0.3)
    baseline, hwm_before = alive.rss_kib(), alive.hwm_kib()
    started = time.monotonic()
    with RSSSampler(alive.pid) as sampler:
        with RawConnection(alive.reverse_port, timeout=30) as c:
            c.send(build_request("GET", f"/o/bytes/{BIG}", [("Host", PUBLIC)]))
            head = c.read_head()
            assert head.status == 200
            assert head.get("content-length") == str(BIG)
            digest = _hash_exact(c, BIG)
    elapsed = time.monotonic() - started
    growth = peak_growth_kib(alive, baseline, hwm_before, sampler)
    print(f"100 MiB download {elapsed:.2f}s, RSS peak growth {growth} KiB")
    assert digest == patternSha256(BIG)
    assert growth <= RSS_BUDGET_KIB, (
        f"proxy RSS grew by {growth / 1024:.1f} MiB during a 100 MiB download: the body is buffered")


def test_upload_100mib_byte_exact_with_flat_rss(alive):
    _warm_up(alive)
    time.sleep(0.3)
    baseline, hwm_before = alive.rss_kib(), alive.hwm_kib()
    started = time.monotonic()
    with RSSSampler(alive.pid) as sampler:
        with RawConnection(alive.reverse_port, timeout=30) as c:
            c.send(build_request("PUT", "/o/sha256", [("Host", PUBLIC), ("Content-Length", str(BIG))]))
            for piece in iterPattern(BIG):
                c.sock.sendall(piece)
            resp = c.read_response()
    elapsed = time.monotonic() - started
    growth = peak_growth_kib(alive, baseline, hwm_before, sampler)
    print(f"100 MiB upload {elapsed:.2f}s, RSS peak growth {growth} KiB")
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {"sha256": patternSha256(BIG), "length": BIG}
    assert growth <= RSS_BUDGET_KIB, (
        f"proxy RSS grew by {growth / 1024:.1f} MiB during a 100 MiB upload: the body is buffered")


# ---------------------------------------------------------------------------
# Keep-alive to backends, pipelining
# ---------------------------------------------------------------------------


def test_keepalive_one_client_connection_few_backend_connections(alive, a):
    mark = a.mark()
    s = requests.Session()
    s.trust_env = False
    for i in range(30):
        r = s.get(f"{alive.reverse_url}/api/ka/{i}", timeout=10)
        assert r.status_code == 200 and r.json()["target"] == f"/base/ka/{i}"
    seen = a.wait(mark, 30)
    assert len(seen) == 30
    used = {s.connection for s in seen}
    assert len(used) <= 2, f"30 sequential requests used {len(used)} backend connections"


def test_keepalive_reused_across_client_connections(alive, a):
    mark = a.mark()
    for i in range(20):
        resp = exchange(alive, "GET", f"/api/ka-fresh/{i}", [("Connection", "close")])
        assert resp.status == 200 and resp.json()["target"] == f"/base/ka-fresh/{i}"
    seen = a.wait(mark, 20)
    assert len(seen) == 20
    used = {s.connection for s in seen}
    assert len(used) <= 2, (
        f"20 requests on 20 client connections (each with Connection: close) used {len(used)} "
        "backend connections: the client's Connection header must not close the pooled one")


def test_pipelined_requests_answered_in_order(alive):
    host = [("Host", PUBLIC)]
    batch = [
        ("GET", build_request("GET", "/api/pipe/0", host)),
        ("POST", build_request("POST", "/api/pipe/1", host, body=b"x" * 1000)),
        ("GET", build_request("GET", "/api/v2/pipe/2", host)),
        ("HEAD", build_request("HEAD", "/api/pipe/3", host)),
        ("GET", build_request("GET", "/o/bytes/70000", host)),
        ("GET", build_request("GET", "/api/pipe/5?last", host)),
    ]
    with RawConnection(alive.reverse_port) as c:
        c.send(b"".join(raw for _, raw in batch))
        answers = [c.read_response(method) for method, _ in batch]
    assert [r.status for r in answers] == [200] * 6, [(r.status, r.body[:100]) for r in answers]
    first, post, v2, head, data, last = answers
    assert (first.json()["backend"], first.json()["target"]) == ("a", "/base/pipe/0")
    assert (post.json()["target"], post.json()["body_length"]) == ("/base/pipe/1", 1000)
    assert (v2.json()["backend"], v2.json()["target"]) == ("b", "/v2base/pipe/2")
    assert head.body == b""
    assert data.body == patternBytes(70000)
    assert last.json()["target"] == "/base/pipe/5?last"


# ---------------------------------------------------------------------------
# ProxyPass mapping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("public, private", [
    ("/api/a%2Fb;x=1?q=%20&r", "/base/a%2Fb;x=1?q=%20&r"),
    ("/api/x?q=1", "/base/x?q=1"),
    ("/api/", "/base/"),
    ("/api/?", "/base/?"),
    ("/api/%7E/+/%41%2f?a=%2F&b=c+d&&=;", "/base/%7E/+/%41%2f?a=%2F&b=c+d&&=;"),
    ("/api/go?next=http://e.example/a/../b//c", "/base/go?next=http://e.example/a/../b//c"),
    ("/api/v1/x", "/base/v1/x"),
])
def test_prefix_replaced_raw_path_and_query_byte_exact(alive, a, public, private):
    resp, seen = through(alive, a, public)
    assert seen.target == private
    assert resp.json()["target"] == private


def test_prefix_replaced_with_curl(alive, a, curl):
    mark = a.mark()
    done = subprocess.run([curl, "-sS", "--max-time", "10", "--path-as-is",
                           f"{alive.reverse_url}/api/a%2Fb;x=1?q=%20&r"], capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["target"] == "/base/a%2Fb;x=1?q=%20&r"
    assert [s.target for s in a.wait(mark, 1)] == ["/base/a%2Fb;x=1?q=%20&r"]


@pytest.mark.parametrize("public, backend, private", [
    ("/api/v2/x", "b", "/v2base/x"),
    ("/api/v2", "b", "/v2base"),
    ("/api/v2?q=1", "b", "/v2base?q=1"),
    ("/api/v2x", "a", "/base/v2x"),
    ("/api/v1/v2/x", "a", "/base/v1/v2/x"),
])
def test_longest_prefix_wins_at_segment_boundary(alive, a, b, public, backend, private):
    resp, seen = through(alive, {"a": a, "b": b}[backend], public)
    assert seen.target == private


@pytest.mark.parametrize("host, backend, private", [
    ("one.example", "a", "/one/x?y"),
    ("one.example:8080", "a", "/one/x?y"),
    ("ONE.Example", "a", "/one/x?y"),
    ("two.example", "b", "/two/x?y"),
    ("sub.two.example", "b", "/two/x?y"),
])
def test_virtual_hosts_same_path_different_backend(alive, a, b, host, backend, private):
    resp, seen = through(alive, {"a": a, "b": b}[backend], "/vh/x?y", host=host)
    assert seen.target == private


def test_host_route_beats_hostless_route(alive, a, b):
    _, seen = through(alive, a, "/mix/x", host="one.example")
    assert seen.target == "/mixone/x"
    _, seen = through(alive, b, "/mix/x", host="other.example")
    assert seen.target == "/mixany/x"


@pytest.mark.parametrize("target", ["/", "/nothing/here", "/apix/y", "/API/x"])
def test_unmatched_path_is_404_with_reason(alive, a, b, origin, target):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, "GET", target)
    assert_short_text_error(resp, 404)
    assert b"no route" in resp.body.lower(), resp.body
    assert_nothing_reached(a, b, origin, marks, alive)


@pytest.mark.parametrize("host", ["three.example", "eviltwo.example", "two.example.evil.test",
                                  "one.example.test"])
def test_unknown_host_is_404(alive, a, b, origin, host):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, "GET", "/vh/x", host=host)
    assert_short_text_error(resp, 404)
    assert b"no route" in resp.body.lower(), resp.body
    assert_nothing_reached(a, b, origin, marks, alive)


# ---------------------------------------------------------------------------
# Request headers
# ---------------------------------------------------------------------------


def test_host_is_the_backend_authority(alive, a):
    _, seen = through(alive, a, "/api/host", host="public.example:8443")
    assert seen.values("host") == [a.authority]


def test_preserve_host_keeps_the_client_host(alive, a):
    _, seen = through(alive, a, "/pres/host", host="public.example:8443")
    assert seen.target == "/pres/host"
    assert seen.values("host") == ["public.example:8443"]


def test_forwarding_headers_set(alive, a):
    _, seen = through(alive, a, "/api/fwd")
    assert seen.values("x-forwarded-for") == [LOOPBACK]
    assert seen.values("x-forwarded-host") == [PUBLIC]
    assert seen.values("x-forwarded-proto") == ["http"]
    assert seen.values("x-forwarded-port") == [str(alive.reverse_port)]
    elements = forwarded_elements(seen.values("forwarded"))
    assert len(elements) == 1, seen.values("forwarded")
    assert {k: elements[0].get(k) for k in ("for", "host", "proto")} == \
        {"for": LOOPBACK, "host": PUBLIC, "proto": "http"}, seen.values("forwarded")


def test_spoofed_forwarding_headers_from_untrusted_peer_replaced(alive, a):
    _, seen = through(alive, a, "/api/spoof", [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"),
        ("Forwarded", "for=203.0.113.9;host=evil.example;proto=https"),
    ])
    assert seen.values("x-forwarded-for") == [LOOPBACK], "a spoofed X-Forwarded-For was believed"
    assert seen.values("x-forwarded-host") == [PUBLIC]
    assert seen.values("x-forwarded-proto") == ["http"]
    assert seen.values("x-forwarded-port") == [str(alive.reverse_port)]
    forwarded = ", ".join(seen.values("forwarded"))
    assert "203.0.113.9" not in forwarded and "evil.example" not in forwarded, forwarded
    elements = forwarded_elements(seen.values("forwarded"))
    assert len(elements) == 1 and elements[0].get("for") == LOOPBACK, forwarded


def test_forwarding_headers_from_trusted_front_believed(reverse_factory, a):
    proxy = reverse_factory([{"prefix": "/api/", "backends": [a.url + "/base/"], "name": "api"}],
                            reverse={"trusted_proxies": ["127.0.0.0/8"]})
    _, seen = through(proxy, a, "/api/trusted", [
        ("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 127.0.0.5"),
        ("X-Forwarded-Host", PUBLIC),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"),
    ])
    assert seen.values("x-forwarded-for") == ["203.0.113.9"], \
        "the believed client is the rightmost address not in trusted_proxies"
    assert seen.values("x-forwarded-host") == [PUBLIC]
    assert seen.values("x-forwarded-proto") == ["https"]
    assert seen.values("x-forwarded-port") == ["443"]
    elements = forwarded_elements(seen.values("forwarded"))
    assert len(elements) == 1, seen.values("forwarded")
    assert {k: elements[0].get(k) for k in ("for", "host", "proto")} == \
        {"for": "203.0.113.9", "host": PUBLIC, "proto": "https"}, seen.values("forwarded")

    a.answer("/base/trusted-redirect", 302, [("Location", f"{a.url}/base/next?x=1")])
    resp = exchange(proxy, "GET", "/api/trusted-redirect", [
        ("X-Forwarded-Host", PUBLIC), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "443")])
    assert resp.status == 302
    assert resp.get("location") in (f"https://{PUBLIC}/api/next?x=1", f"https://{PUBLIC}:443/api/next?x=1"), \
        "behind a trusted TLS front the public URL is https://<its host>"


def test_trusted_front_value_is_the_one_it_appended(reverse_factory, a):
    """
    Apache appends its X-Forwarded-Host to the one a client sent: the value
    the trusted front wrote is the last one, and only it may steer rewrites.
    """
    proxy = reverse_factory([{"prefix": "/api/", "backends": [a.url + "/base/"], "name": "api"}],
                            reverse={"trusted_proxies": ["127.0.0.0/8"]})
    a.answer("/base/appended", 302, [("Location", f"{a.url}/base/next")])
    resp = exchange(proxy, "GET", "/api/appended", [
        ("X-Forwarded-Host", f"evil.example, {PUBLIC}"),
        ("X-Forwarded-Proto", "http, https"),
    ])
    assert resp.status == 302
    assert resp.get("location") == f"https://{PUBLIC}/api/next", resp.get("location")
    seen = a.requests[-1]
    assert seen.values("x-forwarded-host") == [PUBLIC]


def test_request_hop_by_hop_headers_removed(alive):
    resp = exchange(alive, "GET", "/o/echo?hop", [
        ("Connection", "keep-alive, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("TE", "trailers"),
        ("Trailer", "X-Trail"),
        ("Upgrade", "foo/2"),
        ("X-Keep", "yes"),
    ])
    assert resp.status == 200
    echoed = resp.json()
    got = [n.lower() for n, _ in echoed["headers"]]
    for name in ["x-drop-me", "keep-alive", "proxy-connection", "proxy-authorization", "te",
                 "trailer", "upgrade"]:
        assert name not in got, f"{name} was forwarded to the backend: {echoed['headers']}"
    assert all("x-drop-me" not in v.lower() for v in echo_values(echoed, "connection"))
    assert echo_values(echoed, "x-keep") == ["yes"]


def test_response_hop_by_hop_headers_removed(alive):
    with RawConnection(alive.reverse_port) as c:
        c.send(build_request("GET", "/o/hop", [("Host", PUBLIC)]))
        resp = c.read_response()
        assert resp.status == 200 and resp.body == b"hop\n"
        got = [n.lower() for n, _ in resp.headers]
        for name in ["x-custom", "keep-alive", "proxy-connection", "trailer", "upgrade"]:
            assert name not in got, f"{name} reached the client: {resp.headers}"
        assert "x-custom" not in (resp.get("connection") or "").lower()
        assert resp.values("x-end-to-end") == ["yes"]
        c.send(build_request("GET", "/o/echo?after-hop", [("Host", PUBLIC)]))
        assert c.read_response().json()["uri"] == "/echo?after-hop"


def test_via_appended(alive, a):
    _, seen = through(alive, a, "/api/via", [("Via", "1.1 front")])
    hops = [h.strip() for h in ", ".join(seen.values("via")).split(",")]
    assert hops[0] == "1.1 front" and len(hops) == 2, hops
    assert "mydataproxy" in hops[1].lower(), hops


# ---------------------------------------------------------------------------
# Response rewrites (ProxyPassReverse, ProxyPassReverseCookiePath/Domain)
# ---------------------------------------------------------------------------


def rewritten(proxy, backend: Backend, public: str, private: str, headers, status: int = 200) -> Response:
    """Have C{backend} answer C{private} with C{headers}; fetch C{public}."""
    backend.answer(private, status, headers)
    resp = exchange(proxy, "GET", public)
    assert resp.status == status, (resp.status, resp.body[:300])
    return resp


def test_location_absolute_to_backend_rewritten(alive, a):
    resp = rewritten(alive, a, "/api/rw/abs", "/base/rw/abs",
                     [("Location", f"{a.url}/base/next/page?x=1&y=%2F")], 302)
    assert resp.get("location") == f"http://{PUBLIC}/api/next/page?x=1&y=%2F"


def test_location_absolute_path_under_base_rewritten(alive, a):
    resp = rewritten(alive, a, "/api/rw/path", "/base/rw/path", [("Location", "/base/next?x=1")], 303)
    assert resp.get("location") in ("/api/next?x=1", f"http://{PUBLIC}/api/next?x=1")


def test_content_location_rewritten(alive, a):
    resp = rewritten(alive, a, "/api/rw/cl", "/base/rw/cl", [("Content-Location", f"{a.url}/base/doc/1")])
    assert resp.get("content-location") == f"http://{PUBLIC}/api/doc/1"


def test_uri_header_rewritten(alive, a):
    resp = rewritten(alive, a, "/api/rw/uri", "/base/rw/uri", [("URI", f"{a.url}/base/u/2")])
    assert resp.get("uri") == f"http://{PUBLIC}/api/u/2"


@pytest.mark.parametrize("location", [
    "http://elsewhere.example/base/x",
    "https://elsewhere.example:8443/base/x?y=1",
    "/other/x",
    "relative/x",
])
def test_location_pointing_elsewhere_untouched(alive, a, location):
    resp = rewritten(alive, a, "/api/rw/elsewhere", "/base/rw/elsewhere", [("Location", location)], 302)
    assert resp.get("location") == location


def cookie(value: str) -> tuple[str, dict]:
    """A Set-Cookie value as (name=value, {attribute (lower-cased): value})."""
    first, *attributes = [p.strip() for p in value.split(";")]
    parsed = {}
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        parsed[key.lower()] = val
    return first, parsed


def test_set_cookie_path_and_domain_rewritten_domain_dropped(alive, a):
    resp = rewritten(alive, a, "/api/rw/cookie", "/base/rw/cookie", [
        ("Set-Cookie", f"sid=abc; Path=/base/app; Domain={LOOPBACK}; HttpOnly"),
        ("Set-Cookie", "root=1; Path=/"),
        ("Set-Cookie", "other=2; Domain=other.example; Path=/base/"),
        ("Set-Cookie", "plain=3"),
    ])
    cookies = [cookie(v) for v in resp.values("set-cookie")]
    assert cookies == [
        ("sid=abc", {"path": "/api/app", "httponly": ""}),
        ("root=1", {"path": "/"}),
        ("other=2", {"domain": "other.example", "path": "/api/"}),
        ("plain=3", {}),
    ], resp.values("set-cookie")


def test_set_cookie_domain_rewritten_to_cookie_domain(alive, a):
    resp = rewritten(alive, a, "/cookie/rw", "/cbase/rw", [
        ("Set-Cookie", f"sid=1; Domain={LOOPBACK}; Path=/cbase/; Secure"),
        ("Set-Cookie", "keep=2; Domain=other.example"),
    ])
    cookies = [cookie(v) for v in resp.values("set-cookie")]
    assert cookies == [
        ("sid=1", {"domain": PUBLIC, "path": "/cookie/", "secure": ""}),
        ("keep=2", {"domain": "other.example"}),
    ], resp.values("set-cookie")


def test_spoofed_forwarded_host_does_not_steer_rewrites(alive, a):
    a.answer("/base/rw/spoof", 302, [("Location", f"{a.url}/base/next")])
    resp = exchange(alive, "GET", "/api/rw/spoof",
                    [("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https")])
    assert resp.status == 302
    assert resp.get("location") == f"http://{PUBLIC}/api/next"


# ---------------------------------------------------------------------------
# Bad input: refused, nothing forwarded
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "/api/%2e%2e/o/echo",
    "/api/%2E%2E/x",
    "/api/.%2e/x",
    "/api/%2e./x",
    "/api/..%2fapi/v2/x",
    "/api/..%2Fx",
    "/api/x/%2e%2e",
    "/api/x/%2e%2e?y",
    "/api/../o/echo",
    "/api/x/..",
    "/api/./x",
    "/api/%2e/x",
    "/api/a//b",
    "/api//b",
    "//api/x",
    "/api/a%00b",
    "/api/%00",
])
def test_bad_path_refused_400_nothing_forwarded(alive, a, b, origin, target):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, "GET", target)
    assert_short_text_error(resp, 400)
    assert_nothing_reached(a, b, origin, marks, alive)


def test_overlong_uri_is_414_nothing_forwarded(alive, a, b, origin):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, "GET", "/api/" + "a" * 9000)
    assert_short_text_error(resp, 414)
    assert_nothing_reached(a, b, origin, marks, alive)


@pytest.mark.parametrize("method, target", [
    ("GET", "http://public.example/api/x"),
    ("GET", "http://{a}/base/x"),
    ("CONNECT", "{a}"),
    ("OPTIONS", "*"),
    ("GET", "api/x"),
])
def test_non_origin_form_refused_4xx_nothing_forwarded(alive, a, b, origin, method, target):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, method, target.format(a=a.authority))
    assert 400 <= resp.status < 500, (resp.status, resp.body[:300])
    assert_short_text_error(resp, resp.status)
    assert_nothing_reached(a, b, origin, marks, alive)


def test_missing_host_is_400_nothing_forwarded(alive, a, b, origin):
    marks = (a.mark(), b.mark(), origin.stats()["requests"])
    resp = exchange(alive, "GET", "/api/no-host", host=None)
    assert_short_text_error(resp, 400)
    assert_nothing_reached(a, b, origin, marks, alive)


# ---------------------------------------------------------------------------
# Errors, logs, access lines
# ---------------------------------------------------------------------------


def test_backend_refused_is_502_logged(alive, closed_port):
    t = tag()
    watch = LogWatch(alive)
    resp = exchange(alive, "GET", f"/down/x?t={t}")
    assert_short_text_error(resp, 502)
    backend = re.escape(f"127.0.0.1:{closed_port}")
    watch.wait(rf"down-route.*{backend}|{backend}.*down-route")
    lines = alive.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    assert lines[0].get("status") == "502", lines[0]["_line"]


def test_backend_never_answering_is_504_after_read_timeout(alive, origin):
    t = tag()
    watch = LogWatch(alive)
    started = time.monotonic()
    resp = exchange(alive, "GET", f"/slow/slow?t={t}", timeout=15)
    elapsed = time.monotonic() - started
    assert_short_text_error(resp, 504)
    assert 0.9 <= elapsed < 5, f"read_timeout = 1 s, answered after {elapsed:.1f} s"
    backend = re.escape(origin.authority)
    watch.wait(rf"slow-route.*{backend}|{backend}.*slow-route")
    lines = alive.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    assert lines[0].get("status") == "504", lines[0]["_line"]


def test_access_line_shows_the_public_url(alive, a):
    t = tag()
    with RawConnection(alive.reverse_port) as c:
        client_port = c.local_port
        c.send(build_request("GET", f"/api/acc/{t}?q=1", [("Host", PUBLIC)]))
        assert c.read_response().status == 200
    lines = alive.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    f = lines[0]
    assert f.get("client") == f"{LOOPBACK}:{client_port}", f["_line"]
    assert f.get("method") == "GET", f["_line"]
    assert f.get("status") == "200", f["_line"]
    assert f.get("target") == f"http://{PUBLIC}/api/acc/{t}?q=1", f["_line"]


# ---------------------------------------------------------------------------
# Body limit per route
# ---------------------------------------------------------------------------


def test_body_limit_per_route(alive, a):
    _, seen = through(alive, a, "/small/ok", method="POST", body=b"x" * 1024)
    assert len(seen.body) == 1024
    _, seen = through(alive, a, "/api/big", method="POST", body=b"x" * 4096)
    assert len(seen.body) == 4096, "max_body_bytes of one route must not limit another"

    mark = a.mark()
    resp = exchange(alive, "POST", "/small/over", body=b"x" * 1025)
    assert_short_text_error(resp, 413)
    resp = exchange(alive, "POST", "/small/over-chunked", chunks=[b"x" * 1000, b"y" * 1000])
    assert_short_text_error(resp, 413)
    through(alive, a, "/api/after-413")
    assert "/small/over" not in [s.target for s in a.since(mark)], \
        "a body over the declared limit must be refused before the backend sees the request"
