"""
Unit tests of the forward listener (L{mydataproxy.forward.listener}) and its policy
(L{mydataproxy.egress.policy}): pure validators, and a L{ProxyChannel} driven
over an in-memory L{StringTransport} (no sockets, no reactor running).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.config import EgressRule, EgressSettings, ForwardSettings, Settings, UpstreamSettings
from mydataproxy.forward.listener import ForwardProxy
from mydataproxy.server.channel import CLOSE_SECONDS, DRAIN_GRACE_SECONDS, LINGER_BYTES, LINGER_SECONDS
from mydataproxy.http.framing import headerProblem, requestLineProblem
from mydataproxy.egress.policy import ClientAccess, connectAllowed
from mydataproxy.http.target import MISSING_TARGET_HOST
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.egress.resolver import Resolver
from mydataproxy.config import OriginTLSProfile
from mydataproxy.tls.contexts import OriginTLS
from mydataproxy.upstream.client import UpstreamPool

ORIGIN_TLS = OriginTLS(OriginTLSProfile(), ())

# ---------------------------------------------------------------------------
# requestLineProblem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET / HTTP/1.1",
        b"GET /a/b?c=d&e=%20 HTTP/1.0",
        b"POST http://example.com:8080/x HTTP/1.1",
        b"CONNECT example.com:443 HTTP/1.1",
        b"CONNECT [::1]:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"M-SEARCH~!#$%&'*+.^_`| /~x HTTP/1.1",
        b"get / HTTP/1.1",
    ],
)
def test_requestLineGood(line: bytes) -> None:
    assert requestLineProblem(line) is None


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"GET /", "malformed request line"),
        (b"GET", "malformed request line"),
        (b"", "malformed request line"),
        (b"GET / HTTP/1.1 extra", "malformed request line"),
        (b"GET  / HTTP/1.1", "malformed request line"),
        (b"GET /  HTTP/1.1", "malformed request line"),
        (b" GET / HTTP/1.1", "malformed request line"),
        (b"GET / HTTP/1.1 ", "malformed request line"),
        (b"GET\t/ HTTP/1.1", "malformed request line"),
        (b"GET /a b HTTP/1.1", "malformed request line"),
        (b"G(T / HTTP/1.1", "invalid method"),
        (b"GE/T / HTTP/1.1", "invalid method"),
        (b"G\x00T / HTTP/1.1", "invalid method"),
        (b"G\xc3\x89T / HTTP/1.1", "invalid method"),
        (b"GET:x / HTTP/1.1", "invalid method"),
        (b"GET /a\tb HTTP/1.1", "invalid request target"),
        (b"GET /a\x00b HTTP/1.1", "invalid request target"),
        (b"GET /a\x7fb HTTP/1.1", "invalid request target"),
        (b"GET /a\x1bb HTTP/1.1", "invalid request target"),
        (b"GET /caf\xc3\xa9 HTTP/1.1", "invalid request target"),
        (b"GET /\xff HTTP/1.1", "invalid request target"),
        (b"GET / HTTP/2.0", "unsupported HTTP version"),
        (b"GET / HTTP/1.2", "unsupported HTTP version"),
        (b"GET / HTTP/0.9", "unsupported HTTP version"),
        (b"GET / http/1.1", "unsupported HTTP version"),
        (b"GET / HTTP/1.1\r", "unsupported HTTP version"),
        (b"GET / HTTP/1", "unsupported HTTP version"),
        (b"GET / HTTPS/1.1", "unsupported HTTP version"),
    ],
)
def test_requestLineProblems(line: bytes, problem: str) -> None:
    assert requestLineProblem(line) == problem


# ---------------------------------------------------------------------------
# headerProblem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"Host: example.com",
        b"Host:example.com",
        b"X-Empty:",
        b"X-Empty: ",
        b"X-Tab: a\tb",
        b"X-Tab:\tvalue\t",
        b"X-Obs-Text: caf\xc3\xa9 \xff",
        b"X-Colons: a:b:c",
        b"!#$%&'*+-.^_`|~09AZaz: v",
    ],
)
def test_headerGood(line: bytes) -> None:
    assert headerProblem(line) is None


@pytest.mark.parametrize(
    "line",
    [
        b"Host : example.com",
        b"Host\t: example.com",
        b" Host: example.com",
        b": value",
        b":",
        b"no colon at all",
        b"X(A): v",
        b"X/A: v",
        b"X\xc3\xa9: v",
        b"X\x00A: v",
        b"X@A: v",
    ],
)
def test_headerBadName(line: bytes) -> None:
    assert headerProblem(line) == "invalid header field name"


@pytest.mark.parametrize(
    "ctl", [bytes([c]) for c in range(0x20) if c != 0x09] + [b"\x7f"]
)
def test_headerControlCharacterInValue(ctl: bytes) -> None:
    assert headerProblem(b"X-A: a" + ctl + b"b") == "control character in header field value"
    assert headerProblem(b"X-A: " + ctl) == "control character in header field value"


# ---------------------------------------------------------------------------
# ClientAccess and CONNECT ports
# ---------------------------------------------------------------------------


def policy(*networks: str) -> ClientAccess:
    return ClientAccess(ForwardSettings(client_allow=tuple(ipaddress.ip_network(n) for n in networks)))


@pytest.mark.parametrize("address", ["10.1.2.3", "::1", "2001:db8::5", "not an address", ""])
def test_emptyAllowListAllowsEveryone(address: str) -> None:
    decision = policy().allowed(address)
    assert decision.allowed
    assert decision.rule == "forward.client_allow is empty"


@pytest.mark.parametrize(
    "address, allowed, rule",
    [
        ("10.1.0.0", True, "forward.client_allow 10.1.0.0/16"),
        ("10.1.2.3", True, "forward.client_allow 10.1.0.0/16"),
        ("10.1.255.255", True, "forward.client_allow 10.1.0.0/16"),
        ("10.2.0.1", False, "forward.client_allow (no match)"),
        ("10.0.255.255", False, "forward.client_allow (no match)"),
        ("192.168.7.7", True, "forward.client_allow 192.168.7.7/32"),
        ("192.168.7.8", False, "forward.client_allow (no match)"),
        ("fd00:1::42", True, "forward.client_allow fd00:1::/32"),
        ("FD00:1:0:0::42", True, "forward.client_allow fd00:1::/32"),
        ("fd00:2::42", False, "forward.client_allow (no match)"),
        ("::1", False, "forward.client_allow (no match)"),
        ("::ffff:10.1.2.3", True, "forward.client_allow 10.1.0.0/16"),
        ("::FFFF:10.1.2.3", True, "forward.client_allow 10.1.0.0/16"),
        ("::ffff:10.2.0.1", False, "forward.client_allow (no match)"),
        ("::ffff:192.168.7.7", True, "forward.client_allow 192.168.7.7/32"),
        ("not an address", False, "forward.client_allow (not an IP client)"),
        ("", False, "forward.client_allow (not an IP client)"),
        ("10.1.2", False, "forward.client_allow (not an IP client)"),
        ("10.1.2.3/32", False, "forward.client_allow (not an IP client)"),
    ],
)
def test_clientAllowList(address: str, allowed: bool, rule: str) -> None:
    decision = policy("10.1.0.0/16", "192.168.7.7/32", "fd00:1::/32").allowed(address)
    assert (decision.allowed, decision.rule) == (allowed, rule)


def test_ipv4ClientAgainstIPv6OnlyListAndViceVersa() -> None:
    assert not policy("::/0").allowed("10.0.0.1").allowed
    assert policy("::/0").allowed("2001:db8::1").allowed
    assert not policy("0.0.0.0/0").allowed("2001:db8::1").allowed
    assert policy("0.0.0.0/0").allowed("10.0.0.1").allowed
    assert policy("0.0.0.0/0").allowed("::ffff:10.0.0.1").allowed


def test_firstMatchingNetworkNamedInRule() -> None:
    decision = policy("10.0.0.0/8", "10.1.0.0/16").allowed("10.1.2.3")
    assert decision.rule == "forward.client_allow 10.0.0.0/8"


@pytest.mark.parametrize(
    "ports, port, allowed",
    [
        (frozenset({443}), 443, True),
        (frozenset({443}), 8443, False),
        (frozenset({443}), 80, False),
        (frozenset({443, 8443}), 8443, True),
        (frozenset({22}), 443, False),
    ],
)
def test_connectPorts(ports, port: int, allowed: bool) -> None:
    decision = connectAllowed(ForwardSettings(connect_ports=ports), port)
    assert decision.allowed is allowed
    assert decision.rule == (f"forward.connect_ports {port}" if allowed else "forward.connect_ports")


def test_defaultConnectPortsIs443Only() -> None:
    assert connectAllowed(ForwardSettings(), 443).allowed
    assert not connectAllowed(ForwardSettings(), 80).allowed


# ---------------------------------------------------------------------------
# ProxyChannel over an in-memory transport
# ---------------------------------------------------------------------------


class AccessRecorder:
    """Stands in for L{mydataproxy.logs.AccessLog}: remembers each record."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def record(self, **kw) -> None:
        self.records.append(kw)


