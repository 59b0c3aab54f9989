"""
Integration tests for forward proxying: absolute-form and header-routed
(C{x-target-host}) requests through a real C{twistd mydataproxy} process to
real origin processes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
import uuid

import pytest
import requests

from conftest import (
    LOOPBACK,
    RSSSampler,
    RawConnection,
    Route,
    assert_proxy_works,
    assert_short_text_error,
    build_request,
    peak_growth_kib,
    send_in_background,
)
from origin import iterPattern, patternBytes, patternSha256

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def tag() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(params=["absolute", "header"])
def route(request, proxy, origin) -> Route:
    return Route(request.param, proxy, origin)


def echo(route: Route, path="/echo", headers=(), method="GET", body=None) -> dict:
    resp = route.exchange(method, path, headers, body)
    assert resp.status == 200, (resp.status, resp.body[:300])
    return resp.json()


def names(echoed: dict) -> list[str]:
    return [n.lower() for n, _ in echoed["headers"]]


def values(echoed: dict, name: str) -> list[str]:
    return [v for n, v in echoed["headers"] if n.lower() == name.lower()]


# ---------------------------------------------------------------------------
# Basic routing
# ---------------------------------------------------------------------------


def test_absolute_form_with_requests(proxy, origin):
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"{origin.url}/path/x?q=1&r=2", proxies={"http": proxy.url}, timeout=10)
    assert r.status_code == 200
    seen = r.json()
    assert seen["method"] == "GET"
    assert seen["uri"] == "/path/x?q=1&r=2", "absolute-form must reach the origin in origin-form"
    assert values(seen, "host") == [origin.authority]
    assert seen["tls"] is False


def test_absolute_form_with_curl(proxy, origin, curl):
    out = subprocess.run(
        [curl, "-sS", "--max-time", "10", "-x", proxy.url, f"{origin.url}/curl/path?q"],
        capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["uri"] == "/curl/path?q"
    assert values(seen, "host") == [origin.authority]


def test_absolute_form_https_target_originates_verified_tls(proxy, tls_origin):
    route = Route("absolute", proxy, tls_origin)
    resp = route.exchange("GET", "/echo?tls=1")
    assert resp.status == 200, resp.body[:300]
    seen = resp.json()
    assert seen["tls"] is True, "the proxy must speak TLS to an https:// target"
    assert seen["uri"] == "/echo?tls=1"
    assert values(seen, "host") == [tls_origin.authority]


def test_absolute_form_https_target_with_untrusted_certificate_is_502(
        proxy, untrusted_tls_origin, origin):
    route = Route("absolute", proxy, untrusted_tls_origin)
    resp = route.exchange("GET", "/echo?untrusted")
    assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_https_target_by_dns_name(proxy, tls_origin):
    """C{https://localhost:PORT}: the certificate is checked against the name."""
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", f"https://localhost:{tls_origin.port}/echo?dns",
                             [("Host", f"localhost:{tls_origin.port}")]))
        resp = c.read_response()
    assert resp.status == 200, resp.body[:300]
    seen = resp.json()
    assert seen["tls"] is True
    assert values(seen, "host") == [f"localhost:{tls_origin.port}"]


@pytest.mark.parametrize("form", ["absolute", "header"])
def test_https_target_certificate_for_another_name_is_502(proxy, wrong_name_tls_origin, origin, form):
    """Trusted CA, but the certificate names C{wrong.example}, not 127.0.0.1."""
    resp = Route(form, proxy, wrong_name_tls_origin).exchange("GET", "/echo?wrong-name")
    assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_https_target_connections_are_reused(proxy, tls_files, tmp_path):
    from conftest import OriginProcess

    o = OriginProcess(tmp_path / "tls-origin", tls=tls_files)
    try:
        route = Route("absolute", proxy, o)
        with route.connect() as c:
            ids = []
            for i in range(20):
                c.send(route.request("GET", f"/echo?i={i}"))
                seen = c.read_response().json()
                assert seen["tls"] is True
                ids.append(seen["connection"])
    finally:
        o.stop()
    assert len(set(ids)) <= 2, f"20 sequential https requests used {len(set(ids))} TLS connections"


def test_absolute_form_ignores_client_host_header(proxy, origin):
    route = Route("absolute", proxy, origin)
    seen = echo(route, "/echo", [("Host", "wrong.example")])
    assert values(seen, "host") == [origin.authority], \
        "Host must be the authority of the absolute-form target (RFC 9112 3.2.2)"


@pytest.mark.parametrize("target, expected", [
    ("", "/"),
    ("?x=1", "/?x=1"),
])
def test_absolute_form_empty_path(proxy, origin, target, expected):
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", origin.url + target, [("Host", origin.authority)]))
        resp = c.read_response()
    assert resp.status == 200
    assert resp.json()["uri"] == expected


def test_absolute_form_raw_path_and_query_preserved(proxy, origin):
    raw = "/a%2Fb/c+d;p=1/%7E?q=a%2Fb+c;d&e=%20&f=%3D"
    route = Route("absolute", proxy, origin)
    assert echo(route, raw)["uri"] == raw


