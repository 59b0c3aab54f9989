"""
Integration tests of the egress policy through a real C{twistd mydataproxy}:
the SSRF guard (an SSRF corpus in every notation, in the three request
modes), destination rules (hosts, suffixes, networks, ports, modes, order,
default), DNS rebinding, the resolver's cache and concurrency, and the client
allow-list with X-Forwarded-For.

All traffic stays on loopback: the proxy's only resolver is the test DNS
server (or a silent loopback socket) and hosts file.  Corpus entries whose
address would leave the host if the guard failed are first checked in-process
(same code, same settings) and not sent if that check would let them through.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (
    LOOPBACK,
    OriginProcess,
    ProxyLauncher,
    RawConnection,
    Response,
    assert_short_text_error,
    build_request,
    open_tunnel,
)
from mydataproxy.config import EgressSettings
from mydataproxy.http.hosts import normaliseHost
from mydataproxy.egress.policy import EgressPolicy, Request
from mydataproxy.http.target import parseTarget

DENIED = b"destination not allowed"
LOOP4 = "loopback 127.0.0.0/8"
LOOP6 = "loopback ::1/128"
META4 = "cloud metadata 169.254.169.254/32"
META6 = "cloud metadata fd00:ec2::254/128"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def exchange(proxy, raw: bytes, method: str = "GET", timeout: float = 10.0) -> Response:
    with RawConnection(proxy.port, timeout=timeout) as c:
        c.send(raw)
        return c.read_response(method)


def absolute(proxy, url: str, host: str = "x") -> Response:
    return exchange(proxy, build_request("GET", url, [("Host", host)]))


def header_routed(proxy, target_host: bytes | str, path: str) -> Response:
    if isinstance(target_host, str):
        target_host = target_host.encode("ascii")
    raw = (
        f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{proxy.port}\r\n".encode("ascii")
        + b"x-target-host: " + target_host + b"\r\n\r\n"
    )
    return exchange(proxy, raw)


def tunnel_get(proxy, authority: str) -> Response:
    """CONNECT, then (if established) one GET through the tunnel; the CONNECT response otherwise."""
    c, resp = open_tunnel(proxy, authority)
    with c:
        if resp.status != 200:
            return resp  # read_response already read the refusal's body
        c.send(build_request("GET", "/echo?tunnel", [("Host", authority), ("Connection", "close")]))
        inner = c.read_response()
        inner.reason = f"(through tunnel) {inner.reason}"
        return inner


def log_lines(proxy, needle: str) -> list[str]:
    return [line for line in proxy.output().splitlines() if needle in line]


def wait_log(proxy, needle: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(proxy, needle)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def assert_logged(proxy, needle: str, count: int = 1) -> None:
    lines = wait_log(proxy, needle, count)
    assert len(lines) >= count, (
        f"expected {count} log line(s) containing {needle!r}; log tail:\n{proxy.output()[-3000:]}"
    )


def assert_denied(resp: Response) -> None:
    assert_short_text_error(resp, 403)
    assert resp.body.strip() == DENIED, resp.body


def assert_reached_origin(resp: Response) -> dict:
    assert resp.status == 200, f"{resp.status} {resp.reason}: {resp.body[:300]!r}"
    seen = resp.json()
    assert "uri" in seen
    return seen


def http_refusal_needle(method: str, uri: str, rule: str, client: str = "127.0.0.1") -> str:
    return f"403 {method} {uri} from {client}: destination not allowed (refused by {rule})"


def connect_refusal_needle(host: str, port: int, rule: str) -> str:
    display = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"403 CONNECT {display}: destination not allowed (refused by {rule})"


class OriginWatch:
    """How many connections an origin accepted beyond our own /stats calls."""

    def __init__(self, origin: OriginProcess) -> None:
        self.origin = origin
        self.start = origin.stats()["accepted"]

    def extra(self) -> int:
        # Each stats() call is itself one accepted connection.
        time.sleep(0.1)
        return self.origin.stats()["accepted"] - self.start - 1

    def assert_untouched(self, what: str = "") -> None:
        extra = self.extra()
        assert extra == 0, f"the origin accepted {extra} connection(s) {what}".strip()
        self.start = self.origin.stats()["accepted"]


class RecordingListener:
    """
    A tiny HTTP/1.1 server on a given loopback address, in threads: records
    each connection's request head and answers 200 with a body naming itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.heads.append(data.split(b"\r\n\r\n")[0])
            body = b'{"uri": "listener", "listener": "%s"}' % self.host.encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def second_loopback(fresh_origin):
    """A listener on 127.0.0.2, same port as C{fresh_origin} (on 127.0.0.1)."""
    try:
        listener = RecordingListener("127.0.0.2", fresh_origin.port)
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.2 here: {e}")
    yield listener
    listener.close()


