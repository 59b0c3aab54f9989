"""
Integration tests for CONNECT tunnels through a real C{twistd mydataproxy}.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import time

import pytest
import requests

from conftest import (
    LOOPBACK,
    RSSSampler,
    RawConnection,
    assert_proxy_works,
    assert_short_text_error,
    build_request,
    open_tunnel,
    peak_growth_kib,
    send_in_background,
)
from origin import patternBytes, patternSha256

KiB = 1024
MiB = 1024 * KiB


def requests_via_tunnel(proxy, ca_pem) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"https": proxy.url}
    s.verify = str(ca_pem)
    return s


def wait_for_sockets(proxy, predicate, timeout: float = 5.0):
    """Poll the proxy's TCP sockets until none satisfies C{predicate}; return the offenders."""
    deadline = time.monotonic() + timeout
    while True:
        offenders = [s for s in proxy.tcp_sockets() if predicate(s)]
        if not offenders or time.monotonic() > deadline:
            return offenders
        time.sleep(0.05)


def assert_no_leftover_tunnel_sockets(proxy, origin_port: int):
    close_wait = wait_for_sockets(proxy, lambda s: s.state == "CLOSE_WAIT")
    assert not close_wait, f"proxy holds sockets in CLOSE_WAIT: {close_wait}"
    to_origin = wait_for_sockets(proxy, lambda s: s.remote[1] == origin_port)
    assert not to_origin, f"proxy still holds sockets to the tunnel's origin: {to_origin}"


# ---------------------------------------------------------------------------
# Establishing tunnels
# ---------------------------------------------------------------------------