def test_absolute_form_ipv6_literal_target(proxy, tmp_path):
    from conftest import OriginProcess

    try:
        o6 = OriginProcess(tmp_path / "origin6", host="::1")
    except (RuntimeError, OSError) as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        route = Route("absolute", proxy, o6)
        seen = echo(route, "/v6?x")
        assert seen["uri"] == "/v6?x"
        assert values(seen, "host") == [f"[::1]:{o6.port}"]
    finally:
        o6.stop()


# ---------------------------------------------------------------------------
# Header-routed (x-target-host)
# ---------------------------------------------------------------------------


def test_header_routed_basic(proxy, origin):
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"{proxy.url}/v1/x?a=1", headers={"x-target-host": origin.url}, timeout=10)
    assert r.status_code == 200, r.text[:300]
    seen = r.json()
    assert seen["uri"] == "/v1/x?a=1"
    assert values(seen, "host") == [origin.authority], "Host must be set to the target authority"
    assert "x-target-host" not in names(seen)


def test_header_routed_with_curl(proxy, origin, curl):
    out = subprocess.run(
        [curl, "-sS", "--noproxy", "*", "--max-time", "10", "-H", f"x-target-host: {origin.url}",
         f"{proxy.url}/v1/accounts?x=1"],
        capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["uri"] == "/v1/accounts?x=1"


def test_header_routed_base_path(proxy, origin):
    route = Route("header", proxy, origin, base_path="/base")
    assert echo(route, "/v1/x?a=1")["uri"] == "/base/v1/x?a=1"


@pytest.mark.parametrize("base", ["", "/base"])
def test_header_routed_raw_path_and_query_preserved(proxy, origin, base):
    raw = "/a%2Fb/c+d;p=1/%7E?q=a%2Fb+c;d&e=%20&f=%3D&g=+"
    route = Route("header", proxy, origin, base_path=base)
    assert echo(route, raw)["uri"] == base + raw


def test_header_routed_https_target(proxy, tls_origin):
    route = Route("header", proxy, tls_origin)
    seen = echo(route, "/v1/tls?a=1")
    assert seen["tls"] is True
    assert seen["uri"] == "/v1/tls?a=1"
    assert values(seen, "host") == [tls_origin.authority]


def test_header_routed_untrusted_https_target_is_502(proxy, untrusted_tls_origin, origin):
    route = Route("header", proxy, untrusted_tls_origin)
    resp = route.exchange("GET", "/v1/untrusted")
    assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_header_routed_filters_headers_case_insensitively(proxy, origin):
    route = Route("header", proxy, origin)
    with route.connect() as c:
        c.send(build_request("GET", "/v1/filter", [
            ("Host", f"{LOOPBACK}:{proxy.port}"),
            ("X-Target-Host", origin.url),
            ("X-Secret-Internal", "1"),
            ("x-SECRET-internal", "2"),
            ("X-Secret-Internal-Not", "keep"),
            ("X-Other", "also-kept"),
        ]))
        resp = c.read_response()
    assert resp.status == 200, resp.body[:300]
    seen = resp.json()
    got = names(seen)
    assert "x-target-host" not in got
    assert "x-secret-internal" not in got, "configured header_filter names must not be forwarded"
    assert values(seen, "x-secret-internal-not") == ["keep"], "filter is by exact name only"
    assert values(seen, "x-other") == ["also-kept"]
    assert values(seen, "host") == [origin.authority]


@pytest.mark.parametrize("value", ["ftp://127.0.0.1:21", "http://", "not a url", "http://:80/"])
def test_header_routed_invalid_target_is_4xx(proxy, origin, value):
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", "/v1/x", [("Host", "p"), ("x-target-host", value)]))
        resp = c.read_response()
    assert 400 <= resp.status < 500, (value, resp.status, resp.body[:200])
    assert_proxy_works(proxy, origin)


def test_header_routed_missing_target_is_403(proxy, origin):
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", "/v1/x", [("Host", f"{LOOPBACK}:{proxy.port}")]))
        resp = c.read_response()
    assert resp.status == 403
    assert b"you have to include x-target-host header" in resp.body
    assert_short_text_error(resp, 403)
    assert_proxy_works(proxy, origin)


# ---------------------------------------------------------------------------
# Keep-alive, pipelining, reuse
# ---------------------------------------------------------------------------


def test_keep_alive_sequential_on_one_client_connection(route):
    with route.connect() as c:
        for i in range(5):
            c.send(route.request("GET", f"/echo?seq={i}"))
            resp = c.read_response()
            assert resp.status == 200
            assert resp.json()["uri"] == f"/echo?seq={i}"


def test_pipelined_requests_answered_in_order(route):
    body = patternBytes(5000)
    batch = b"".join([
        route.request("GET", "/echo?n=1"),
        route.request("GET", "/bytes/3000"),
        route.request("POST", "/sha256", body=body),
        route.request("HEAD", "/bytes/777"),
        route.request("GET", "/chunked/4000"),
        route.request("GET", "/echo?n=6"),
    ])
    with route.connect() as c:
        c.send(batch)
        r1 = c.read_response()
        r2 = c.read_response()
        r3 = c.read_response()
        r4 = c.read_response("HEAD")
        r5 = c.read_response()
        r6 = c.read_response()
    assert r1.json()["uri"] == "/echo?n=1"
    assert r2.body == patternBytes(3000)
    assert r3.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": 5000}
    assert r4.status == 200 and r4.body == b""
    assert r5.body == patternBytes(4000)
    assert r6.json()["uri"] == "/echo?n=6"


def test_pipelined_slow_then_fast_stays_in_order(route):
    with route.connect() as c:
        c.send(route.request("GET", "/delay/300") + route.request("GET", "/echo?fast"))
        first = c.read_response()
        second = c.read_response()
    assert first.body == b"delayed 300\n"
    assert second.json()["uri"] == "/echo?fast"


def test_client_half_close_after_request_still_gets_response(route):
    with route.connect() as c:
        c.send(route.request("GET", "/bytes/100000"))
        c.shutdown_write()
        resp = c.read_response()
        assert resp.status == 200 and resp.body == patternBytes(100000)
        assert c.read_to_eof() == b"", "the proxy should close after answering a half-closed client"


def test_http10_client_gets_no_chunked_encoding(route):
    with route.connect() as c:
        c.send(route.request("GET", "/chunked/5000").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1))
        resp = c.read_response()
        rest = c.read_to_eof()
    assert resp.status == 200
    assert "chunked" not in resp.tokens("transfer-encoding"), \
        "chunked transfer-coding must not be sent to an HTTP/1.0 client"
    assert resp.body + rest == patternBytes(5000)