# ---------------------------------------------------------------------------
# The SSRF corpus: guard on, no rules, one proxy for the whole module
# ---------------------------------------------------------------------------

HOSTS_FILE_NAME = "hostsfile.ssrf.egress.test"

# (id, host as written in the URL, the guard's description of the address)
CORPUS = [
    ("dotted", "127.0.0.1", LOOP4),
    ("decimal", "2130706433", LOOP4),
    ("octal", "0177.0.0.1", LOOP4),
    ("octal-padded", "0177.0000.0000.0001", LOOP4),
    ("octal-whole", "017700000001", LOOP4),
    ("hex", "0x7f000001", LOOP4),
    ("hex-upper", "0X7F000001", LOOP4),
    ("hex-dotted", "0x7f.0x0.0x0.0x1", LOOP4),
    ("hex-short", "0x7f.1", LOOP4),
    ("short-2", "127.1", LOOP4),
    ("short-3", "127.0.1", LOOP4),
    ("mixed", "0x7f.0.01", LOOP4),
    ("zero-padded", "127.000.000.001", LOOP4),
    ("trailing-dot", "127.0.0.1.", LOOP4),
    ("other-loopback", "127.127.127.127", LOOP4),
    ("mapped", "[::ffff:127.0.0.1]", LOOP4),
    ("mapped-hex", "[::ffff:7f00:1]", LOOP4),
    ("mapped-long", "[0:0:0:0:0:FFFF:7F00:0001]", LOOP4),
    ("ipv6-loopback", "[::1]", LOOP6),
    ("ipv6-loopback-long", "[0000:0:0:0:0:0:0:1]", LOOP6),
    ("zero", "0", "unspecified/this network 0.0.0.0/8"),
    ("zero-dotted", "0.0.0.0", "unspecified/this network 0.0.0.0/8"),
    ("zero-hex", "0x0", "unspecified/this network 0.0.0.0/8"),
    ("ipv6-unspecified", "[::]", "unspecified ::/128"),
    ("localhost", "LocalHost.", LOOP4),  # hosts file: 127.0.0.1 and ::1
    ("dns-name", "loop.ssrf.egress.test", LOOP4),
    ("dns-name-case", "LOOP.Ssrf.Egress.Test.", LOOP4),
    ("dns-v6", "v6loop.ssrf.egress.test", LOOP6),
    ("dns-mapped", "mapped.ssrf.egress.test", LOOP4),
    ("dns-mixed", "mixed.ssrf.egress.test", LOOP4),
    ("hosts-file", HOSTS_FILE_NAME, LOOP4),
    # Would leave the host if the guard failed: checked in-process first.
    ("nat64", "[64:ff9b::7f00:1]", LOOP4),
    ("6to4", "[2002:7f00:1::]", LOOP4),
    ("meta-dotted", "169.254.169.254", META4),
    ("meta-decimal", "2852039166", META4),
    ("meta-octal", "0251.0376.0251.0376", META4),
    ("meta-hex", "0xA9FEA9FE", META4),
    ("meta-hex-dotted", "0xa9.0xfe.0xa9.0xfe", META4),
    ("meta-short", "169.254.43518", META4),
    ("meta-mixed", "0251.0xfe.43518", META4),
    ("meta-mapped", "[::ffff:169.254.169.254]", META4),
    ("meta-mapped-hex", "[::ffff:a9fe:a9fe]", META4),
    ("meta-nat64", "[64:ff9b::a9fe:a9fe]", META4),
    ("meta-6to4", "[2002:a9fe:a9fe::]", META4),
    ("meta-v6", "[fd00:ec2::254]", META6),
    ("meta-v6-long", "[FD00:0EC2:0000:0:0:0:0:0254]", META6),
    ("private-10", "0xa.1", "private (RFC 1918) 10.0.0.0/8"),
    ("private-172", "172.16.0.1", "private (RFC 1918) 172.16.0.0/12"),
    ("private-192", "3232235777", "private (RFC 1918) 192.168.0.0/16"),
    ("cgnat", "100.64.0.1", "carrier-grade NAT 100.64.0.0/10"),
    ("link-local", "169.254.1.1", "link-local 169.254.0.0/16"),
    ("multicast", "224.0.0.1", "multicast 224.0.0.0/4"),
    ("reserved", "240.0.0.1", "reserved 240.0.0.0/4"),
    ("broadcast", "255.255.255.255", "reserved 240.0.0.0/4"),
    ("ula", "[fd12:3456::1]", "unique local fc00::/7"),
    ("ipv6-link-local", "[fe80::1]", "link-local fe80::/10"),
    ("ipv6-multicast", "[ff02::1]", "multicast ff00::/8"),
]