LOOPBACK_ALLOWED = EgressSettings(
    rules=(EgressRule("egress.rules[0] test origins", "allow", networks=(ipaddress.ip_network("127.0.0.0/8"),)),)
)


def settingsWith(**forward) -> Settings:
    base = Settings(egress=LOOPBACK_ALLOWED)
    return dataclasses.replace(base, forward=dataclasses.replace(base.forward, **forward))


class Client:
    """One client connection to a L{ProxyChannel}, all in memory."""

    def __init__(self, settings: Settings | None = None, peer=None) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, UpstreamSettings(), ORIGIN_TLS)
        self.accessLog = AccessRecorder()
        settings = settings or Settings(egress=LOOPBACK_ALLOWED)
        self.pipeline = RequestPipeline(settings, Resolver(self.reactor, settings.resolver), None, self.reactor)
        self.proxy = ForwardProxy(settings, self.pipeline, self.pool, self.accessLog, self.reactor)
        peer = peer or IPv4Address("TCP", "127.0.0.1", 5555)
        # The port hands the factory the address it accepted the connection from.
        self.channel = self.proxy.buildProtocol(peer)
        # Keep the idle timeout on the fake clock, off the global reactor.
        self.channel.callLater = self.reactor.callLater
        self.transport = StringTransport(peerAddress=peer)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def responses(self) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
        """Parse what was written so far into (status line, fields, body)."""
        data = self.received()
        out = []
        while data:
            head, sep, data = data.partition(b"\r\n\r\n")
            assert sep, f"incomplete response head {head!r}"
            statusLine, *lines = head.split(b"\r\n")
            fields = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines]
            length = [int(v) for n, v in fields if n.lower() == b"content-length"]
            assert len(length) == 1, f"expected one Content-Length in {head!r}"
            body, data = data[: length[0]], data[length[0] :]
            assert len(body) == length[0], "truncated body"
            out.append((statusLine, fields, body))
        return out

    def closed(self) -> bool:
        """Has the proxy closed the connection, lingering included?"""
        self.reactor.advance(LINGER_SECONDS)
        return self.transport.disconnecting

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def field(fields, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name.lower()]


