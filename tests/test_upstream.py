"""Unit tests of the upstream client and pool, on in-memory transports."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mydataproxy.config import UpstreamSettings
from mydataproxy.config import OriginTLSProfile
from mydataproxy.tls import OriginTLS
from mydataproxy.upstream import (
    BodyFraming,
    Destination,
    InvalidResponse,
    UpstreamError,
    UpstreamExchange,
    UpstreamPool,
    parseResponseHead,
)

ORIGIN_TLS = OriginTLS(OriginTLSProfile(), ())

ORIGIN = Destination("http", "127.0.0.1", 8080, ("127.0.0.1",))
HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


class Recorder:
    """A ResponseReceiver that remembers what it was told."""

    def __init__(self) -> None:
        self.started: tuple | None = None
        self.body: list[bytes] = []
        self.finished = False
        self.failure: UpstreamError | None = None

    def responseStarted(self, status, reason, headers, bodyLength, declaredLength) -> None:
        self.started = (status, reason, headers, bodyLength)
        self.declaredLength = declaredLength

    def responseData(self, data: bytes) -> None:
        self.body.append(data)

    def responseFinished(self) -> None:
        self.finished = True

    def responseFailed(self, failure: UpstreamError) -> None:
        self.failure = failure


class ClientSocket:
    """Stands in for the client's socket as the request-body producer."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        raise AssertionError("the client socket must not be stopped by the origin side")


class Harness:
    def __init__(self, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, UpstreamSettings(**settings), ORIGIN_TLS)
        self.transports: list[StringTransport] = []

    def exchange(self, framing=BodyFraming.NONE, method=b"GET", head=HEAD):
        receiver = Recorder()
        client = ClientSocket()
        exchange = UpstreamExchange(self.pool, head, framing, method, receiver, client)
        exchange.start(ORIGIN)
        return exchange, receiver, client

    def connectPending(self) -> StringTransport:
        """Complete the most recent outgoing TCP connection in memory."""
        factory = self.reactor.tcpClients[len(self.transports)][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return transport


def test_contentLengthResponseIsRelayedAndConnectionReused() -> None:
    h = Harness()
    _, first, _ = h.exchange()
    transport = h.connectPending()
    assert transport.value() == HEAD
    transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhel")
    transport.protocol.dataReceived(b"lo")
    assert first.started == (200, b"OK", [(b"Content-Length", b"5"), (b"X-A", b"1"), (b"X-A", b"2")], 5)
    assert b"".join(first.body) == b"hello"
    assert first.finished

    transport.clear()
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 1, "a second connection was opened instead of reusing"
    assert transport.value() == HEAD
    transport.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert second.started[0] == 204 and second.finished and second.body == []


def test_chunkedResponseWithExtensionsAndTrailers() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    for piece in [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"4;name=val\r\nWiki\r\n",
        b"5\r\npe",
        b"dia\r\n0\r\nX-Trailer: t\r\n\r\n",
    ]:
        t.protocol.dataReceived(piece)
    assert b"".join(r.body) == b"Wikipedia"
    assert r.finished


def test_closeDelimitedResponseEndsAtCloseAndIsNotReused() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome bytes")
    assert not r.finished
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert r.finished and b"".join(r.body) == b"some bytes"
    h.exchange()
    assert len(h.reactor.tcpClients) == 2


@pytest.mark.parametrize("status", [204, 304])
def test_noBodyStatuses(status: int) -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert r.finished and r.started[3] == 0


def test_headResponseHasNoBodyDespiteContentLength() -> None:
    h = Harness()
    _, r, _ = h.exchange(method=b"HEAD")
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert r.finished and r.started[3] == 0


def test_interimResponsesAreSkipped() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
    assert r.started is None
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert r.started[0] == 200 and r.finished


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_malformedResponsesAre502(response: bytes) -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(response)
    assert r.failure is not None and r.failure.status == 502
    assert "invalid response" in r.failure.reason
    assert t.disconnecting


def test_parseResponseHeadKeepsOrderAndSpelling() -> None:
    version, status, reason, fields = parseResponseHead(
        b"HTTP/1.0 404 Not Found\r\nset-cookie: a=1\r\nX-Y:  spaced \r\nSet-Cookie: b=2\r\n"
    )
    assert (version, status, reason) == (b"HTTP/1.0", 404, b"Not Found")
    assert fields == [(b"set-cookie", b"a=1"), (b"X-Y", b"spaced"), (b"Set-Cookie", b"b=2")]
    with pytest.raises(InvalidResponse):
        parseResponseHead(b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n")
    with pytest.raises(InvalidResponse):
        parseResponseHead(b"HTTP/1.1 200 OK\r\nX: a\rb\r\n")
    assert parseResponseHead(b"HTTP/1.1 200\r\nEmpty:\r\n")[2:] == (b"", [(b"Empty", b"")])


def test_readTimeoutIs504() -> None:
    h = Harness(read_timeout=5.0)
    _, r, _ = h.exchange()
    t = h.connectPending()
    h.reactor.advance(4.9)
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    h.reactor.advance(4.9)
    assert r.failure is None, "activity must reset the read timeout"
    h.reactor.advance(0.2)
    assert r.failure is not None and r.failure.status == 504


def test_pausedResponseDoesNotTimeOut() -> None:
    h = Harness(read_timeout=5.0)
    exchange, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    exchange.pauseProducing()
    assert t.producerState == "paused"
    h.reactor.advance(60)
    assert r.failure is None
    exchange.resumeProducing()
    assert t.producerState == "producing"
    h.reactor.advance(5.1)
    assert r.failure is not None and r.failure.status == 504


def test_staleReusedConnectionIsRetriedForBodylessRequests() -> None:
    h = Harness()
    _, first, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert first.finished
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 1
    t.protocol.connectionLost(Failure(ConnectionDone()))  # the origin had closed the idle connection
    assert second.failure is None
    assert len(h.reactor.tcpClients) == 2, "expected a retry on a fresh connection"
    fresh = h.connectPending()
    assert fresh.value() == HEAD
    fresh.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert second.finished and b"".join(second.body) == b"ok"


def test_freshConnectionClosedWithoutResponseIs502() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert r.failure.status == 502 and "without a response" in r.failure.reason
    assert len(h.reactor.tcpClients) == 1


def test_chunkedRequestBodyFramingAndBackPressureBeforeConnect() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.CHUNKED)
    exchange.writeBody(b"x" * 70000)
    assert client.paused, "client must be paused while the origin connection is pending"
    exchange.writeBody(b"yz")
    exchange.finishBody()
    t = h.connectPending()
    assert not client.paused
    assert t.value() == HEAD + b"11170\r\n" + b"x" * 70000 + b"\r\n2\r\nyz\r\n0\r\n\r\n"


def test_lengthRequestBodyIsWrittenRaw() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.LENGTH)
    t = h.connectPending()
    t.producer.pauseProducing()
    assert client.paused, "the client socket must be paused by a full origin socket"
    t.producer.resumeProducing()
    assert not client.paused
    exchange.writeBody(b"abc")
    exchange.finishBody()
    assert t.value() == HEAD + b"abc"
    assert t.producer is None