# Names the test resolver answers (only ever with loopback addresses).
CORPUS_DNS = {
    "loop.ssrf.egress.test": [["127.0.0.1"]],
    "v6loop.ssrf.egress.test": [["::1"]],
    "mapped.ssrf.egress.test": [["::ffff:127.0.0.1"]],
    "mixed.ssrf.egress.test": [["127.0.0.1", "::1", "127.0.0.2"]],
}

LOCAL = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "0.0.0.0/8", "::1/128", "::/128")]


def _stays_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(normaliseHost(host))
    except ValueError:
        return True  # a name: the test resolver answers it with loopback only
    return any(address in network for network in LOCAL)


def _interlock(host: str, port: int) -> None:
    """Fail (without sending) if the guard would let a non-local address through."""
    if _stays_local(host):
        return
    destination = parseTarget(b"GET", f"http://{host}:{port}/".encode(), None).destination
    policy = EgressPolicy(EgressSettings(rules=()))
    for mode in ("absolute", "header", "connect"):
        decision = policy.decideAddress(Request(mode, destination.host, port), destination.host)
        if decision.allowed:
            pytest.fail(f"the guard would let {host} ({destination.host}) through; not sent to the proxy")


@pytest.fixture(scope="module")
def corpus_origin(tmp_path_factory):
    o = OriginProcess(tmp_path_factory.mktemp("egress-origin"))
    yield o
    o.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, ca_pem, dns_server, corpus_origin):
    """A proxy with the guard on and no rule; C{.origin} is where loopback leads."""
    for name, answers in CORPUS_DNS.items():
        dns_server.set(name, *answers, ttl=0)
    original_hosts = dns_server.hosts.read_text()
    dns_server.hosts.write_text(original_hosts + f"127.0.0.1 {HOSTS_FILE_NAME}\n")
    launcher = ProxyLauncher(tmp_path_factory.mktemp("egress-guarded"), ca_pem, [corpus_origin.port], dns_server)
    try:
        proxy = launcher(egress={"rules": []})
        proxy.origin = corpus_origin
        yield proxy
    finally:
        problems = launcher.stop_all()
        dns_server.hosts.write_text(original_hosts)
    assert not problems, problems


@pytest.mark.parametrize("case, host, label", CORPUS, ids=[c[0] for c in CORPUS])
@pytest.mark.parametrize("mode", ["absolute", "header", "connect"])
def test_ssrf_corpus_refused(guarded, mode, case, host, label):
    port = guarded.origin.port
    _interlock(host, port)
    rule = f"egress.guard ({label})"
    watch = OriginWatch(guarded.origin)
    if mode == "absolute":
        uri = f"http://{host}:{port}/ssrf/{case}/absolute"
        resp = absolute(guarded, uri, f"{host}:{port}")
        assert_denied(resp)
        assert_logged(guarded, http_refusal_needle("GET", uri, rule))
    elif mode == "header":
        path = f"/ssrf/{case}/header"
        resp = header_routed(guarded, f"http://{host}:{port}", path)
        assert_denied(resp)
        assert_logged(guarded, http_refusal_needle("GET", path, rule))
    else:
        needle = connect_refusal_needle(normaliseHost(host), port, rule)
        before = len(log_lines(guarded, needle))
        resp = tunnel_get(guarded, f"{host}:{port}")
        assert_denied(resp)
        assert_logged(guarded, needle, before + 1)
    watch.assert_untouched(f"for {host} ({mode})")