@pytest.mark.parametrize(
    "requestLine, reason",
    [
        (b"GET /", b"malformed request line"),
        (b"GET  / HTTP/1.1", b"malformed request line"),
        (b"G@T / HTTP/1.1", b"invalid method"),
        (b"GET /\x7f HTTP/1.1", b"invalid request target"),
        (b"GET / HTTP/2.0", b"unsupported HTTP version"),
        (b"GET http://127.0.0.1:8080/ HTTP/1.2", b"unsupported HTTP version"),
    ],
)
def test_malformedRequestLineIs400AndCloses(requestLine: bytes, reason: bytes) -> None:
    c = Client()
    c.send(requestLine + b"\r\nHost: x\r\n\r\n")
    data = c.received()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    [(_, fields, body)] = c.responses()
    assert body == b"bad request: " + reason + b"\n"
    assert field(fields, b"connection") == [b"close"]
    assert c.closed()
    assert c.reactor.tcpClients == [], "a bad request must not reach an origin"


@pytest.mark.parametrize(
    "headerLines, reason",
    [
        (b"Host: x\r\nX-A: b\r\n c\r\n", b"obsolete line folding in header"),
        (b"Host: x\r\nX-A: b\r\n\tc\r\n", b"obsolete line folding in header"),
        (b"Host : x\r\n", b"invalid header field name"),
        (b": x\r\n", b"invalid header field name"),
        (b"Host: x\r\nX-A: a\x00b\r\n", b"control character in header field value"),
        (b"Host: x\r\nX-A: a\x01b\r\n", b"control character in header field value"),
        (b"Host: x\r\nX-A: a\rb\r\n", b"control character in header field value"),
    ],
)
def test_badHeaderIs400AndCloses(headerLines: bytes, reason: bytes) -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\r\n" + headerLines + b"\r\n")
    assert c.received().startswith(b"HTTP/1.1 400 ")
    [(_, _, body)] = c.responses()
    assert body == b"bad request: " + reason + b"\n"
    assert c.closed()
    assert c.reactor.tcpClients == []


