"""
Unit tests of the reverse listener (L{mydataproxy.reverse.listener}) and its
requests (L{mydataproxy.reverse.request}): a L{ReverseProxy} whose client
connection is a L{StringTransport} and whose backend connections are those
of a L{MemoryReactorClock}, completed in memory (no sockets, no reactor
running).  What a backend receives is checked byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.config import OriginTLSProfile, Settings, settingsFromMapping
from mydataproxy.egress.resolver import Resolver
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.reverse.listener import ReverseProxy
from mydataproxy.server.channel import LINGER_SECONDS
from mydataproxy.tls.contexts import OriginTLS
from mydataproxy.upstream.client import UpstreamPool

ORIGIN_TLS = OriginTLS(OriginTLSProfile(), ())
LISTEN_PORT = 8080
CLIENT = IPv4Address("TCP", "192.0.2.10", 5555)
FRONT = IPv4Address("TCP", "127.0.0.1", 40000)

API = {"name": "api", "prefix": "/api/", "backends": ["http://127.0.0.1:8001/base/"]}


def reverseSettings(*routes: dict, **reverse) -> Settings:
    """Settings as the loader makes them from C{[reverse]} with C{routes}."""
    table = {"routes": list(routes or [API]), **reverse}
    return settingsFromMapping({"reverse": table}, "<test>", "", Path("."))


class AccessRecorder:
    """Stands in for L{mydataproxy.ops.logs.AccessLog}: remembers each record."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def record(self, **kw) -> None:
        self.records.append(kw)