def test_close_delimited_origin_response(route):
    resp = route.exchange("GET", "/eof/200000")
    assert resp.status == 200
    assert resp.body == patternBytes(200000)


def test_origin_interim_103_then_final_response(route):
    with route.connect() as c:
        c.send(route.request("GET", "/early-hints") + route.request("GET", "/echo?after-103"))
        resp = c.read_response()
        after = c.read_response()
    assert resp.status == 200, resp
    assert resp.json()["uri"] == "/early-hints"
    assert after.json()["uri"] == "/echo?after-103"


def test_origin_answers_before_reading_upload(route):
    """An origin that refuses an upload straight away (413 before the body)."""
    body = patternBytes(10 * MiB)
    errors = []
    with route.connect(timeout=10) as c:
        c.send(route.request("PUT", "/status/413?early=1", [("Content-Length", str(len(body)))]))

        def sender():
            try:
                c.sock.sendall(body)
            except OSError as e:  # the proxy may close after answering
                errors.append(e)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        resp = c.read_response()
        t.join(10)
    assert resp.status == 413, (resp.status, resp.body[:200])
    assert resp.body == b"status 413\n"
    assert_proxy_works(route.proxy, route.origin)


def wait_for_proxy_sockets(proxy, predicate, timeout: float = 5.0):
    """Poll the proxy's TCP sockets until none satisfies C{predicate}; return the offenders."""
    deadline = time.monotonic() + timeout
    while True:
        offenders = [s for s in proxy.tcp_sockets() if predicate(s)]
        if not offenders or time.monotonic() > deadline:
            return offenders
        time.sleep(0.05)


