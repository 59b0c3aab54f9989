"""Unit tests of the upstream client and pool, on in-memory transports."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mydataproxy.config import UpstreamSettings
from mydataproxy.config import OriginTLSProfile
from mydataproxy.tls.contexts import OriginTLS
from mydataproxy.upstream.client import (
    MAX_CHUNK_LINE,
    PENDING_BODY_LIMIT,
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


def test_closedIdleConnectionIsNotHandedOutWhileClosing() -> None:
    """Draining closes the idle connections: a request meanwhile gets a new one, never a closing one."""
    h = Harness()
    h.exchange()
    transport = h.connectPending()
    transport.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    h.pool.closeIdle()
    assert transport.disconnecting
    transport.clear()
    h.exchange()
    assert transport.value() == b"", "a request was written on a connection being closed"
    assert len(h.reactor.tcpClients) == 2


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


# ---------------------------------------------------------------------------
# Strict framing (issue 7 item 4)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2,\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 16 + b"1\r\nx\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x00b\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: x\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * MAX_CHUNK_LINE + b"\r\nx\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_ambiguousFramingIs502(response: bytes) -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(response)
    assert r.failure is not None and r.failure.status == 502, r.started
    assert "invalid response" in r.failure.reason
    assert t.disconnecting
    assert r.finished is False


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\rX",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 999 Nine\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhel",
    ],
)
def test_brokenHeadOrLineRefusedWithoutWaitingForItsEnd(partial: bytes) -> None:
    """A confused origin that never sends CRLFCRLF gets a 502 now, not a 504 later."""
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    for i in range(len(partial)):  # also byte by byte: the checks resume across reads
        t.protocol.dataReceived(partial[i : i + 1])
        if r.failure is not None:
            break
    assert r.failure is not None and r.failure.status == 502


def test_identicalContentLengthListCountsAsOne() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok")
    assert r.started[3] == 2 and r.declaredLength == 2
    assert r.finished and b"".join(r.body) == b"ok"


@pytest.mark.parametrize(
    ("method", "response", "bodyLength", "declared"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 0, 1000),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 77\r\n\r\n", 0, 77),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0, 0),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", 3, 3),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None, None),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0, None),
    ],
)
def test_declaredLengthIsReportedBesideTheBodyLength(method, response, bodyLength, declared) -> None:
    h = Harness()
    _, r, _ = h.exchange(method=method)
    t = h.connectPending()
    t.protocol.dataReceived(response)
    assert (r.started[3], r.declaredLength) == (bodyLength, declared)
    assert r.finished


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_headResponseFramingIsCheckedToo(response: bytes) -> None:
    h = Harness()
    _, r, _ = h.exchange(method=b"HEAD")
    t = h.connectPending()
    t.protocol.dataReceived(response)
    assert r.failure is not None and r.failure.status == 502 and r.started is None


def test_fieldsStayAsReceivedFramingIncluded() -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 2\r\nConnection: Content-Length\r\nX-b: 1\r\n\r\nok"
    )
    assert r.started[2] == [(b"content-LENGTH", b"2"), (b"Connection", b"Content-Length"), (b"X-b", b"1")]
    assert r.started[3] == 2 and b"".join(r.body) == b"ok"


def test_oneByteChunksAreRelayedInOnePiecePerRead() -> None:
    """64 KiB of 1-byte chunks: one delivery per read, not one per chunk."""
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    count = 65536 // 6
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    t.protocol.dataReceived(b"1\r\nx\r\n" * count)
    assert len(r.body) == 1 and r.body[0] == b"x" * count
    t.protocol.dataReceived(b"0\r\nT: 1\r\n\r\n")
    assert r.finished


def test_chunkedBodySplitAtEveryByte() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nT: v\r\n\r\n"
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    for i in range(len(wire)):
        t.protocol.dataReceived(wire[i : i + 1])
    assert b"".join(r.body) == b"abcd" and r.finished and r.failure is None


# ---------------------------------------------------------------------------
# Truncation: only a clean close ends a close-delimited body (item 4)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        ConnectionLost("Connection reset by peer"),
        SSL.Error([("SSL routines", "", "unexpected eof while reading")]),
    ],
    ids=["reset", "tls-without-close-notify"],
)
def test_closeDelimitedBodyCutUncleanlyIsTruncated(reason: Exception) -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart of it")
    t.protocol.connectionLost(Failure(reason))
    assert not r.finished
    assert r.failure is not None and r.failure.status == 502 and "truncated" in r.failure.reason


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
)
def test_countedBodyCutShortIsTruncatedEvenOnACleanClose(response: bytes) -> None:
    h = Harness()
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(response)
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert not r.finished and r.failure.status == 502 and "truncated" in r.failure.reason


# ---------------------------------------------------------------------------
# Nothing of one response reaches another exchange
# ---------------------------------------------------------------------------


def test_bytesAfterACompleteResponseNeverReachTheNextExchange() -> None:
    h = Harness()
    _, first, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
    )
    assert first.finished and b"".join(first.body) == b"ok"
    assert t.disconnecting, "a connection that sent more than its response is not reused"
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 2
    fresh = h.connectPending()
    fresh.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
    assert b"".join(second.body) == b"good"


def test_bytesOnAnIdleConnectionCloseIt() -> None:
    h = Harness()
    _, first, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    assert t.disconnecting
    t.protocol.connectionLost(Failure(ConnectionDone()))
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 2 and second.started is None


# ---------------------------------------------------------------------------
# Retries: safe methods only, never after a response byte (item 2)
# ---------------------------------------------------------------------------


def reusedConnection(h: Harness) -> StringTransport:
    """A pooled connection that served one GET and is idle."""
    _, first, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert first.finished
    t.clear()
    return t


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_bodylessUnsafeRequestIsNeverSentTwice(method: bytes) -> None:
    h = Harness()
    t = reusedConnection(h)
    head = method + b" /pay HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    _, r, _ = h.exchange(method=method, head=head)
    assert t.value() == head
    t.protocol.connectionLost(Failure(ConnectionDone()))  # the origin read it, then closed
    assert len(h.reactor.tcpClients) == 1, "an unsafe request was replayed"
    assert r.failure is not None and r.failure.status == 502


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE"])
def test_safeRequestIsRetriedOnceOnAFreshConnection(method: bytes) -> None:
    h = Harness()
    t = reusedConnection(h)
    _, r, _ = h.exchange(method=method)
    t.protocol.connectionLost(Failure(ConnectionLost()))
    assert len(h.reactor.tcpClients) == 2 and r.failure is None
    fresh = h.connectPending()
    fresh.protocol.connectionLost(Failure(ConnectionDone()))
    assert len(h.reactor.tcpClients) == 2, "retried more than once"
    assert r.failure is not None and r.failure.status == 502


def test_noRetryOnceAResponseByteArrived() -> None:
    h = Harness()
    t = reusedConnection(h)
    _, r, _ = h.exchange()
    t.protocol.dataReceived(b"HTTP/1.1 2")
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert len(h.reactor.tcpClients) == 1
    assert r.failure is not None and r.failure.status == 502


# ---------------------------------------------------------------------------
# Pool waiters (item 14)
# ---------------------------------------------------------------------------


def test_abortedWaiterLeavesTheQueueAtOnce() -> None:
    h = Harness(max_connections_per_destination=1, pool_wait_timeout=30.0)
    h.exchange()
    h.connectPending()
    waiting, r, _ = h.exchange()
    assert h.pool.queued == 1
    calls = len(h.reactor.getDelayedCalls())
    waiting.abort()
    assert h.pool.queued == 0
    assert len(h.reactor.getDelayedCalls()) == calls - 1, "the wait timeout must be cancelled"
    assert r.failure is None


def test_cancelledAcquireIsRemovedAndTheNextWaiterServed() -> None:
    h = Harness(max_connections_per_destination=1)
    _, first, _ = h.exchange()
    t = h.connectPending()
    d = h.pool.acquire(ORIGIN)
    _, second, _ = h.exchange()
    d.cancel()
    d.addErrback(lambda f: f.trap(CancelledError))
    t.clear()
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert first.finished and t.value() == HEAD, "the released connection goes to the live waiter"


def test_fullQueueOfOneDestinationDoesNotBlockAnother() -> None:
    h = Harness(max_connections_per_destination=1, queue_per_destination=1)
    h.exchange()
    h.exchange()
    other = Destination("http", "127.0.0.2", 8080, ("127.0.0.2",))
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", Recorder(), ClientSocket()).start(other)
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", Recorder(), ClientSocket()).start(other)
    assert (h.pool.queued, h.pool.rejected) == (2, 0)


def test_freedTotalRoomServesTheOldestWaiterThatFits() -> None:
    h = Harness(max_connections_total=1)
    _, first, _ = h.exchange()
    t = h.connectPending()
    other = Destination("http", "127.0.0.2", 8080, ("127.0.0.2",))
    second = Recorder()
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", second, ClientSocket()).start(other)
    assert h.pool.queued == 1
    t.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.pool.queued == 0
    assert h.reactor.tcpClients[-1][:2] == ("127.0.0.2", 8080)


def test_abortWhileConnectingPoolsTheNewConnection() -> None:
    h = Harness()
    exchange, r, _ = h.exchange()
    exchange.abort()
    t = h.connectPending()
    assert t.value() == b"" and not t.disconnecting
    assert h.pool.openConnections == 1
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 1 and t.value() == HEAD
    assert r.failure is None


# ---------------------------------------------------------------------------
# An early answer or a failure during an upload (item 3)
# ---------------------------------------------------------------------------


def test_earlyAnswerLetsAPausedClientGoAndIgnoresTheRestOfTheBody() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.LENGTH, method=b"POST")
    t = h.connectPending()
    exchange.writeBody(b"part")
    t.producer.pauseProducing()  # the origin stopped reading
    assert client.paused and exchange.bodyWanted
    t.protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert r.finished
    assert not client.paused, "a client left paused never gets to read its answer"
    assert not exchange.bodyWanted
    sent = t.value()
    exchange.writeBody(b"more")
    exchange.finishBody()
    assert t.value() == sent and t.producer is None
    assert t.disconnecting, "a connection with half a request body on it is not reused"


def test_secondHeadAfterAnEarlyAnswerReachesNobody() -> None:
    h = Harness()
    exchange, r, _ = h.exchange(framing=BodyFraming.LENGTH, method=b"POST")
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    assert r.started[0] == 413 and r.body == []
    _, second, _ = h.exchange()
    assert len(h.reactor.tcpClients) == 2 and second.started is None


def test_failureDuringAnUploadLetsAPausedClientGo() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.CHUNKED, method=b"POST")
    t = h.connectPending()
    t.producer.pauseProducing()
    t.protocol.connectionLost(Failure(ConnectionLost()))
    assert r.failure is not None and r.failure.status == 502
    assert not client.paused and not exchange.bodyWanted


def test_connectFailureWithABodyHeldBackLetsTheClientGo() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.LENGTH, method=b"POST")
    exchange.writeBody(b"x" * (PENDING_BODY_LIMIT + 1))
    assert client.paused
    factory = h.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert r.failure is not None and r.failure.status == 502
    assert not client.paused


def test_abortedExchangeNeverPausesTheClientAgain() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.LENGTH, method=b"POST")
    t = h.connectPending()
    exchange.abort()
    assert t.producer is None
    exchange.writeBody(b"x" * (PENDING_BODY_LIMIT + 1))
    assert not client.paused


def test_clientPausedByTheLastFullWriteIsResumedWhenTheBodyEnds() -> None:
    h = Harness()
    exchange, r, client = h.exchange(framing=BodyFraming.LENGTH, method=b"POST")
    t = h.connectPending()
    exchange.writeBody(b"all of it")
    t.producer.pauseProducing()
    exchange.finishBody()
    assert t.producer is None
    assert not client.paused, "an unregistered producer is never resumed by the transport"


def test_freedRoomGoesToTheOldestWaiterAcrossDestinations() -> None:
    h = Harness(max_connections_total=1)
    _, first, _ = h.exchange()
    t = h.connectPending()
    b = Destination("http", "127.0.0.2", 8080, ("127.0.0.2",))
    c = Destination("http", "127.0.0.3", 8080, ("127.0.0.3",))
    b1 = UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", Recorder(), ClientSocket())
    b1.start(b)
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", Recorder(), ClientSocket()).start(c)
    UpstreamExchange(h.pool, HEAD, BodyFraming.NONE, b"GET", Recorder(), ClientSocket()).start(b)
    b1.abort()  # now the oldest waiter is the one for c, though b's queue came first
    assert h.pool.queued == 2
    t.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.reactor.tcpClients[-1][:2] == ("127.0.0.3", 8080)
    assert h.pool.queued == 1


def pooledAfterOneResponse(h: Harness) -> StringTransport:
    """A connection that answered one GET and went back to the pool."""
    _, r, _ = h.exchange()
    t = h.connectPending()
    t.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert r.finished and not t.disconnecting
    return t


def test_idleConnectionClosesAfterTheIdleTimeout() -> None:
    h = Harness(idle_timeout=4.0, read_timeout=60.0)
    t = pooledAfterOneResponse(h)
    h.reactor.advance(3.9)
    assert not t.disconnecting
    h.reactor.advance(0.2)
    assert t.disconnecting


def test_reuseStartsTheIdleTimeoutAgain() -> None:
    h = Harness(idle_timeout=4.0, read_timeout=60.0)
    t = pooledAfterOneResponse(h)
    h.reactor.advance(3)
    _, r, _ = h.exchange()
    t.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert r.finished and len(h.reactor.tcpClients) == 1
    h.reactor.advance(3.9)
    assert not t.disconnecting, "idle for 3.9 s of a 4 s idle timeout"
    h.reactor.advance(0.2)
    assert t.disconnecting


def test_aBusyConnectionOutlivesTheIdleTimeout() -> None:
    h = Harness(idle_timeout=4.0, read_timeout=60.0)
    t = pooledAfterOneResponse(h)
    _, r, _ = h.exchange()
    h.reactor.advance(59)
    assert not t.disconnecting and r.failure is None
    h.reactor.advance(1.1)
    assert r.failure is not None and r.failure.status == 504


def test_readTimeoutShorterThanTheIdleTimeoutOnAReusedConnection() -> None:
    h = Harness(idle_timeout=30.0, read_timeout=5.0)
    pooledAfterOneResponse(h)
    h.reactor.advance(1)
    _, r, _ = h.exchange()
    h.reactor.advance(4.9)
    assert r.failure is None
    h.reactor.advance(0.2)
    assert r.failure is not None and r.failure.status == 504


def test_requestsOnAPooledConnectionShareOneTimer() -> None:
    """Neither the read nor the idle timeout costs a timer per request; a closed connection leaves none."""
    h = Harness()
    t = pooledAfterOneResponse(h)
    timersSet = []
    callLater = h.reactor.callLater
    h.reactor.callLater = lambda *a, **kw: timersSet.append(a) or callLater(*a, **kw)
    for _ in range(50):
        h.reactor.advance(0.5)
        _, r, _ = h.exchange()
        t.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert r.finished
    assert len(timersSet) <= 2, "25 s of requests should set the timer again at most once or twice"
    assert len(h.reactor.getDelayedCalls()) == 1
    t.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.reactor.getDelayedCalls() == []


def test_aConnectionClosingForIdlenessIsNotHandedOut() -> None:
    """Between the idle timeout's close and the socket's end, a request gets a new connection."""
    h = Harness(idle_timeout=4.0)
    t = pooledAfterOneResponse(h)
    h.reactor.advance(4.1)
    assert t.disconnecting
    t.clear()
    h.exchange()
    assert t.value() == b"", "a request was written on a connection being closed"
    assert len(h.reactor.tcpClients) == 2