@pytest.mark.parametrize(
    "userinfo",
    ["user@", "user:pw@", "allowed.example@", "127.0.0.1:80@", "a%40b@"],
)
def test_ssrf_userinfo_is_stripped_not_trusted(guarded, userinfo):
    port = guarded.origin.port
    watch = OriginWatch(guarded.origin)
    path = f"/ssrf/userinfo/{len(userinfo)}"
    resp = absolute(guarded, f"http://{userinfo}0x7f.1:{port}{path}")
    assert_denied(resp)
    # The log shows the target without its userinfo (credentials are not logged).
    assert_logged(guarded, http_refusal_needle("GET", f"http://0x7f.1:{port}{path}", f"egress.guard ({LOOP4})"))
    path = f"/ssrf/userinfo-header/{len(userinfo)}"
    resp = header_routed(guarded, f"http://{userinfo}2130706433:{port}", path)
    assert_denied(resp)
    assert_logged(guarded, http_refusal_needle("GET", path, f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_ssrf_international_spelling_in_x_target_host(guarded):
    """UTF-8 (obs-text) in x-target-host: fullwidth digits and full stops are still loopback."""
    port = guarded.origin.port
    watch = OriginWatch(guarded.origin)
    for i, host in enumerate(["１２７.０.０.１", "１２７．０．０．１", "127。0。0。1", "ＬＯＯＰ.ssrf.egress.test"]):
        path = f"/ssrf/intl/{i}"
        resp = header_routed(guarded, f"http://{host}:{port}".encode("utf-8"), path)
        assert_denied(resp)
        assert_logged(guarded, http_refusal_needle("GET", path, f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_ssrf_names_were_resolved_by_the_test_resolver(guarded, dns_server):
    """The DNS corpus entries really went through resolution (not refused earlier)."""
    for name, label in [("loop.ssrf.egress.test", LOOP4), ("v6loop.ssrf.egress.test", LOOP6),
                        ("mapped.ssrf.egress.test", LOOP4)]:
        before = len(dns_server.queries(name))
        uri = f"http://{name}:{guarded.origin.port}/ssrf/asked"
        resp = absolute(guarded, uri)
        assert_denied(resp)
        assert_logged(guarded, http_refusal_needle("GET", uri, f"egress.guard ({label})"))
        assert sorted(dns_server.queries(name)[before:]) == ["A", "AAAA"], name
    # A hosts-file name is not asked of DNS.
    uri = f"http://{HOSTS_FILE_NAME}:{guarded.origin.port}/ssrf/asked"
    assert_denied(absolute(guarded, uri))
    assert_logged(guarded, http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})"))
    assert dns_server.queries(HOSTS_FILE_NAME) == []


# ---------------------------------------------------------------------------
# DNS rebinding: the connection goes to the address that was checked
# ---------------------------------------------------------------------------

ONLY_TWO = {"rules": [{"name": "only two", "action": "allow", "networks": ["127.0.0.2/32"]}]}


def test_dns_rebinding_fails(proxy_factory, fresh_origin, second_loopback, dns_server):
    name = "rebind.egress.test"
    # Successive A queries: 127.0.0.2 (allowed), 127.0.0.1 (guarded), 127.0.0.2, ...
    dns_server.set(name, ["127.0.0.2"], ["127.0.0.1"], ttl=0)
    port = fresh_origin.port
    proxy = proxy_factory(egress=ONLY_TWO, forward={"connect_ports": [port]})
    watch = OriginWatch(fresh_origin)
    statuses = []
    for i in range(8):
        if i % 4 < 2:
            uri = f"http://{name}:{port}/rebind/{i}"
            resp = absolute(proxy, uri, f"{name}:{port}")
            needle = http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})")
        else:
            resp = tunnel_get(proxy, f"{name}:{port}")
            needle = connect_refusal_needle(name, port, f"egress.guard ({LOOP4})")
        statuses.append(resp.status)
        if i % 2 == 0:
            assert resp.status == 200, f"request {i}: {resp.status} {resp.body[:200]!r}"
            assert resp.json()["listener"] == "127.0.0.2"
        else:
            assert_denied(resp)
            assert_logged(proxy, needle, 2 if i == 7 else 1)
    assert statuses == [200, 403] * 4
    assert second_loopback.connections == 4
    assert all(b"\r\nHost: " + f"{name}:{port}".encode() in head for head in second_loopback.heads[:2])
    watch.assert_untouched("for a name that only ever passed the check as 127.0.0.2")
    # One lookup per request: nothing resolved the name a second time to connect.
    assert dns_server.queries(name).count("A") == 8


def test_only_allowed_addresses_of_an_answer_are_used(proxy_factory, fresh_origin, second_loopback, dns_server):
    name = "mixed.rebind.egress.test"
    dns_server.set(name, ["127.0.0.1", "::1", "127.0.0.2"], ttl=0)
    port = fresh_origin.port
    proxy = proxy_factory(egress=ONLY_TWO, forward={"connect_ports": [port]})
    watch = OriginWatch(fresh_origin)
    for i in range(3):
        resp = absolute(proxy, f"http://{name}:{port}/mixed/{i}", f"{name}:{port}")
        assert resp.status == 200 and resp.json()["listener"] == "127.0.0.2"
    resp = tunnel_get(proxy, f"{name}:{port}")
    assert resp.status == 200 and resp.json()["listener"] == "127.0.0.2"
    assert second_loopback.connections == 4
    watch.assert_untouched()


def test_resolution_is_cached_for_its_ttl(proxy_factory, origin, dns_server):
    name = "cached.egress.test"
    dns_server.set(name, ["127.0.0.1"], ttl=60)
    proxy = proxy_factory()
    for i in range(4):
        assert_reached_origin(absolute(proxy, f"http://{name}:{origin.port}/echo?{i}", name))
    assert dns_server.queries(name).count("A") == 1
    assert dns_server.queries(name).count("AAAA") == 1


def test_ttl_zero_is_resolved_every_time(proxy_factory, origin, dns_server):
    name = "uncached.egress.test"
    dns_server.set(name, ["127.0.0.1"], ttl=0)
    proxy = proxy_factory()
    for i in range(3):
        assert_reached_origin(absolute(proxy, f"http://{name}:{origin.port}/echo?{i}", name))
    assert dns_server.queries(name).count("A") == 3


def test_slow_dns_does_not_serialise_or_block(proxy_factory, origin):
    """
    Many lookups hanging on a DNS server that never answers: all time out
    together (no thread pool serialising them), and a request that needs no
    lookup is served meanwhile.
    """
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((LOOPBACK, 0))
    try:
        proxy = proxy_factory(resolver={"servers": [f"{LOOPBACK}:{silent.getsockname()[1]}"], "timeout": 1.0})
        names = [f"n{i}.silent.egress.test" for i in range(40)]
        started = time.monotonic()
        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(absolute, proxy, f"http://{n}:{origin.port}/", n) for n in names]
            time.sleep(0.2)
            quick = time.monotonic()
            assert_reached_origin(absolute(proxy, f"{origin.url}/echo?meanwhile", origin.authority))
            assert time.monotonic() - quick < 1.0
            statuses = [f.result(timeout=20).status for f in futures]
        elapsed = time.monotonic() - started
        assert statuses == [504] * len(names)
        # A thread pool (10 threads) would take 4 s or more; serial lookups 40 s.
        assert elapsed < 3.5, f"{len(names)} lookups timing out after 1 s took {elapsed:.1f} s (serialised?)"
    finally:
        silent.close()