def _wait_origin_open(origin, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        open_now = origin.stats()["open"] - 1  # minus the stats connection itself
        if open_now <= expected or time.monotonic() > deadline:
            return open_now
        time.sleep(0.05)


def test_client_abort_mid_download_closes_origin_connection(proxy_factory, fresh_origin):
    p = proxy_factory()
    route = Route("absolute", p, fresh_origin)
    t = tag()
    with route.connect() as c:
        c.send(route.request("GET", f"/bytes/{200 * MiB}?tag={t}"))
        assert c.read_head().status == 200
        c.read_exact(MiB)
    left = _wait_origin_open(fresh_origin, 0)
    assert left == 0, f"{left} origin connection(s) still open after the client went away mid-body"
    assert not wait_for_proxy_sockets(p, lambda s: s.state == "CLOSE_WAIT")
    assert len(p.wait_access_lines(lambda l: t in l)) == 1, "no access log line for the aborted request"
    assert_proxy_works(p, fresh_origin)


@pytest.mark.parametrize("sent", [0, 1000, MiB], ids=lambda n: f"{n}B-sent")
def test_client_abort_mid_upload_closes_origin_connection(proxy_factory, fresh_origin, sent):
    """
    The client sends a head announcing 100 MiB, part of the body, then closes.
    The body can never complete: the proxy must drop the origin connection and
    the client socket at once (not after upstream.read_timeout).
    """
    p = proxy_factory()
    route = Route("absolute", p, fresh_origin)
    t = tag()
    with route.connect() as c:
        c.send(route.request("PUT", f"/sha256?tag={t}", [("Content-Length", str(100 * MiB))]))
        if sent:
            c.send(patternBytes(sent))
        time.sleep(0.2)
    left = _wait_origin_open(fresh_origin, 0, timeout=3)
    stuck = wait_for_proxy_sockets(p, lambda s: s.state == "CLOSE_WAIT", timeout=1)
    assert left == 0 and not stuck, (
        f"3 s after the client closed mid-upload: {left} origin connection(s) still open, "
        f"proxy sockets in CLOSE_WAIT: {stuck}")
    assert fresh_origin.stats()["requests"] == 1
    assert len(p.wait_access_lines(lambda l: t in l)) == 1, "no access log line for the aborted request"
    assert_proxy_works(p, fresh_origin)


def test_pool_bounded_per_destination(proxy_factory, fresh_origin):
    p = proxy_factory(upstream={"max_connections_per_destination": 2})
    route = Route("absolute", p, fresh_origin)
    conns = [route.connect() for _ in range(5)]
    started = time.monotonic()
    try:
        for c in conns:
            c.send(route.request("GET", "/delay/300"))
        results = [c.read_response() for c in conns]
    finally:
        for c in conns:
            c.close()
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == [200] * 5, [(r.status, r.body[:100]) for r in results]
    stats = fresh_origin.stats()
    assert stats["connections"] <= 2, f"{stats['connections']} origin connections with a bound of 2"
    assert elapsed >= 0.85, f"5 requests of 300 ms over 2 connections took only {elapsed:.2f}s"


def test_client_allow_admits_listed_client(proxy_factory, origin):
    p = proxy_factory(forward={"client_allow": ["127.0.0.0/8"]})
    assert_proxy_works(p, origin)


def test_client_allow_refuses_other_clients(proxy_factory, fresh_origin):
    p = proxy_factory(forward={"client_allow": ["10.0.0.0/8"]})
    for form in ("absolute", "header"):
        resp = Route(form, p, fresh_origin).exchange("GET", "/echo?denied")
        assert resp.status == 403, (form, resp.status, resp.body[:200])
    assert fresh_origin.stats()["requests"] == 0, "a refused client's request reached the origin"


def test_client_idle_timeout_closes_idle_connection(proxy_factory, origin):
    p = proxy_factory(forward={"client_idle_timeout": 1.0})
    with RawConnection(p.port, timeout=5) as c:
        c.send(build_request("GET", origin.url + "/echo", [("Host", origin.authority)]))
        assert c.read_response().status == 200
        started = time.monotonic()
        assert c.read_to_eof() == b""
        idle = time.monotonic() - started
    assert 0.8 <= idle < 4, f"idle client connection closed after {idle:.2f}s with client_idle_timeout=1"


def test_keep_alive_reuses_origin_connections(proxy, fresh_origin):
    """20 sequential requests on each of 3 client connections."""
    route = Route("absolute", proxy, fresh_origin)
    conns = [route.connect() for _ in range(3)]
    try:
        for c in conns:
            for i in range(20):
                c.send(route.request("GET", f"/echo?i={i}"))
                resp = c.read_response()
                assert resp.status == 200
    finally:
        for c in conns:
            c.close()
    stats = fresh_origin.stats()
    assert stats["requests"] == 60
    assert stats["connections"] <= 3, (
        f"60 sequential requests used {stats['connections']} origin connections; "
        "the upstream pool should reuse them")


def test_keep_alive_reuse_header_routed_with_requests(proxy, fresh_origin):
    route = Route("header", proxy, fresh_origin)
    sessions = [route.requests_session() for _ in range(3)]
    for s in sessions:
        for i in range(20):
            r = s.get(route.requests_url(f"/v1/{i}"), timeout=10)
            assert r.status_code == 200
    for s in sessions:
        s.close()
    stats = fresh_origin.stats()
    assert stats["requests"] == 60
    assert stats["connections"] <= 3, stats


def test_origin_connection_reused_after_large_body(proxy, fresh_origin):
    route = Route("absolute", proxy, fresh_origin)
    with route.connect() as c:
        for path, body in [("/bytes/1000000", None), ("/sha256", patternBytes(1000000)),
                           ("/chunked/100000", None), ("/echo", None)]:
            c.send(route.request("POST" if body else "GET", path, body=body))
            assert c.read_response().status == 200
    assert fresh_origin.stats()["connections"] == 1


def test_origin_closing_idle_pooled_connection_is_not_an_error(proxy, fresh_origin):
    """The origin closes a kept-alive connection while it idles in the pool."""
    route = Route("absolute", proxy, fresh_origin)
    for i in range(3):
        resp = route.exchange("GET", f"/echo?close_after_ms=50&i={i}")
        assert resp.status == 200, f"request {i} after an idle close: {resp.status} {resp.body!r}"
        time.sleep(0.3)
    assert fresh_origin.stats()["connections"] == 3


# ---------------------------------------------------------------------------
# Header handling
# ---------------------------------------------------------------------------


def test_request_hop_by_hop_headers_removed(route):
    seen = echo(route, "/echo", [
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
    got = names(seen)
    for name in ["x-drop-me", "keep-alive", "proxy-connection", "proxy-authorization", "te",
                 "trailer", "upgrade"]:
        assert name not in got, f"{name} was forwarded to the origin: {seen['headers']}"
    for value in values(seen, "connection"):
        assert "x-drop-me" not in value.lower()
    assert values(seen, "x-keep") == ["yes"]


def test_response_hop_by_hop_headers_removed(route):
    with route.connect() as c:
        c.send(route.request("GET", "/hop"))
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"hop\n"
        got = [n.lower() for n, _ in resp.headers]
        for name in ["x-custom", "keep-alive", "proxy-connection", "trailer", "upgrade"]:
            assert name not in got, f"{name} reached the client: {resp.headers}"
        assert "x-custom" not in (resp.get("connection") or "").lower()
        assert resp.values("x-end-to-end") == ["yes"]
        # the origin said keep-alive; the client connection must still work
        c.send(route.request("GET", "/echo?after-hop"))
        assert c.read_response().json()["uri"] == "/echo?after-hop"


def test_repeated_request_headers_kept_in_order(route):
    seen = echo(route, "/echo", [
        ("X-Rep", "a"), ("X-Other", "1"), ("X-Rep", "b"), ("Accept", "text/plain"),
        ("X-Rep", "c"),
    ])
    assert values(seen, "x-rep") == ["a", "b", "c"]


def test_repeated_response_headers_kept_in_order(route):
    resp = route.exchange("GET", "/rep")
    assert resp.status == 200
    assert resp.values("set-cookie") == ["a=1", "b=2"]
    assert resp.values("x-rep") == ["1", "2", "3"]


def test_via_added_to_forwarded_request(route):
    seen = echo(route, "/echo")
    via = ", ".join(values(seen, "via"))
    assert "mydataproxy" in via.lower(), seen["headers"]


def test_via_appended_to_existing_value(route):
    seen = echo(route, "/echo", [("Via", "1.1 upstream-gw")])
    via = ", ".join(values(seen, "via")).lower()
    assert "upstream-gw" in via and "mydataproxy" in via
    assert via.index("upstream-gw") < via.index("mydataproxy")


def test_via_added_to_response(route):
    resp = route.exchange("GET", "/echo")
    assert "mydataproxy" in (resp.get("via") or "").lower(), resp.headers


def test_x_forwarded_for_added(route):
    seen = echo(route, "/echo")
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]


def test_x_forwarded_for_appended(route):
    seen = echo(route, "/echo", [("X-Forwarded-For", "10.1.2.3")])
    xff = ", ".join(values(seen, "x-forwarded-for"))
    assert [p.strip() for p in xff.split(",")] == ["10.1.2.3", "127.0.0.1"]


# ---------------------------------------------------------------------------
# Bodiless responses, 100-continue, chunked
# ---------------------------------------------------------------------------


def test_head_has_no_body(route):
    with route.connect() as c:
        c.send(route.request("HEAD", "/bytes/1000") + route.request("GET", "/echo?after-head"))
        head = c.read_response("HEAD")
        assert head.status == 200
        assert head.get("content-length") == "1000"
        after = c.read_response()
    assert after.status == 200 and after.json()["uri"] == "/echo?after-head", \
        "bytes after a HEAD response: the proxy sent a body for HEAD"


def test_head_on_chunked_resource_has_no_body(route):
    with route.connect(timeout=5) as c:
        c.send(route.request("HEAD", "/chunked/1000") + route.request("GET", "/echo?after-head"))
        head = c.read_response("HEAD")
        assert head.status == 200
        after = c.read_response()
    assert after.json()["uri"] == "/echo?after-head"


@pytest.mark.parametrize("path", ["/status/204", "/status/304", "/status/304?cl=10"])
def test_204_304_have_no_body(route, path):
    code = int(path.split("/")[2][:3])
    with route.connect(timeout=5) as c:
        c.send(route.request("GET", path) + route.request("GET", "/echo?after"))
        first = c.read_response()
        assert first.status == code
        after = c.read_response()
    assert after.status == 200 and after.json()["uri"] == "/echo?after"


def test_origin_error_status_relayed_not_rewritten(route):
    resp = route.exchange("GET", "/status/500")
    assert resp.status == 500
    assert resp.body == b"status 500\n"
    resp = route.exchange("GET", "/status/404")
    assert resp.status == 404
    assert resp.body == b"status 404\n"


def test_expect_100_continue_raw(route):
    body = patternBytes(200000)
    with route.connect(timeout=5) as c:
        head = route.request("POST", "/sha256", [("Expect", "100-continue")], body=body)
        head, payload = head[: head.index(b"\r\n\r\n") + 4], head[head.index(b"\r\n\r\n") + 4:]
        c.send(head)
        interim = c.read_head()  # must arrive without sending the body (timeout 5 s)
        assert interim.status == 100, (interim.status, interim.raw_head)
        c.send(payload)
        final = c.read_response()
    assert final.status == 200
    assert final.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}


def test_expect_100_continue_with_curl(proxy, origin, curl, tmp_path):
    data = tmp_path / "body"
    data.write_bytes(patternBytes(100000))
    out = subprocess.run(
        [curl, "-sS", "-v", "--max-time", "10", "--expect100-timeout", "5", "-x", proxy.url,
         "-H", "Expect: 100-continue", "--data-binary", f"@{data}", f"{origin.url}/sha256"],
        capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert b"HTTP/1.1 100" in out.stderr
    assert json.loads(out.stdout) == {"sha256": patternSha256(100000), "length": 100000}


def test_chunked_request_body_relayed(route):
    pieces = [b"a", patternBytes(100), patternBytes(65536), b"xyz", patternBytes(70000)]
    whole = b"".join(pieces)
    resp = route.exchange("POST", "/sha256", chunks=pieces)
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {"sha256": hashlib.sha256(whole).hexdigest(), "length": len(whole)}


def test_chunked_request_body_with_extensions_and_trailers(route):
    raw = route.request("POST", "/sha256", [("Transfer-Encoding", "chunked")])
    raw += b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    with route.connect() as c:
        c.send(raw)
        resp = c.read_response()
    assert resp.status == 200
    assert resp.json() == {"sha256": hashlib.sha256(b"hello world").hexdigest(), "length": 11}


def test_chunked_response_relayed(route):
    resp = route.exchange("GET", "/chunked/300000")
    assert resp.status == 200
    assert resp.body == patternBytes(300000)


def test_chunked_upload_with_requests_generator(route):
    s = route.requests_session()
    r = s.post(route.requests_url("/sha256"), data=iterPattern(3 * MiB), timeout=30)
    assert r.status_code == 200
    assert r.json() == {"sha256": patternSha256(3 * MiB), "length": 3 * MiB}


# ---------------------------------------------------------------------------
# Byte-exact bodies
# ---------------------------------------------------------------------------

SIZES = [0, 1, 64 * KiB, 10 * MiB]


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
@pytest.mark.parametrize("kind", ["bytes", "chunked"])
def test_download_byte_exact(route, size, kind):
    s = route.requests_session()
    r = s.get(route.requests_url(f"/{kind}/{size}"), stream=True, timeout=30)
    assert r.status_code == 200
    h = hashlib.sha256()
    n = 0
    for piece in r.iter_content(64 * KiB):
        h.update(piece)
        n += len(piece)
    assert n == size
    assert h.hexdigest() == patternSha256(size)
    if kind == "bytes":
        assert r.headers.get("content-length") == str(size)


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_upload_byte_exact(route, size):
    s = route.requests_session()
    r = s.put(route.requests_url("/sha256"), data=patternBytes(size), timeout=30)
    assert r.status_code == 200
    assert r.json() == {"sha256": patternSha256(size), "length": size}


@pytest.mark.parametrize("size", [0, 64 * KiB, 10 * MiB], ids=lambda n: f"{n}B")
def test_https_target_byte_exact(proxy, tls_origin, size):
    for form in ("absolute", "header"):
        route = Route(form, proxy, tls_origin)
        with route.connect(timeout=30) as c:
            c.send(route.request("GET", f"/bytes/{size}"))
            down = c.read_response()
            c.send(route.request("POST", "/sha256", body=patternBytes(size)))
            up = c.read_response()
        assert hashlib.sha256(down.body).hexdigest() == patternSha256(size), form
        assert up.json() == {"sha256": patternSha256(size), "length": size}, form


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_unresolvable_host_absolute_is_502(proxy, origin):
    with RawConnection(proxy.port, timeout=15) as c:
        c.send(build_request("GET", "http://nohost.invalid/", [("Host", "nohost.invalid")]))
        resp = c.read_response()
    assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_unresolvable_host_header_routed_is_502(proxy, origin):
    with RawConnection(proxy.port, timeout=15) as c:
        c.send(build_request("GET", "/v1/x", [("Host", "p"), ("x-target-host", "http://nohost.invalid")]))
        resp = c.read_response()
    assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_connection_refused_is_502(proxy, origin, closed_port):
    for form in ("absolute", "header"):
        with RawConnection(proxy.port) as c:
            if form == "absolute":
                c.send(build_request("GET", f"http://{LOOPBACK}:{closed_port}/x",
                                     [("Host", f"{LOOPBACK}:{closed_port}")]))
            else:
                c.send(build_request("GET", "/x", [("Host", "p"),
                                                   ("x-target-host", f"http://{LOOPBACK}:{closed_port}")]))
            resp = c.read_response()
        assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


@pytest.mark.parametrize("path", ["/reset", "/close"])
def test_origin_reset_or_close_without_response_is_502(route, path):
    resp = route.exchange("GET", path)
    assert_short_text_error(resp, 502)
    assert_proxy_works(route.proxy, route.origin)


def test_origin_reset_on_reused_connection_keeps_client_connection_usable(route):
    with route.connect() as c:
        c.send(route.request("GET", "/echo?1"))
        assert c.read_response().status == 200
        c.send(route.request("GET", "/reset"))
        resp = c.read_response()
        assert resp.status == 502
        if "close" not in resp.tokens("connection"):
            c.send(route.request("GET", "/echo?2"))
            assert c.read_response().json()["uri"] == "/echo?2"


def test_origin_that_never_answers_is_504(proxy_factory, origin):
    p = proxy_factory(upstream={"read_timeout": 1.0})
    for form in ("absolute", "header"):
        route = Route(form, p, origin)
        started = time.monotonic()
        resp = route.exchange("GET", "/slow")
        elapsed = time.monotonic() - started
        assert_short_text_error(resp, 504)
        assert 0.9 <= elapsed < 5, f"504 after {elapsed:.2f}s with read_timeout=1"
    assert_proxy_works(p, origin)


def test_read_timeout_does_not_cut_slow_but_timely_origin(proxy_factory, origin):
    p = proxy_factory(upstream={"read_timeout": 1.0})
    route = Route("absolute", p, origin)
    resp = route.exchange("GET", "/delay/400")
    assert resp.status == 200 and resp.body == b"delayed 400\n"
    # a long transfer that keeps bytes flowing is not a timeout either
    resp = route.exchange("GET", "/bytes/20000000")
    assert resp.status == 200 and len(resp.body) == 20000000


@pytest.mark.parametrize("line", [
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /x FOO/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_request_line_is_400(proxy, origin, line):
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(line)
        resp = c.read_response()
    assert_short_text_error(resp, 400)
    assert_proxy_works(proxy, origin)


@pytest.mark.parametrize("head", [
    # RFC 9112 6.3: Content-Length with Transfer-Encoding is a smuggling vector
    b"POST {t} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST {t} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST {t} HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
    b"POST {t} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET {t} HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n",
], ids=["cl+te", "two-cl", "signed-cl", "unknown-te", "obs-fold"])
def test_ambiguous_framing_is_400(proxy, origin, head):
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(head.replace(b"{t}", (origin.url + "/sha256").encode()) + b"hello")
        resp = c.read_response()
    assert resp.status == 400, (resp.status, resp.body[:200])
    assert_proxy_works(proxy, origin)


# ---------------------------------------------------------------------------
# Access log
# ---------------------------------------------------------------------------


def test_access_log_absolute_get(proxy, origin):
    t = tag()
    target = f"{origin.url}/bytes/1234?tag={t}"
    with RawConnection(proxy.port) as c:
        client_port = c.local_port
        c.send(build_request("GET", target, [("Host", origin.authority)]))
        resp = c.read_response()
    assert resp.status == 200
    lines = proxy.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, f"expected one access log line for {t}, got {lines}"
    f = lines[0]
    assert f["_timestamp"], f"no leading timestamp: {f['_line']!r}"
    assert f.get("client") == f"127.0.0.1:{client_port}", f["_line"]
    assert f.get("method") == "GET", f["_line"]
    assert f.get("target") == target, f["_line"]
    assert f.get("status") == "200", f["_line"]
    assert f.get("in") == "0", f["_line"]
    assert f.get("out") == "1234", f["_line"]
    assert float(f.get("ms", "nan")) >= 0, f["_line"]
    assert f.get("upstream") == origin.authority, f["_line"]


def test_access_log_upload_counts_bytes_in(proxy, origin):
    t = tag()
    body = patternBytes(100000)
    route = Route("absolute", proxy, origin)
    resp = route.exchange("POST", f"/sha256?tag={t}", body=body)
    assert resp.status == 200
    [f] = proxy.wait_access_lines(lambda l: t in l)
    assert f.get("method") == "POST", f["_line"]
    assert f.get("in") == "100000", f["_line"]
    assert f.get("out") == str(len(resp.body)), f["_line"]


def test_access_log_header_routed(proxy, origin):
    t = tag()
    route = Route("header", proxy, origin)
    with route.connect() as c:
        client_port = c.local_port
        c.send(route.request("GET", f"/v1/x?tag={t}"))
        resp = c.read_response()
    assert resp.status == 200
    lines = proxy.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    f = lines[0]
    assert f.get("client") == f"127.0.0.1:{client_port}", f["_line"]
    assert f.get("method") == "GET"
    assert f"/v1/x?tag={t}" in f.get("target", ""), f["_line"]
    assert f.get("status") == "200"
    assert f.get("out") == str(len(resp.body)), f["_line"]
    assert f.get("upstream") == origin.authority, f["_line"]


def test_access_log_one_line_per_pipelined_request(proxy, origin):
    tags = [tag() for _ in range(4)]
    route = Route("absolute", proxy, origin)
    with route.connect() as c:
        c.send(b"".join(route.request("GET", f"/echo?tag={t}") for t in tags))
        for _ in tags:
            assert c.read_response().status == 200
    for t in tags:
        lines = proxy.wait_access_lines(lambda l, t=t: t in l)
        assert len(lines) == 1, (t, lines)


def test_access_log_error_status(proxy, closed_port):
    t = tag()
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", f"http://{LOOPBACK}:{closed_port}/x?tag={t}",
                             [("Host", f"{LOOPBACK}:{closed_port}")]))
        assert c.read_response().status == 502
    lines = proxy.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    assert lines[0].get("status") == "502", lines[0]["_line"]
    assert lines[0].get("method") == "GET"


def test_access_log_missing_target_header(proxy):
    t = tag()
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", f"/no-target?tag={t}", [("Host", "p")]))
        assert c.read_response().status == 403
    lines = proxy.wait_access_lines(lambda l: t in l)
    assert len(lines) == 1, lines
    assert lines[0].get("status") == "403", lines[0]["_line"]


# ---------------------------------------------------------------------------
# Memory: streaming with back-pressure
# ---------------------------------------------------------------------------

RSS_BUDGET_KIB = 16 * 1024


def _warm_up(route: Route) -> None:
    for _ in range(2):
        r = route.exchange("GET", "/bytes/10485760")
        assert r.status == 200
        r = route.exchange("PUT", "/count", body=patternBytes(10 * MiB))
        assert r.status == 200




@pytest.mark.slow
def test_memory_1gib_download_and_upload(proxy_factory, origin):
    p = proxy_factory()
    route = Route("absolute", p, origin)
    _warm_up(route)
    time.sleep(0.3)
    baseline = p.rss_kib()
    hwm_before = p.hwm_kib()
    block = bytes(patternBytes(MiB))

    with RSSSampler(p.pid) as sampler:
        # download 1 GiB, streamed and discarded by the client
        started = time.monotonic()
        with route.connect(timeout=60) as c:
            c.send(route.request("GET", f"/bytes/{GiB}"))
            head = c.read_head()
            assert head.status == 200
            assert head.get("content-length") == str(GiB)
            c.discard_exact(GiB)
        down_s = time.monotonic() - started

        # upload 1 GiB, generated on the fly
        started = time.monotonic()
        with route.connect(timeout=60) as c:
            c.send(route.request("PUT", "/count", [("Content-Length", str(GiB))]))
            view = memoryview(block)
            for _ in range(GiB // MiB):
                c.sock.sendall(view)
            resp = c.read_response()
        up_s = time.monotonic() - started
    assert resp.status == 200
    assert resp.json() == {"length": GiB}
    growth = peak_growth_kib(p, baseline, hwm_before, sampler)
    print(f"download {down_s:.1f}s, upload {up_s:.1f}s, RSS baseline {baseline} KiB, "
          f"peak growth {growth} KiB")
    assert growth <= RSS_BUDGET_KIB, (
        f"proxy RSS grew by {growth / 1024:.1f} MiB during 1 GiB transfers "
        f"(budget {RSS_BUDGET_KIB // 1024} MiB): bodies are being buffered")


def test_memory_backpressure_stalled_client_download(proxy_factory, origin):
    """A client that stops reading must stop the proxy reading from the origin."""
    p = proxy_factory()
    route = Route("absolute", p, origin)
    _warm_up(route)
    time.sleep(0.3)
    baseline = p.rss_kib()
    hwm_before = p.hwm_kib()
    size = 300 * MiB
    with RSSSampler(p.pid) as sampler:
        with route.connect(timeout=60) as c:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * KiB)
            c.send(route.request("GET", f"/bytes/{size}"))
            head = c.read_head()
            assert head.status == 200
            time.sleep(2.5)  # stall: without back-pressure the proxy buffers ~everything
            stalled_growth = peak_growth_kib(p, baseline, hwm_before, sampler)
            c.discard_exact(size)
    assert stalled_growth <= RSS_BUDGET_KIB, (
        f"proxy RSS grew by {stalled_growth / 1024:.1f} MiB while the client did not read")
    assert peak_growth_kib(p, baseline, hwm_before, sampler) <= RSS_BUDGET_KIB


@pytest.mark.parametrize("form", ["bytes", "chunked"])
def test_responses_stay_whole_when_a_stalled_client_fills_the_socket(proxy_factory, origin, form):
    """
    The proxy writes to a plain client socket directly until the kernel
    takes less than all, then through Twisted: the bytes around that switch,
    and the responses after it on the same connection, arrive whole and in
    order.
    """
    route = Route("absolute", proxy_factory(), origin)
    size = 4 * MiB
    with route.connect(timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        for n in (size, 1000, size):
            c.send(route.request("GET", f"/{form}/{n}"))
            time.sleep(0.3)  # the proxy meets a full socket
            response = c.read_response()
            assert response.status == 200
            assert response.chunked == (form == "chunked")
            assert response.body == patternBytes(n)


def test_memory_backpressure_slow_origin_upload(proxy_factory, origin):
    """An origin that does not read must stop the proxy reading from the client."""
    p = proxy_factory()
    route = Route("absolute", p, origin)
    _warm_up(route)
    time.sleep(0.3)
    baseline = p.rss_kib()
    hwm_before = p.hwm_kib()
    size = 300 * MiB
    block = patternBytes(MiB)

    with RSSSampler(p.pid) as sampler:
        with route.connect(timeout=60) as c:
            c.send(route.request("PUT", "/count?pause_ms=2500", [("Content-Length", str(size))]))

            t, result = send_in_background(c.sock, block, size // MiB)
            time.sleep(2.0)  # the origin is not reading yet
            stalled_growth = peak_growth_kib(p, baseline, hwm_before, sampler)
            t.join(60)
            resp = c.read_response()
    assert result.get("sent"), result
    assert resp.status == 200 and resp.json() == {"length": size}
    assert stalled_growth <= RSS_BUDGET_KIB, (
        f"proxy RSS grew by {stalled_growth / 1024:.1f} MiB while the origin did not read")