def test_originFormWithoutXTargetHostIs403WithJavaText() -> None:
    c = Client()
    c.send(b"GET /v1/accounts?x=1 HTTP/1.1\r\nHost: proxy.local\r\n\r\n")
    [(statusLine, fields, body)] = c.responses()
    assert statusLine == b"HTTP/1.1 403 Forbidden"
    assert body == b"you have to include x-target-host header\n"
    assert body == MISSING_TARGET_HOST.encode() + b"\n"
    assert field(fields, b"content-type") == [b"text/plain; charset=utf-8"]
    assert len(c.accessLog.records) == 1
    record = c.accessLog.records[0]
    assert record["status"] == 403
    assert record["method"] == "GET"
    assert record["target"] == "/v1/accounts?x=1"
    assert record["client"] == "127.0.0.1:5555"
    assert record["bytesOut"] == len(body)
    assert c.reactor.tcpClients == []


def test_403ForBodilessRequestKeepsConnectionOpen() -> None:
    """
    A refusal of a request that has no body leaves nothing unread, so the
    connection stays usable: a second request on it is answered too.
    """
    c = Client()
    c.send(b"GET /one HTTP/1.1\r\nHost: proxy.local\r\n\r\n")
    [(statusLine, fields, _)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 403")
    assert field(fields, b"connection") == [], "a bodiless refused request need not close"
    assert not c.closed()
    c.send(b"GET /two HTTP/1.1\r\nHost: proxy.local\r\n\r\n")
    responses = c.responses()
    assert [r[0][:12] for r in responses] == [b"HTTP/1.1 403", b"HTTP/1.1 403"]
    assert [r["target"] for r in c.accessLog.records] == ["/one", "/two"]
    assert [r["status"] for r in c.accessLog.records] == [403, 403]


def test_403ForRequestWhoseBodyHasNotArrivedCloses() -> None:
    c = Client()
    c.send(b"POST /x HTTP/1.1\r\nHost: proxy.local\r\nContent-Length: 5\r\n\r\n")
    [(statusLine, fields, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 403")
    assert body == MISSING_TARGET_HOST.encode() + b"\n"
    assert field(fields, b"connection") == [b"close"]
    c.send(b"hello")
    assert c.closed()
    assert [r["status"] for r in c.accessLog.records] == [403]
    assert c.accessLog.records[0]["bytesIn"] == 0, "a refused body is dropped, not counted as relayed"


def test_twoXTargetHostHeadersIs400() -> None:
    c = Client()
    c.send(
        b"GET /x HTTP/1.1\r\nHost: p\r\nx-target-host: http://127.0.0.1:8080\r\n"
        b"X-Target-Host: http://127.0.0.1:8081\r\n\r\n"
    )
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 400")
    assert b"more than one x-target-host" in body
    assert c.accessLog.records[0]["status"] == 400
    assert c.reactor.tcpClients == []


def test_clientNotInAllowListIs403() -> None:
    c = Client(settingsWith(client_allow=(ipaddress.ip_network("10.0.0.0/8"),)))
    c.send(b"GET http://127.0.0.1:8080/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
    [(statusLine, _, body)] = c.responses()
    assert statusLine == b"HTTP/1.1 403 Forbidden"
    assert body == b"client address not allowed\n"
    assert c.accessLog.records[0]["status"] == 403
    assert c.reactor.tcpClients == [], "a refused client must not reach an origin"


def test_clientNotInAllowListIs403EvenWithXTargetHost() -> None:
    c = Client(
        settingsWith(client_allow=(ipaddress.ip_network("10.0.0.0/8"),)),
        peer=IPv6Address("TCP", "::1", 5555),
    )
    c.send(b"GET /x HTTP/1.1\r\nHost: p\r\nx-target-host: http://127.0.0.1:8080\r\n\r\n")
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 403")
    assert body == b"client address not allowed\n"
    assert c.reactor.tcpClients == []


def completeUpstream(c: Client, index: int = 0) -> StringTransport:
    """Complete an outgoing connection the proxy started, in memory."""
    host, port, factory = c.reactor.tcpClients[index][:3]
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    transport.protocol = protocol
    return transport


def test_allowedClientAbsoluteFormIsRelayed() -> None:
    c = Client(settingsWith(client_allow=(ipaddress.ip_network("127.0.0.0/8"),)))
    c.send(
        b"GET http://127.0.0.1:8080/a%2Fb;c?d=e+f HTTP/1.1\r\nHost: ignored\r\n"
        b"Connection: X-Hop\r\nX-Hop: 1\r\nProxy-Authorization: Basic x\r\n"
        b"X-Keep: 2\r\n\r\n"
    )
    assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", 8080)]
    origin = completeUpstream(c)
    head = origin.value()
    assert head == (
        b"GET /a%2Fb;c?d=e+f HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\n"
        b"X-Keep: 2\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\n"
        b"Via: 1.1 mydataproxy\r\n"
        b"\r\n"
    )
    origin.protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\nX-Secret: s\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok"
    )
    [(statusLine, fields, body)] = c.responses()
    assert statusLine == b"HTTP/1.1 200 OK"
    assert body == b"ok"
    assert field(fields, b"x-secret") == []
    assert field(fields, b"set-cookie") == [b"a=1", b"b=2"]
    assert field(fields, b"via") == [b"1.1 mydataproxy"]
    assert not c.closed()
    [record] = c.accessLog.records
    assert record["status"] == 200
    assert record["target"] == "http://127.0.0.1:8080/a%2Fb;c?d=e+f"
    assert record["upstream"] == "127.0.0.1:8080"


def test_headerRoutedRequestIsRelayedWithBasePath() -> None:
    c = Client()
    c.send(
        b"GET /v1/x?y=%2F HTTP/1.1\r\nHost: proxy.local:9000\r\n"
        b"x-target-host: http://127.0.0.1:8080/base/\r\n\r\n"
    )
    assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", 8080)]
    origin = completeUpstream(c)
    lines = origin.value().split(b"\r\n")
    assert lines[0] == b"GET /base/v1/x?y=%2F HTTP/1.1"
    assert lines[1] == b"Host: 127.0.0.1:8080"
    assert not any(line.lower().startswith(b"x-target-host") for line in lines)
    origin.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.received().startswith(b"HTTP/1.1 204 No Content\r\n")
    [record] = c.accessLog.records
    assert (record["status"], record["target"]) == (204, "http://127.0.0.1:8080/base/v1/x?y=%2F")


def test_connectToPortNotAllowedIs403() -> None:
    c = Client()
    problem = None
    try:
        c.send(b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n")
    except Exception as e:  # reported below, after the response is checked
        problem = e
    assert c.received().startswith(b"HTTP/1.1 403 Forbidden\r\n")
    [(_, fields, body)] = c.responses()
    assert body == b"CONNECT to port 25 is not allowed\n"
    assert field(fields, b"connection") == [b"close"]
    assert c.closed()
    assert c.reactor.tcpClients == []
    assert problem is None, f"dataReceived raised {problem!r} on a refused CONNECT"


def test_connectFromClientNotAllowedIs403() -> None:
    c = Client(settingsWith(client_allow=(ipaddress.ip_network("10.0.0.0/8"),)))
    problem = None
    try:
        c.send(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n")
    except Exception as e:
        problem = e
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 403")
    assert body == b"client address not allowed\n"
    assert c.reactor.tcpClients == []
    assert problem is None, f"dataReceived raised {problem!r} on a refused CONNECT"


def test_connectAllowedOpensTunnel() -> None:
    c = Client(settingsWith(connect_ports=frozenset({8443})))
    c.send(b"CONNECT 127.0.0.1:8443 HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n")
    assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", 8443)]
    origin = completeUpstream(c)
    assert c.received() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    c.send(b"\x16\x03\x01 client hello")
    assert origin.value() == b"\x16\x03\x01 client hello"
    origin.protocol.dataReceived(b"server bytes")
    assert c.received().endswith(b"server bytes")
    c.lose()
    [record] = c.accessLog.records
    assert (record["method"], record["status"], record["target"]) == ("CONNECT", 200, "127.0.0.1:8443")


def test_clientGoneMidResponseIsLoggedAndClosesTheOrigin() -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/big HTTP/1.1\r\nHost: x\r\n\r\n")
    origin = completeUpstream(c)
    origin.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    c.lose()
    [record] = c.accessLog.records
    assert (record["status"], record["bytesOut"], record["upstream"]) == (200, 10, "127.0.0.1:8080")
    assert origin.disconnecting, "a half-read response must not go back to the pool"
    assert c.pool.openConnections == 1  # until the origin socket is really gone


def test_loopbackOriginIsRefusedByTheGuardWithoutARule() -> None:
    c = Client(Settings())
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: x\r\n\r\n")
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 403")
    assert body == b"destination not allowed\n"
    assert c.reactor.tcpClients == []
    [record] = c.accessLog.records
    assert record["status"] == 403


# ---------------------------------------------------------------------------
# The channel's own parser: limits before the head is complete, lingering
# ---------------------------------------------------------------------------


def test_longRequestLineIs414BeforeItEnds() -> None:
    c = Client(settingsWith())
    c.send(b"GET http://127.0.0.1:8080/" + b"a" * (c.proxy.limits.max_uri_bytes + 100))
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 414")
    assert c.closed()
    [record] = c.accessLog.records
    assert record["status"] == 414


def test_bareLFHeadIs400() -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\nHost: x\n\n")
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 400")
    assert body == b"bad request: bare LF in request head\n"


def test_refusedBodyIsDroppedForABoundedAmountThenClosed() -> None:
    c = Client()
    c.send(b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 100000000\r\n\r\n")
    assert c.received().startswith(b"HTTP/1.1 403")
    assert not c.transport.disconnecting, "lingers first, so the client reads the answer"
    for _ in range(LINGER_BYTES // 65536):
        c.send(b"x" * 65536)
    assert not c.transport.disconnecting
    c.send(b"x" * 65536)
    assert c.transport.disconnecting, "past the linger bound the connection closes"


def test_pipelinedRequestsWaitForTheResponseInProgress() -> None:
    c = Client()
    c.send(
        b"GET http://127.0.0.1:8080/one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert c.accessLog.records == [], "the second waits until the first is answered"
    origin = completeUpstream(c)
    origin.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [r["target"] for r in c.accessLog.records] == ["http://127.0.0.1:8080/one", "/two"]
    assert [r[0][:12] for r in c.responses()] == [b"HTTP/1.1 200", b"HTTP/1.1 403"]


def test_originFramingIsReplacedByTheProxys() -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: x\r\n\r\n")
    origin = completeUpstream(c)
    origin.protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok"
    )
    [(_, fields, body)] = c.responses()
    assert field(fields, b"content-length") == [b"2"] and body == b"ok"


def test_clientBackPressureStopsTheIdleTimeout() -> None:
    c = Client(settingsWith(client_idle_timeout=5.0))
    c.send(b"POST http://127.0.0.1:8080/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    c.channel.pauseReading("body")
    c.reactor.advance(10)
    assert not c.transport.disconnecting, "a client we don't read from is not idle"
    c.channel.resumeReading("body")
    c.reactor.advance(6)
    assert c.transport.disconnecting


# ---------------------------------------------------------------------------
# Second review: write back-pressure, HEAD answers, held bodies, half-close
# ---------------------------------------------------------------------------


def test_noRequestIsParsedWhileTheClientDoesNotRead() -> None:
    """
    A client that pipelines without reading must not make us buffer
    answers: while its write buffer is full, nothing more is parsed.
    """
    c = Client()
    assert c.transport.producer is c.channel, "the channel paces all writes"
    c.channel.pauseProducing()  # the transport's write buffer is full
    c.send(b"GET /one HTTP/1.1\r\nHost: p\r\n\r\n" * 3)
    assert c.received() == b"", "answers were produced for a client that does not read"
    assert c.transport.producerState == "paused", "reading goes on from a client that does not read"
    c.channel.resumeProducing()
    assert [r[0][:12] for r in c.responses()] == [b"HTTP/1.1 403"] * 3


def test_ownAnswerToHEADHasNoBody() -> None:
    c = Client()
    c.send(b"HEAD /x HTTP/1.1\r\nHost: p\r\n\r\nGET /y HTTP/1.1\r\nHost: p\r\n\r\n")
    data = c.received()
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 403") and b"Content-Length: 41" in first
    assert rest.startswith(b"HTTP/1.1 403"), f"a body followed the HEAD answer: {rest[:60]!r}"


class UnansweredResolver:
    """A resolver whose lookups fail when the test says so."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def known(self, host: str) -> None:
        return None

    def resolve(self, host: str) -> defer.Deferred:
        self.pending.append(defer.Deferred())
        return self.pending[-1]


def test_resolutionFailureWithHeldBodyLeavesTheConnectionReadable() -> None:
    c = Client()
    resolver = c.pipeline.resolver = UnansweredResolver()
    body = b"x" * 100_000  # more than the exchange holds before pausing the client
    c.send(b"POST http://origin.test/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert c.transport.producerState == "paused"
    resolver.pending[0].errback(DNSLookupError("origin.test"))
    assert c.received().startswith(b"HTTP/1.1 502"), c.received()[:200]
    assert c.transport.producerState == "producing", "the next request on this connection would never be read"


def test_truncatedResponseGetsItsAccessLine() -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: x\r\n\r\n")
    origin = completeUpstream(c)
    origin.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    origin.protocol.connectionLost(Failure(ConnectionLost()))
    assert c.transport.disconnected, "a cut response is a cut connection"
    c.lose()
    [record] = c.accessLog.records
    assert (record["status"], record["bytesOut"]) == (200, 10)


def test_pipelinedRequestsBeforeAHalfCloseAreAllAnswered() -> None:
    c = Client()
    c.send(
        b"GET http://127.0.0.1:8080/one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    c.channel.readConnectionLost()
    origin = completeUpstream(c)
    origin.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [r[0][:12] for r in c.responses()] == [b"HTTP/1.1 200", b"HTTP/1.1 403"]
    assert c.transport.disconnecting


def test_closedConnectionThatIsNotReadIsCutAfterADeadline() -> None:
    c = Client()
    c.send(b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert c.transport.disconnecting and not c.transport.disconnected
    c.reactor.advance(CLOSE_SECONDS)
    assert c.transport.disconnected, "a client that never reads must not hold the connection forever"


def test_refusedTunnelLingersInsteadOfResetting() -> None:
    c = Client()
    c.send(b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n\x16\x03\x01 hello")
    assert c.received().startswith(b"HTTP/1.1 403")
    assert not c.transport.disconnecting, "the client's early bytes are drained first"
    assert c.closed()


def test_twoHostFieldsAre400() -> None:
    c = Client()
    c.send(b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    [(statusLine, _, body)] = c.responses()
    assert statusLine.startswith(b"HTTP/1.1 400")
    assert body == b"bad request: more than one Host field\n"


# Draining (reload, SIGTERM): which connections close when.


@pytest.mark.parametrize("served", [0, 1])
def test_drainLetsAnIdleConnectionSendOneMoreRequest(served: int) -> None:
    """
    Idle between requests (or not yet sent its first): its client may have
    the next request on the way; it is answered, with the close.
    """
    c = Client()
    for _ in range(served):
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    c.proxy.drain()
    c.reactor.advance(DRAIN_GRACE_SECONDS / 2)
    assert not c.transport.disconnecting
    c.send(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    responses = c.responses()
    assert len(responses) == served + 1 and all(r[0].startswith(b"HTTP/1.1 403") for r in responses)
    assert field(responses[-1][1], b"connection") == [b"close"]
    assert c.closed()


@pytest.mark.parametrize("served", [0, 1])
def test_drainClosesAnIdleConnectionThatSendsNothingMore(served: int) -> None:
    c = Client()
    for _ in range(served):
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    sent = c.received()
    c.proxy.drain()
    c.reactor.advance(DRAIN_GRACE_SECONDS - 0.1)
    assert not c.transport.disconnecting
    c.reactor.advance(0.2)
    assert c.transport.disconnecting and c.received() == sent