# ---------------------------------------------------------------------------
# Destination rules
# ---------------------------------------------------------------------------

BANK = "api.bank.egress.test"


@pytest.fixture
def rule_names(dns_server):
    for name in (BANK, "other.bank.egress.test", "a.corp.egress.test", "x.y.corp.egress.test",
                 "corp.egress.test", "evilcorp.egress.test", "xn--bcher-kva.bank.egress.test"):
        dns_server.set(name, ["127.0.0.1"], ttl=0)


def test_host_rules_match_after_normalisation(proxy_factory, fresh_origin, rule_names):
    port = fresh_origin.port
    proxy = proxy_factory(
        egress={"rules": [
            {"name": "bank", "action": "allow", "hosts": ["API.Bank.Egress.Test."]},
            {"name": "corp", "action": "allow", "hosts": ["*.corp.egress.test"]},
            {"name": "books", "action": "allow", "hosts": ["bücher.bank.egress.test"]},
        ]},
        forward={"connect_ports": [port]},
    )
    for uri, host in [
        (f"http://{BANK}:{port}/echo", BANK),
        (f"http://API.Bank.Egress.Test.:{port}/echo", BANK),
        (f"HTTP://user:pw@API.BANK.egress.test:{port}/echo", BANK),
        (f"http://a.corp.egress.test:{port}/echo", "a.corp.egress.test"),
        (f"http://X.Y.Corp.Egress.Test.:{port}/echo", "x.y.corp.egress.test"),
        (f"http://XN--BCHER-KVA.bank.egress.test:{port}/echo", "xn--bcher-kva.bank.egress.test"),
    ]:
        seen = assert_reached_origin(absolute(proxy, uri))
        assert dict((n.lower(), v) for n, v in seen["headers"])["host"] == f"{host}:{port}", uri
    assert_reached_origin(header_routed(proxy, f"http://Api.BANK.egress.test.:{port}", "/echo"))
    assert_reached_origin(header_routed(proxy, f"http://BÜCHER.bank.egress.test:{port}".encode(), "/echo"))
    assert_reached_origin(tunnel_get(proxy, f"API.BANK.EGRESS.TEST.:{port}"))
    assert_reached_origin(tunnel_get(proxy, f"A.Corp.Egress.Test.:{port}"))

    watch = OriginWatch(fresh_origin)
    for i, name in enumerate(["other.bank.egress.test", "corp.egress.test", "evilcorp.egress.test"]):
        uri = f"http://{name}:{port}/refused/{i}"
        assert_denied(absolute(proxy, uri))
        assert_logged(proxy, http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})"))
    assert_denied(tunnel_get(proxy, f"other.bank.egress.test:{port}"))
    assert_logged(proxy, connect_refusal_needle("other.bank.egress.test", port, f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_rules_per_mode(proxy_factory, fresh_origin):
    port = fresh_origin.port
    proxy = proxy_factory(
        egress={"rules": [
            {"name": "no absolute", "action": "deny", "modes": ["absolute"]},
            {"name": "origin", "action": "allow", "modes": ["header", "connect"], "networks": ["127.0.0.1/32"]},
        ]},
        forward={"connect_ports": [port]},
    )
    uri = f"{fresh_origin.url}/mode/absolute"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.rules[0] no absolute"))
    assert_reached_origin(header_routed(proxy, fresh_origin.url, "/mode/header"))
    assert_reached_origin(tunnel_get(proxy, fresh_origin.authority))


def test_rule_for_one_mode_only_lifts_guard_for_that_mode(proxy_factory, fresh_origin):
    port = fresh_origin.port
    proxy = proxy_factory(
        egress={"rules": [{"name": "tunnels", "action": "allow", "modes": ["connect"], "networks": ["127.0.0.0/8"]}]},
        forward={"connect_ports": [port]},
    )
    assert_reached_origin(tunnel_get(proxy, fresh_origin.authority))
    watch = OriginWatch(fresh_origin)
    uri = f"{fresh_origin.url}/mode/abs-refused"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})"))
    assert_denied(header_routed(proxy, fresh_origin.url, "/mode/hdr-refused"))
    assert_logged(proxy, http_refusal_needle("GET", "/mode/hdr-refused", f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_port_rules(proxy_factory, fresh_origin, origin):
    proxy = proxy_factory(
        egress={"rules": [{"name": "one port", "action": "allow", "networks": ["127.0.0.1/32"],
                           "ports": [fresh_origin.port]}]},
    )
    assert_reached_origin(absolute(proxy, f"{fresh_origin.url}/echo"))
    watch = OriginWatch(origin)
    uri = f"{origin.url}/port/refused"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_deny_by_port(proxy_factory, fresh_origin, origin):
    proxy = proxy_factory(
        egress={"rules": [
            {"name": "no such port", "action": "deny", "ports": [origin.port]},
            {"name": "loopback", "action": "allow", "networks": ["127.0.0.0/8"]},
        ]},
    )
    assert_reached_origin(absolute(proxy, f"{fresh_origin.url}/echo"))
    watch = OriginWatch(origin)
    uri = f"{origin.url}/port/denied"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.rules[0] no such port"))
    watch.assert_untouched()


def test_deny_before_allow_first_match_wins(proxy_factory, fresh_origin, rule_names):
    port = fresh_origin.port
    deny = {"name": "no bank", "action": "deny", "hosts": [BANK]}
    allow = {"name": "loopback", "action": "allow", "networks": ["127.0.0.0/8"]}
    proxy = proxy_factory(egress={"rules": [deny, allow]})
    uri = f"http://API.bank.egress.test:{port}/order"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.rules[0] no bank"))
    assert_reached_origin(absolute(proxy, f"http://other.bank.egress.test:{port}/echo"))
    reversed_order = proxy_factory(egress={"rules": [allow, deny]})
    assert_reached_origin(absolute(reversed_order, f"http://{BANK}:{port}/echo"))


def test_default_deny(proxy_factory, fresh_origin, rule_names):
    port = fresh_origin.port
    proxy = proxy_factory(egress={
        "rules": [{"name": "bank", "action": "allow", "hosts": [BANK]}],
        "default": "deny",
        "guard": False,
    }, forward={"connect_ports": [port]})
    assert_reached_origin(absolute(proxy, f"http://{BANK}:{port}/echo"))
    watch = OriginWatch(fresh_origin)
    uri = f"http://other.bank.egress.test:{port}/default"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.default (deny)"))
    assert_denied(header_routed(proxy, fresh_origin.url, "/default/header"))
    assert_logged(proxy, http_refusal_needle("GET", "/default/header", "egress.default (deny)"))
    assert_denied(tunnel_get(proxy, fresh_origin.authority))
    assert_logged(proxy, connect_refusal_needle("127.0.0.1", port, "egress.default (deny)"))
    watch.assert_untouched()


def test_guard_off_default_allow_reaches_loopback(proxy_factory, fresh_origin):
    proxy = proxy_factory(egress={"rules": [], "guard": False})
    assert_reached_origin(absolute(proxy, f"{fresh_origin.url}/echo"))


@pytest.mark.parametrize(
    "rule",
    [
        {"name": "everything", "action": "allow"},
        {"name": "any host on this port", "action": "allow", "ports": [0]},
        {"name": "absolute mode", "action": "allow", "modes": ["absolute"]},
    ],
    ids=["catch-all", "port-only", "mode-only"],
)
def test_allow_rule_not_naming_destination_does_not_lift_guard(proxy_factory, fresh_origin, rule):
    rule = dict(rule)
    if rule.get("ports") == [0]:
        rule["ports"] = [fresh_origin.port]
    proxy = proxy_factory(egress={"rules": [rule]})
    watch = OriginWatch(fresh_origin)
    uri = f"{fresh_origin.url}/catchall"
    assert_denied(absolute(proxy, uri))
    assert_logged(proxy, http_refusal_needle("GET", uri, f"egress.guard ({LOOP4})"))
    watch.assert_untouched()


def test_deny_network_rule_applies_to_ipv4_mapped_answer(proxy_factory, fresh_origin, dns_server):
    """
    An AAAA answer ::ffff:127.0.0.1 connects to 127.0.0.1: a rule denying
    127.0.0.0/8 must refuse it (guard off, so only the rule stands in the way).
    """
    port = fresh_origin.port
    dns_server.set("v4.deny.egress.test", ["127.0.0.1"], ttl=0)
    dns_server.set("mapped.deny.egress.test", ["::ffff:127.0.0.1"], ttl=0)
    proxy = proxy_factory(egress={
        "rules": [{"name": "no loopback", "action": "deny", "networks": ["127.0.0.0/8"]}],
        "guard": False,
    })
    watch = OriginWatch(fresh_origin)
    for name in ("v4.deny.egress.test", "mapped.deny.egress.test"):
        uri = f"http://{name}:{port}/deny-mapped"
        resp = absolute(proxy, uri)
        assert resp.status == 403, f"{name}: {resp.status} {resp.body[:200]!r}"
        assert_denied(resp)
        assert_logged(proxy, http_refusal_needle("GET", uri, "egress.rules[0] no loopback"))
    watch.assert_untouched()


# ---------------------------------------------------------------------------
# Client access and X-Forwarded-For
# ---------------------------------------------------------------------------

CLIENT_DENIED = b"client address not allowed"


def xff_request(proxy, origin, path: str, xff: list[str] | None) -> Response:
    headers = [("Host", origin.authority)] + [("X-Forwarded-For", v) for v in (xff or [])]
    return exchange(proxy, build_request("GET", f"{origin.url}{path}", headers))


def assert_client_refused(proxy, resp: Response, path_uri: str, client: str) -> None:
    assert_short_text_error(resp, 403)
    assert resp.body.strip() == CLIENT_DENIED, resp.body
    assert_logged(
        proxy,
        f"403 GET {path_uri} from {client}: client address not allowed (refused by forward.client_allow (no match))",
    )


def test_xff_believed_only_from_trusted_proxy(proxy_factory, fresh_origin):
    proxy = proxy_factory(forward={"trusted_proxies": ["127.0.0.1/32"], "client_allow": ["10.9.0.0/16", "2001:db8:9::/48"]})
    o = fresh_origin
    assert_reached_origin(xff_request(proxy, o, "/echo?1", ["1.2.3.4, 10.9.1.1"]))
    assert_reached_origin(xff_request(proxy, o, "/echo?2", ["1.2.3.4", "10.9.1.1"]))
    assert_reached_origin(xff_request(proxy, o, "/echo?3", ["10.9.1.1, 127.0.0.1"]))  # trusted hop skipped
    assert_reached_origin(xff_request(proxy, o, "/echo?4", ["2001:db8:9::5"]))

    watch = OriginWatch(o)
    resp = xff_request(proxy, o, "/xff/spoofed", ["10.9.1.1, 1.2.3.4"])
    assert_client_refused(proxy, resp, f"{o.url}/xff/spoofed", "1.2.3.4")
    resp = xff_request(proxy, o, "/xff/garbled", ["10.9.1.1, not-an-address"])
    assert_client_refused(proxy, resp, f"{o.url}/xff/garbled", "127.0.0.1")
    resp = xff_request(proxy, o, "/xff/none", None)
    assert_client_refused(proxy, resp, f"{o.url}/xff/none", "127.0.0.1")
    resp = xff_request(proxy, o, "/xff/v6", ["2001:db8:a::5"])
    assert_client_refused(proxy, resp, f"{o.url}/xff/v6", "2001:db8:a::5")
    watch.assert_untouched()


def test_xff_ignored_without_trusted_proxies(proxy_factory, fresh_origin):
    proxy = proxy_factory(forward={"client_allow": ["10.9.0.0/16"]})
    watch = OriginWatch(fresh_origin)
    resp = xff_request(proxy, fresh_origin, "/xff/untrusted", ["10.9.1.1"])
    assert_client_refused(proxy, resp, f"{fresh_origin.url}/xff/untrusted", "127.0.0.1")
    watch.assert_untouched()


def test_xff_ignored_when_peer_is_not_a_trusted_proxy(proxy_factory, fresh_origin):
    proxy = proxy_factory(forward={"client_allow": ["10.9.0.0/16"], "trusted_proxies": ["10.0.0.0/8"]})
    resp = xff_request(proxy, fresh_origin, "/xff/peer", ["10.9.1.1"])
    assert_client_refused(proxy, resp, f"{fresh_origin.url}/xff/peer", "127.0.0.1")


def test_client_allow_list_admits_peer(proxy_factory, fresh_origin):
    proxy = proxy_factory(forward={"client_allow": ["10.0.0.0/8", "127.0.0.0/30", "::1/128"]})
    assert_reached_origin(xff_request(proxy, fresh_origin, "/echo", None))


def test_client_refusal_applies_to_connect(proxy_factory, fresh_origin):
    port = fresh_origin.port
    proxy = proxy_factory(forward={"client_allow": ["10.9.0.0/16"], "connect_ports": [port]})
    watch = OriginWatch(fresh_origin)
    c, resp = open_tunnel(proxy, fresh_origin.authority)
    with c:
        assert_short_text_error(resp, 403)
        assert resp.body.strip() == CLIENT_DENIED
    assert_logged(
        proxy,
        f"403 CONNECT {fresh_origin.authority} from 127.0.0.1: client address not allowed "
        "(refused by forward.client_allow (no match))",
    )
    watch.assert_untouched()


# ---------------------------------------------------------------------------
# Issue 7 item 12: names the rules refuse are not resolved
# ---------------------------------------------------------------------------


def test_names_refused_by_the_rules_are_never_resolved(proxy_factory, fresh_origin, dns_server):
    """
    With host rules and default deny, an unlisted name is refused without a
    DNS query: the name would otherwise leave the closed network through DNS
    (and a slow answer would turn the 403 into a 504).
    """
    port = fresh_origin.port
    proxy = proxy_factory(
        egress={
            "rules": [
                {"name": "bank", "action": "allow", "hosts": [BANK]},
                {"name": "no corp", "action": "deny", "hosts": ["*.corp.egress.test"]},
            ],
            "default": "deny",
        },
        forward={"connect_ports": [port]},
    )
    leaked = ["a.exfil.egress.test", "b.exfil.egress.test", "c.exfil.egress.test", "x.corp.egress.test"]
    for name in [BANK, *leaked]:
        dns_server.set(name, ["127.0.0.1"], ttl=0)  # answered if ever asked
    watch = OriginWatch(fresh_origin)
    uri = f"http://{leaked[0]}:{port}/leak"
    assert_denied(absolute(proxy, uri, leaked[0]))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.default (deny)"))
    assert_denied(header_routed(proxy, f"http://{leaked[1]}:{port}", "/leak/header"))
    assert_logged(proxy, http_refusal_needle("GET", "/leak/header", "egress.default (deny)"))
    assert_denied(tunnel_get(proxy, f"{leaked[2]}:{port}"))
    assert_logged(proxy, connect_refusal_needle(leaked[2], port, "egress.default (deny)"))
    uri = f"http://{leaked[3]}:{port}/leak/rule"
    assert_denied(absolute(proxy, uri, leaked[3]))
    assert_logged(proxy, http_refusal_needle("GET", uri, "egress.rules[1] no corp"))
    watch.assert_untouched()
    for name in leaked:
        assert dns_server.queries(name) == [], f"{name} was asked of DNS"
    # The allowed name still is resolved, and reached.
    assert_reached_origin(absolute(proxy, f"http://{BANK}:{port}/echo", BANK))
    assert "A" in dns_server.queries(BANK)


# ---------------------------------------------------------------------------
# Issue 7 item 15: ports of absolute-form and header-routed requests
# ---------------------------------------------------------------------------


def test_http_ports_limit_absolute_and_header_routed_requests(proxy_factory, fresh_origin):
    port = fresh_origin.port
    proxy = proxy_factory(forward={"http_ports": [80, 443, 8080, 8443], "connect_ports": [port]})
    watch = OriginWatch(fresh_origin)
    for resp in (
        absolute(proxy, f"{fresh_origin.url}/ports/absolute", fresh_origin.authority),
        header_routed(proxy, fresh_origin.url, "/ports/header"),
    ):
        assert_short_text_error(resp, 403)
    assert len(wait_log(proxy, "forward.http_ports", 2)) >= 2, proxy.output()[-3000:]
    watch.assert_untouched()
    # Tunnels follow connect_ports, not http_ports.
    assert tunnel_get(proxy, fresh_origin.authority).status == 200
    opened = proxy_factory(forward={"http_ports": [80, f"{port}-{port}"]})
    assert_reached_origin(absolute(opened, f"{fresh_origin.url}/echo", fresh_origin.authority))
    assert_reached_origin(header_routed(opened, fresh_origin.url, "/echo"))