def test_poolBoundsWaitersAndWaitTimeout() -> None:
    h = Harness(max_connections_per_destination=1, pool_wait_timeout=2.0)
    _, first, _ = h.exchange()
    t = h.connectPending()
    _, second, _ = h.exchange()
    _, third, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 1
    t.clear()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert first.finished
    assert t.value() == HEAD, "the waiting request should get the released connection"
    h.reactor.advance(2.1)
    assert third.failure is not None and third.failure.status == 503
    assert second.failure is None


def test_connectionClosingResponseIsNotPooled() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert r.finished and t.disconnecting
    h.exchange()
    assert len(h.reactor.tcpClients) == 2


def test_abortClosesTheOriginConnection() -> None:
    h = Harness()
    exchange, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    exchange.abort()
    assert t.disconnecting
    assert h.pool.openConnections == 1  # until the socket actually closes
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.pool.openConnections == 0
    assert r.failure is None, "an aborted exchange reports nothing more"


def test_totalBoundEvictsAnIdleConnectionToAnotherDestination() -> None:
    h = Harness(max_connections_total=1)
    _, first, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert first.finished and not t.disconnecting
    other = Destination("http", "127.0.0.2", 8080, ("127.0.0.2",))
    receiver = Recorder()
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", receiver, ClientSocket()).start(other)
    assert t.disconnecting, "the idle connection should make room"
    assert [c[:2] for c in h.reactor.tcpClients] == [("127.0.0.1", 8080), ("127.0.0.2", 8080)]
    assert h.pool.openConnections == 1
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.pool.openConnections == 1, "an evicted connection is not counted twice"


def test_readTimeoutStartsWhenTheRequestBodyIsComplete() -> None:
    h = Harness(read_timeout=5.0)
    exchange, r, _ = h.exchange(framing=BodyFraming.LENGTH)
    h.connectPending()
    for _ in range(4):
        h.reactor.advance(4)
        exchange.writeBody(b"slow client")
    assert r.failure is None, "a slow upload is not the origin's silence"
    exchange.finishBody()
    h.reactor.advance(5.1)
    assert r.failure is not None and r.failure.status == 504


def test_bodyHeldBeforeStartIsSentAfterIt() -> None:
    h = Harness()
    receiver, client = Recorder(), ClientSocket()
    exchange = UpstreamExchange(h.pool, HEAD, BodyFraming.LENGTH, b"POST", receiver, client)
    exchange.writeBody(b"early")
    exchange.start(ORIGIN)
    t = h.connectPending()
    assert t.value() == HEAD + b"early"


def test_abortBeforeStartLetsAHeldBackClientGo() -> None:
    h = Harness()
    receiver, client = Recorder(), ClientSocket()
    exchange = UpstreamExchange(h.pool, HEAD, BodyFraming.LENGTH, b"POST", receiver, client)
    exchange.writeBody(b"x" * 70000)
    assert client.paused
    exchange.abort()
    assert not client.paused, "a refused request's body must be read (and dropped), not left paused"
    exchange.writeBody(b"more")
    assert h.reactor.tcpClients == []


def test_fullQueueIs503WithRetryAfter() -> None:
    h = Harness(max_connections_per_destination=1, queue_per_destination=1)
    h.exchange()
    h.exchange()
    _, third, _ = h.exchange()
    assert third.failure is not None and third.failure.status == 503
    assert third.failure.retryAfter == 1
    assert (h.pool.queued, h.pool.rejected) == (1, 1)