class Client:
    """
    One client connection to a L{ReverseProxy}, all in memory: a new
    listener, or another connection to the listener of C{sibling}.
    """

    def __init__(self, settings: Settings | None = None, peer: IPv4Address = CLIENT, sibling: Client | None = None) -> None:
        if sibling is not None:
            self.reactor, self.pool, self.accessLog = sibling.reactor, sibling.pool, sibling.accessLog
            self.pipeline, self.proxy = sibling.pipeline, sibling.proxy
        else:
            settings = settings or reverseSettings()
            self.reactor = MemoryReactorClock()
            self.pool = UpstreamPool(self.reactor, settings.upstream, ORIGIN_TLS)
            self.accessLog = AccessRecorder()
            self.pipeline = RequestPipeline(settings, Resolver(self.reactor, settings.resolver), None, self.reactor)
            self.proxy = ReverseProxy(settings, self.pipeline, self.pool, self.accessLog, self.reactor)
        self.channel = self.proxy.buildProtocol(peer)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", LISTEN_PORT), peerAddress=peer
        )
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def response(self) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """The one response written so far: (status line, fields, body)."""
        head, sep, body = self.received().partition(b"\r\n\r\n")
        assert sep, f"incomplete response head {head!r}"
        statusLine, *lines = head.split(b"\r\n")
        fields = [(name, value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
        [length] = [int(v) for n, v in fields if n.lower() == b"content-length"] or [len(body)]
        assert len(body) == length, f"body of {len(body)} bytes, Content-Length {length}"
        return statusLine, fields, body

    def closed(self) -> bool:
        """Has the proxy closed the connection, lingering included?"""
        self.reactor.advance(LINGER_SECONDS)
        return self.transport.disconnecting

    def backend(self, index: int = 0) -> StringTransport:
        """Complete the C{index}th backend connection the proxy started, in memory."""
        host, port, factory = self.reactor.tcpClients[index][:3]
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        transport.protocol = protocol
        return transport

    def refuseBackend(self, index: int = 0) -> None:
        """The C{index}th backend connection attempt is refused."""
        connector = self.reactor.connectors[index]
        self.reactor.tcpClients[index][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def field(fields, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name.lower()]


# ---------------------------------------------------------------------------
# The request a backend receives
# ---------------------------------------------------------------------------


def test_requestReachesTheBackendWithThePrefixReplaced() -> None:
    c = Client()
    c.send(
        b"GET /api/x%2Fy;p?q=1&r=/?s HTTP/1.1\r\n"
        b"Host: www.example.com\r\n"
        b"Connection: X-Hop, keep-alive\r\n"
        b"X-Hop: 1\r\n"
        b"Keep-Alive: 300\r\n"
        b"Proxy-Authorization: Basic eDp5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Port: 1\r\n"
        b"Forwarded: for=6.6.6.6\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"Via: 1.0 apache\r\n"
        b"X-Keep: 2\r\n"
        b"x-api-tran-id: abc\r\n"
        b"\r\n"
    )
    assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", 8001)]
    backend = c.backend()
    assert backend.value() == (
        b"GET /base/x%2Fy;p?q=1&r=/?s HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8001\r\n"
        b"X-Keep: 2\r\n"
        b"x-api-tran-id: abc\r\n"
        b"X-Forwarded-For: 192.0.2.10\r\n"
        b"X-Forwarded-Host: www.example.com\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Port: 8080\r\n"
        b'Forwarded: for=192.0.2.10;proto=http;host="www.example.com"\r\n'
        b"Via: 1.0 apache, 1.1 mydataproxy\r\n"
        b"\r\n"
    )
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\nX-Secret: s\r\n\r\nok")
    statusLine, fields, body = c.response()
    assert (statusLine, body) == (b"HTTP/1.1 200 OK", b"ok")
    assert field(fields, b"x-secret") == []
    assert field(fields, b"via") == [b"1.1 mydataproxy"]
    assert not c.closed()
    [record] = c.accessLog.records
    assert (record["status"], record["method"], record["upstream"]) == (200, "GET", "127.0.0.1:8001")
    assert record["client"] == "192.0.2.10:5555"
    assert record["target"] == "http://www.example.com/api/x%2Fy;p?q=1&r=/?s"


def test_trustedFrontIsBelievedAndItsChainReplaced() -> None:
    c = Client(reverseSettings(trusted_proxies=["127.0.0.1/32"]), peer=FRONT)
    c.send(
        b"GET /api/ HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\n"
        b"X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\n"
        b"X-Forwarded-Host: www.example.com\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Port: 443\r\n"
        b"X-Forwarded-Server: apache.internal\r\n"
        b"\r\n"
    )
    assert c.backend().value() == (
        b"GET /base/ HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8001\r\n"
        b"X-Forwarded-Server: apache.internal\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\n"
        b"X-Forwarded-Host: www.example.com\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Port: 443\r\n"
        b'Forwarded: for=203.0.113.9;proto=https;host="www.example.com"\r\n'
        b"Via: 1.1 mydataproxy\r\n"
        b"\r\n"
    )


def test_preserveHostSendsTheClientsHost() -> None:
    c = Client(reverseSettings({**API, "preserve_host": True}))
    c.send(b"GET /api/x HTTP/1.1\r\nHost: WWW.Example.com:8443\r\n\r\n")
    lines = c.backend().value().split(b"\r\n")
    assert lines[:2] == [b"GET /base/x HTTP/1.1", b"Host: WWW.Example.com:8443"]


def test_requestBodyIsFramedByTheProxy() -> None:
    c = Client()
    c.send(b"POST /api/form HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello")
    assert c.backend().value() == (
        b"POST /base/form HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8001\r\n"
        b"Content-Type: text/plain\r\n"
        b"X-Forwarded-For: 192.0.2.10\r\n"
        b"X-Forwarded-Host: h\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Port: 8080\r\n"
        b'Forwarded: for=192.0.2.10;proto=http;host="h"\r\n'
        b"Via: 1.1 mydataproxy\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello"
    )


def test_longestPrefixAndVirtualHostPickTheBackend() -> None:
    settings = reverseSettings(
        {"name": "root", "prefix": "/", "backends": ["http://127.0.0.1:8010/"]},
        API,
        {"name": "www", "prefix": "/", "hosts": ["www.example.com"], "backends": ["http://127.0.0.1:8020/www/"]},
    )
    for host, target, port, line in [
        (b"other.example", b"/api/x", 8001, b"GET /base/x HTTP/1.1"),
        (b"other.example", b"/apix", 8010, b"GET /apix HTTP/1.1"),
        (b"www.example.com:80", b"/api/x", 8020, b"GET /www/api/x HTTP/1.1"),
    ]:
        c = Client(settings)
        c.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
        assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", port)]
        assert c.backend().value().split(b"\r\n")[0] == line


# ---------------------------------------------------------------------------
# What the proxy answers itself
# ---------------------------------------------------------------------------


def test_noRouteIs404() -> None:
    c = Client()
    c.send(b"GET /nope?secret=1 HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    statusLine, fields, body = c.response()
    assert statusLine == b"HTTP/1.1 404 Not Found"
    assert body == b"no route for /nope on www.example.com\n"
    assert field(fields, b"content-type") == [b"text/plain; charset=utf-8"]
    assert c.reactor.tcpClients == []
    [record] = c.accessLog.records
    assert record["status"] == 404
    assert not c.closed(), "a bodiless refused request keeps the connection"


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"/api/%2e%2e/x", b"bad request: dot segment in the path"),
        (b"/api/..%2fx", b"bad request: dot segment in the path"),
        (b"/api//x", b"bad request: empty segment (//) in the path"),
        (b"/api/%00", b"bad request: encoded control character in the request target"),
        (b"http://127.0.0.1:8001/base/x", b"bad request: the reverse proxy takes origin-form targets (/path) only"),
        (b"*", b"bad request: the reverse proxy takes origin-form targets (/path) only"),
    ],
)
def test_badTargetIs400AndNeverForwarded(target: bytes, reason: bytes) -> None:
    c = Client()
    c.send(b"GET %s HTTP/1.1\r\nHost: www.example.com\r\n\r\n" % target)
    statusLine, _, body = c.response()
    assert statusLine == b"HTTP/1.1 400 Bad Request"
    assert body == reason + b"\n"
    assert c.reactor.tcpClients == []
    assert c.accessLog.records[0]["status"] == 400


@pytest.mark.parametrize(
    "hosts, reason",
    [
        (b"", b"bad request: no Host"),
        (b"Host: a\r\nHost: b\r\n", b"bad request: more than one Host"),
        (b"Host: a b\r\n", b"bad request: invalid Host"),
    ],
)
def test_badHostIs400(hosts: bytes, reason: bytes) -> None:
    c = Client()
    c.send(b"GET /api/x HTTP/1.1\r\n" + hosts + b"\r\n")
    statusLine, _, body = c.response()
    assert statusLine.startswith(b"HTTP/1.1 400 ")
    assert body.startswith(b"bad request: ")
    assert c.reactor.tcpClients == []


def test_connectIs405() -> None:
    c = Client()
    c.send(b"CONNECT 127.0.0.1:8001 HTTP/1.1\r\nHost: 127.0.0.1:8001\r\n\r\n")
    statusLine, _, body = c.response()
    assert statusLine == b"HTTP/1.1 405 Method Not Allowed"
    assert body == b"CONNECT is not served by the reverse proxy\n"
    assert c.reactor.tcpClients == []
    assert c.accessLog.records[0]["status"] == 405


def test_405SaysWhatIsAllowed() -> None:
    """RFC 9110 15.5.6: a 405 response MUST carry Allow."""
    c = Client()
    c.send(b"CONNECT 127.0.0.1:8001 HTTP/1.1\r\nHost: 127.0.0.1:8001\r\n\r\n")
    _, fields, _ = c.response()
    allow = field(fields, b"allow")
    assert len(allow) == 1, f"one Allow field expected in {fields!r}"
    assert b"CONNECT" not in allow[0] and b"GET" in allow[0]


def test_bodyOverTheRoutesLimitIs413() -> None:
    c = Client(reverseSettings({**API, "max_body_bytes": 10}))
    c.send(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    statusLine, fields, body = c.response()
    assert statusLine == b"HTTP/1.1 413 Request Entity Too Large"
    assert body == b"request body too large\n"
    assert field(fields, b"connection") == [b"close"]
    assert c.reactor.tcpClients == []
    c.send(b"x" * 11)
    assert c.closed()


def test_bodyAtTheRoutesLimitIsForwarded() -> None:
    c = Client(reverseSettings({**API, "max_body_bytes": 10}))
    c.send(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789")
    assert c.backend().value().endswith(b"\r\n\r\n0123456789")


def test_chunkedBodyOverTheRoutesLimitIs413() -> None:
    """The route's limit holds for a body without Content-Length too."""
    c = Client(reverseSettings({**API, "max_body_bytes": 10}))
    c.send(b"POST /api/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + b"b\r\n" + b"x" * 11 + b"\r\n0\r\n\r\n")
    relayed = c.backend().value() if c.reactor.tcpClients else b""
    assert b"x" * 11 not in relayed, "the backend got a body over the route's max_body_bytes"
    statusLine, _, _ = c.response()
    assert statusLine == b"HTTP/1.1 413 Request Entity Too Large"


def test_otherRoutesKeepTheGlobalLimit() -> None:
    settings = reverseSettings({**API, "max_body_bytes": 10}, {"name": "up", "prefix": "/up/", "backends": ["http://127.0.0.1:8002/"]})
    c = Client(settings)
    c.send(b"POST /up/x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n" + b"x" * 11)
    assert c.backend().value().endswith(b"\r\n\r\n" + b"x" * 11)


def test_refusedBackendIs502() -> None:
    c = Client()
    c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    c.refuseBackend()
    statusLine, fields, body = c.response()
    assert statusLine.startswith(b"HTTP/1.1 502 ")
    assert field(fields, b"content-type") == [b"text/plain; charset=utf-8"]
    assert c.accessLog.records[0]["status"] == 502
    assert c.proxy.groups["api"].backends[0].down


def test_idempotentRequestIsRetriedOnAnotherBackend() -> None:
    c = Client(reverseSettings({**API, "backends": ["http://127.0.0.1:8001/base/", "http://127.0.0.1:8002/base/"]}))
    c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    c.refuseBackend(0)
    assert [t[:2] for t in c.reactor.tcpClients] == [("127.0.0.1", 8001), ("127.0.0.1", 8002)]
    backend = c.backend(1)
    assert backend.value().startswith(b"GET /base/x HTTP/1.1\r\nHost: 127.0.0.1:8002\r\n")
    backend.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.received().startswith(b"HTTP/1.1 204 No Content\r\n")


def test_everyBackendDownIs503WithRetryAfter() -> None:
    c = Client(reverseSettings({**API, "eject_seconds": 4.0}))
    c.proxy.groups["api"].markDown(c.proxy.groups["api"].backends[0], "connection refused")
    c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    statusLine, fields, body = c.response()
    assert statusLine == b"HTTP/1.1 503 Service Unavailable"
    assert body == b"every backend of route api is down\n"
    assert field(fields, b"retry-after") == [b"4"]
    assert c.reactor.tcpClients == []


def test_waitingRoomHoldsTheRequestBeyondTheCap() -> None:
    first = Client(reverseSettings({**API, "max_concurrent": 1, "queue_size": 1, "queue_timeout": 5.0}))
    second, third = Client(sibling=first), Client(sibling=first)
    first.send(b"GET /api/one HTTP/1.1\r\nHost: h\r\n\r\n")
    second.send(b"GET /api/two HTTP/1.1\r\nHost: h\r\n\r\n")
    third.send(b"GET /api/three HTTP/1.1\r\nHost: h\r\n\r\n")
    statusLine, fields, body = third.response()
    assert statusLine == b"HTTP/1.1 503 Service Unavailable"
    assert body == b"route api is busy: waiting room full\n"
    assert field(fields, b"retry-after") == [b"5"]
    assert len(first.reactor.tcpClients) == 1, "the second request waits for the first"
    backend = first.backend()
    assert backend.value().startswith(b"GET /base/one HTTP/1.1\r\n")
    backend.clear()
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert first.response()[2] == b"1"
    assert second.received() == b""
    assert backend.value().startswith(b"GET /base/two HTTP/1.1\r\n"), "its turn came, on the same backend connection"
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert second.response()[2] == b"2"
    assert first.proxy.rooms["api"].inFlight == 0


def test_waitingRoomTimeoutIs503() -> None:
    first = Client(reverseSettings({**API, "max_concurrent": 1, "queue_timeout": 5.0}))
    second = Client(sibling=first)
    first.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    second.send(b"GET /api/y HTTP/1.1\r\nHost: h\r\n\r\n")
    first.reactor.advance(5.0)
    statusLine, fields, body = second.response()
    assert statusLine == b"HTTP/1.1 503 Service Unavailable"
    assert body == b"route api is busy: no turn within 5 s\n"
    assert field(fields, b"retry-after") == [b"5"]
    assert len(first.reactor.tcpClients) == 1


def test_clientGoneWhileWaitingLeavesTheRoom() -> None:
    first = Client(reverseSettings({**API, "max_concurrent": 1}))
    second, third = Client(sibling=first), Client(sibling=first)
    first.send(b"GET /api/one HTTP/1.1\r\nHost: h\r\n\r\n")
    second.send(b"GET /api/two HTTP/1.1\r\nHost: h\r\n\r\n")
    third.send(b"GET /api/three HTTP/1.1\r\nHost: h\r\n\r\n")
    second.channel.connectionLost(Failure(ConnectionDone()))
    room = first.proxy.rooms["api"]
    assert (room.inFlight, room.waiting) == (1, 1)
    backend = first.backend()
    backend.clear()
    backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert (room.inFlight, room.waiting) == (1, 0)
    assert backend.value().startswith(b"GET /base/three HTTP/1.1\r\n"), "the third request has the turn"
    targets = [record["target"] for record in first.accessLog.records]
    assert targets == ["http://h/api/two", "http://h/api/one"], "the client that left has its access line too"


# ---------------------------------------------------------------------------
# ProxyPassReverse on the response
# ---------------------------------------------------------------------------


def test_locationAndCookiesAreMadePublic() -> None:
    c = Client(reverseSettings({**API, "cookie_domain": "www.example.com"}))
    c.send(b"GET /api/login HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    backend = c.backend()
    backend.protocol.dataReceived(
        b"HTTP/1.1 302 Found\r\n"
        b"Location: http://127.0.0.1:8001/base/home?x=1\r\n"
        b"Content-Location: /base/login\r\n"
        b"Set-Cookie: SID=1; Path=/base/; Domain=127.0.0.1; HttpOnly\r\n"
        b"Set-Cookie: other=2; Path=/elsewhere\r\n"
        b"Link: <http://127.0.0.1:8001/base/x>\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    )
    statusLine, fields, _ = c.response()
    assert statusLine == b"HTTP/1.1 302 Found"
    assert field(fields, b"location") == [b"http://www.example.com/api/home?x=1"]
    assert field(fields, b"content-location") == [b"/api/login"]
    assert field(fields, b"set-cookie") == [
        b"SID=1; Path=/api/; Domain=www.example.com; HttpOnly",
        b"other=2; Path=/elsewhere",
    ]
    assert field(fields, b"link") == [b"<http://127.0.0.1:8001/base/x>"]


def test_locationUsesTheTrustedFrontsOrigin() -> None:
    c = Client(reverseSettings(trusted_proxies=["127.0.0.1/32"]), peer=FRONT)
    c.send(
        b"GET /api/login HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"X-Forwarded-Host: www.example.com\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    c.backend().protocol.dataReceived(
        b"HTTP/1.1 303 See Other\r\nLocation: http://127.0.0.1:8001/base/home\r\nContent-Length: 0\r\n\r\n"
    )
    _, fields, _ = c.response()
    assert field(fields, b"location") == [b"https://www.example.com/api/home"]


def test_untrustedFrontsOriginIsNotUsed() -> None:
    c = Client()
    c.send(
        b"GET /api/login HTTP/1.1\r\nHost: www.example.com\r\n"
        b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    c.backend().protocol.dataReceived(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:8001/base/home\r\nContent-Length: 0\r\n\r\n"
    )
    _, fields, _ = c.response()
    assert field(fields, b"location") == [b"http://www.example.com/api/home"]