def test_connect_with_curl_to_tls_origin(proxy, tls_origin, ca_pem, curl):
    out = subprocess.run(
        [curl, "-sS", "-v", "--max-time", "10", "-p", "-x", proxy.url, "--cacert", str(ca_pem),
         f"{tls_origin.url}/echo?via=curl"],
        capture_output=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert b"HTTP/1.1 200 Connection established" in out.stderr
    seen = json.loads(out.stdout)
    assert seen["tls"] is True
    assert seen["uri"] == "/echo?via=curl"
    # end-to-end TLS: the proxy must not add anything inside the tunnel
    assert not any(n.lower() in ("via", "x-forwarded-for") for n, _ in seen["headers"])


def test_connect_response_head_is_exact(proxy, origin):
    c, resp = open_tunnel(proxy, origin.authority)
    with c:
        first_line = resp.raw_head.split(b"\r\n", 1)[0]
        assert first_line == b"HTTP/1.1 200 Connection established"
        bad = [n for n, _ in resp.headers if n.lower() in ("content-length", "transfer-encoding")]
        assert not bad, f"2xx CONNECT response must not carry {bad} (RFC 9110 9.3.6)"
        # plain HTTP inside the tunnel reaches the origin untouched
        c.send(build_request("GET", "/echo?in-tunnel", [("Host", origin.authority)]))
        inner = c.read_response()
    assert inner.status == 200
    seen = inner.json()
    assert seen["uri"] == "/echo?in-tunnel"
    assert not any(n.lower() in ("via", "x-forwarded-for") for n, _ in seen["headers"])


def test_connect_with_bytes_sent_before_the_200(proxy, origin):
    """Bytes pipelined behind the CONNECT head must go into the tunnel."""
    early = build_request("GET", "/echo?early", [("Host", origin.authority)])
    c, resp = open_tunnel(proxy, origin.authority, extra=early)
    with c:
        assert resp.status == 200
        inner = c.read_response()
    assert inner.status == 200
    assert inner.json()["uri"] == "/echo?early"


def test_connect_after_a_normal_request_on_the_same_connection(proxy, origin):
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", origin.url + "/echo?first", [("Host", origin.authority)]))
        assert c.read_response().json()["uri"] == "/echo?first"
        c.send(build_request("CONNECT", origin.authority, [("Host", origin.authority)]))
        resp = c.read_response("CONNECT")
        assert resp.status == 200
        c.send(build_request("GET", "/echo?second", [("Host", origin.authority)]))
        assert c.read_response().json()["uri"] == "/echo?second"


def test_connect_tls_with_python_ssl(proxy, tls_origin, ca_pem):
    c, resp = open_tunnel(proxy, tls_origin.authority)
    with c:
        assert resp.status == 200
        assert not c.buf, "bytes after the 200 head before the TLS handshake"
        ctx = ssl.create_default_context(cafile=str(ca_pem))
        with ctx.wrap_socket(c.sock, server_hostname=LOOPBACK) as tls:
            tls.sendall(build_request("GET", "/bytes/100000",
                                      [("Host", tls_origin.authority), ("Connection", "close")]))
            data = bytearray()
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == patternBytes(100000)


def test_connect_to_disallowed_port_is_403(proxy, origin, session_connect_ports):
    port = 22
    assert port not in session_connect_ports
    c, resp = open_tunnel(proxy, f"{LOOPBACK}:{port}")
    with c:
        assert_short_text_error(resp, 403)
    assert_proxy_works(proxy, origin)


def test_connect_from_client_not_allowed_is_403(proxy_factory, tcp_origin):
    p = proxy_factory(forward={"client_allow": ["10.0.0.0/8"]})
    c, resp = open_tunnel(p, tcp_origin.authority)
    with c:
        assert resp.status == 403, (resp.status, resp.body[:200])


def test_connect_refused_is_502(proxy, origin, closed_port):
    c, resp = open_tunnel(proxy, f"{LOOPBACK}:{closed_port}")
    with c:
        assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


def test_connect_unresolvable_is_502(proxy, origin):
    c, resp = open_tunnel(proxy, "nohost.invalid:443", timeout=15)
    with c:
        assert_short_text_error(resp, 502)
    assert_proxy_works(proxy, origin)


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.1:", "[::1", "127.0.0.1:99999"])
def test_connect_malformed_authority_is_rejected(proxy, origin, target):
    c, resp = open_tunnel(proxy, target)
    with c:
        assert 400 <= resp.status < 500, (resp.status, resp.body)
    assert_proxy_works(proxy, origin)


# ---------------------------------------------------------------------------
# Byte-exact through tunnels
# ---------------------------------------------------------------------------

SIZES = [0, 1, 64 * KiB, 10 * MiB]


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_connect_tls_download_byte_exact(proxy, tls_origin, ca_pem, size):
    s = requests_via_tunnel(proxy, ca_pem)
    r = s.get(f"{tls_origin.url}/bytes/{size}", stream=True, timeout=30)
    assert r.status_code == 200
    h = hashlib.sha256()
    n = 0
    for piece in r.iter_content(64 * KiB):
        h.update(piece)
        n += len(piece)
    assert (n, h.hexdigest()) == (size, patternSha256(size))


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_connect_tls_upload_byte_exact(proxy, tls_origin, ca_pem, size):
    s = requests_via_tunnel(proxy, ca_pem)
    r = s.post(f"{tls_origin.url}/sha256", data=patternBytes(size), timeout=30)
    assert r.status_code == 200
    assert r.json() == {"sha256": patternSha256(size), "length": size}


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_connect_plain_tunnel_byte_exact_both_ways(proxy, origin, size):
    c, resp = open_tunnel(proxy, origin.authority, timeout=30)
    with c:
        assert resp.status == 200
        c.send(build_request("GET", f"/bytes/{size}", [("Host", origin.authority)]))
        down = c.read_response()
        c.send(build_request("PUT", "/sha256", [("Host", origin.authority)], body=patternBytes(size)))
        up = c.read_response()
    assert hashlib.sha256(down.body).hexdigest() == patternSha256(size)
    assert len(down.body) == size
    assert up.json() == {"sha256": patternSha256(size), "length": size}


# ---------------------------------------------------------------------------
# Half-close and teardown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 10 * MiB], ids=lambda n: f"{n}B")
def test_connect_half_close_client_first(proxy, tcp_origin, size):
    payload = patternBytes(size)
    c, resp = open_tunnel(proxy, tcp_origin.authority, timeout=5)
    with c:
        assert resp.status == 200
        c.send(payload)
        c.shutdown_write()  # the origin only answers once it sees EOF
        reply = c.read_to_eof()
    assert reply == b"%d %s\n" % (size, hashlib.sha256(payload).hexdigest().encode()), \
        "the origin must see the client's EOF through the tunnel and its reply must come back"
    assert_no_leftover_tunnel_sockets(proxy, tcp_origin.port)


def test_connect_half_close_no_close_wait_per_ss(proxy, tcp_origin, ss):
    """The same check as above, seen by C{ss -tanp} rather than /proc."""
    c, resp = open_tunnel(proxy, tcp_origin.authority, timeout=5)
    with c:
        assert resp.status == 200
        c.send(b"x" * 5000)
        c.shutdown_write()
        assert c.read_to_eof().startswith(b"5000 ")
    deadline = time.monotonic() + 5
    while True:
        out = subprocess.run([ss, "-tanp"], capture_output=True, text=True, timeout=10).stdout
        mine = [l for l in out.splitlines() if f"pid={proxy.pid}," in l]
        bad = [l for l in mine if l.startswith("CLOSE-WAIT") or f":{tcp_origin.port} " in l]
        if not bad or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine, f"ss shows no socket for pid {proxy.pid} (not even the listener):\n{out}"
    assert not bad, "proxy sockets left after the tunnel ended:\n" + "\n".join(bad)


def test_connect_payload_and_eof_before_the_200(proxy, tcp_origin):
    """A client that sends its data and EOF right behind the CONNECT head."""
    payload = patternBytes(30000)
    with RawConnection(proxy.port, timeout=10) as c:
        c.send(build_request("CONNECT", tcp_origin.authority, [("Host", tcp_origin.authority)])
               + payload)
        c.shutdown_write()
        resp = c.read_response("CONNECT")
        assert resp.status == 200
        reply = c.read_to_eof()
    assert reply == b"30000 %s\n" % hashlib.sha256(payload).hexdigest().encode()
    assert_no_leftover_tunnel_sockets(proxy, tcp_origin.port)


def test_connect_origin_closes_first(proxy, tcp_origin):
    c, resp = open_tunnel(proxy, tcp_origin.authority, timeout=5)
    with c:
        assert resp.status == 200
        c.send(b"CLOSE please")
        reply = c.read_to_eof()  # must see EOF, not hang until the timeout
    assert reply == b"closing\n"
    assert_no_leftover_tunnel_sockets(proxy, tcp_origin.port)


def test_connect_client_aborts_mid_tunnel(proxy, tcp_origin):
    c, resp = open_tunnel(proxy, tcp_origin.authority, timeout=5)
    assert resp.status == 200
    c.send(patternBytes(100000))
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST
    assert_no_leftover_tunnel_sockets(proxy, tcp_origin.port)


def test_connect_client_closes_without_half_close(proxy, tcp_origin):
    c, resp = open_tunnel(proxy, tcp_origin.authority, timeout=5)
    assert resp.status == 200
    c.send(b"some bytes")
    c.close()
    assert_no_leftover_tunnel_sockets(proxy, tcp_origin.port)


# ---------------------------------------------------------------------------
# Access log
# ---------------------------------------------------------------------------


def test_access_log_connect_tunnel(proxy_factory, tcp_origin):
    p = proxy_factory()
    payload = patternBytes(12345)
    c, resp = open_tunnel(p, tcp_origin.authority)
    with c:
        client_port = c.local_port
        assert resp.status == 200
        c.send(payload)
        c.shutdown_write()
        reply = c.read_to_eof()
    assert reply.startswith(b"12345 ")
    lines = p.wait_access_lines(lambda l: "method=CONNECT" in l)
    assert len(lines) == 1, lines
    f = lines[0]
    assert f.get("client") == f"127.0.0.1:{client_port}", f["_line"]
    assert f.get("target") == tcp_origin.authority, f["_line"]
    assert f.get("status") == "200", f["_line"]
    assert f.get("in") == "12345", f["_line"]
    assert f.get("out") == str(len(reply)), f["_line"]
    assert float(f.get("ms", "nan")) >= 0, f["_line"]
    assert f.get("upstream") == tcp_origin.authority, f["_line"]


def test_access_log_connect_refused(proxy_factory, closed_port):
    p = proxy_factory()
    c, resp = open_tunnel(p, f"{LOOPBACK}:{closed_port}")
    c.close()
    assert resp.status == 502
    lines = p.wait_access_lines(lambda l: "method=CONNECT" in l)
    assert len(lines) == 1, lines
    assert lines[0].get("status") == "502", lines[0]["_line"]
    assert lines[0].get("target") == f"{LOOPBACK}:{closed_port}", lines[0]["_line"]


# ---------------------------------------------------------------------------
# Memory: tunnels apply back-pressure both ways
# ---------------------------------------------------------------------------

RSS_BUDGET_KIB = 16 * 1024


def _warm_tunnel(p, origin) -> None:
    c, resp = open_tunnel(p, origin.authority, timeout=30)
    with c:
        assert resp.status == 200
        for _ in range(2):
            c.send(build_request("GET", f"/bytes/{10 * MiB}", [("Host", origin.authority)]))
            assert len(c.read_response().body) == 10 * MiB
            c.send(build_request("PUT", "/count", [("Host", origin.authority)],
                                 body=patternBytes(10 * MiB)))
            assert c.read_response().json() == {"length": 10 * MiB}




def test_tunnel_backpressure_stalled_client(proxy_factory, origin):
    """The client stops reading: the proxy must stop reading from the origin."""
    p = proxy_factory()
    _warm_tunnel(p, origin)
    time.sleep(0.3)
    baseline, hwm_before = p.rss_kib(), p.hwm_kib()
    size = 300 * MiB
    with RSSSampler(p.pid) as sampler:
        c, resp = open_tunnel(p, origin.authority, timeout=60)
        with c:
            assert resp.status == 200
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * KiB)
            c.send(build_request("GET", f"/bytes/{size}", [("Host", origin.authority)]))
            assert c.read_head().status == 200
            time.sleep(2.5)
            stalled = peak_growth_kib(p, baseline, hwm_before, sampler)
            c.discard_exact(size)
    assert stalled <= RSS_BUDGET_KIB, \
        f"proxy RSS grew by {stalled / 1024:.1f} MiB while the tunnel's client did not read"


def test_tunnel_backpressure_stalled_origin(proxy_factory, origin):
    """The origin stops reading: the proxy must stop reading from the client."""
    p = proxy_factory()
    _warm_tunnel(p, origin)
    time.sleep(0.3)
    baseline, hwm_before = p.rss_kib(), p.hwm_kib()
    size = 300 * MiB
    block = patternBytes(MiB)
    with RSSSampler(p.pid) as sampler:
        c, resp = open_tunnel(p, origin.authority, timeout=60)
        with c:
            assert resp.status == 200
            c.send(build_request("PUT", "/count?pause_ms=2500",
                                 [("Host", origin.authority), ("Content-Length", str(size))]))

            t, result = send_in_background(c.sock, block, size // MiB)
            time.sleep(2.0)
            stalled = peak_growth_kib(p, baseline, hwm_before, sampler)
            t.join(60)
            final = c.read_response()
    assert result.get("sent"), result
    assert final.json() == {"length": size}
    assert stalled <= RSS_BUDGET_KIB, \
        f"proxy RSS grew by {stalled / 1024:.1f} MiB while the tunnel's origin did not read"
