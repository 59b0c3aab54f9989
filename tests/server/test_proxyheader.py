"""
The PROXY protocol in front of a listener (L{mydataproxy.server.proxyheader}).

  - The parser: version 1 and 2 headers as HAProxy writes them, LOCAL,
    UNKNOWN and the families that fall back to the socket's peer, TLVs
    skipped, headers split at every byte, every kind of malformed header
    refused (and refused as soon as its bytes tell), the size bounds.
  - L{ProxyHeaderFactory} on in-memory transports: the wrapped factory is
    asked only once the header is complete, with the real client; the bytes
    after the header arrive in order; half-close, producers and the
    socket's interfaces pass through; a bad header, a late one or a refusal
    by the wrapped factory closes the connection as without the wrapper.
  - On loopback sockets in this process: a half-close through the wrapper,
    and the PROXY header read before the TLS handshake of a TLS listener.
  - Through the daemon (C{haproxy:} listeners): the per-client limits and the
    access log count the header's client, a CONNECT tunnel keeps the
    client's half-close, TLS after the header, a bad header closed with a
    log line naming the socket peer.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from conftest import LOOPBACK, ProxyProcess, RawConnection, TLSFiles, build_request, default_config, get_free_port
from mydataproxy.config import ServerTLSSettings, StoreRef
from mydataproxy.egress.limits import RefusedConnection
from mydataproxy.server.proxyheader import (
    HEADER_SECONDS,
    MAX_HEADER_BYTES,
    V1_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderFactory,
    parseProxyHeader,
    proxiedListen,
)
from mydataproxy.tls.contexts import ServerTLS
from mydataproxy.tls.listener import TLSListener

SOCKET_PEER = IPv4Address("TCP", "127.0.0.1", 40000)
LISTENER = IPv4Address("TCP", "127.0.0.1", 9000)


def v2(command: int = 0x1, family: int = 0x11, block: bytes = b"", version: int = 2, length: int | None = None) -> bytes:
    """A version 2 header: C{block} is the address block and the TLVs; C{length} overrides its length field."""
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack(
        "!H", len(block) if length is None else length) + block


def tcp4(source: str, sport: int, destination: str = "192.0.2.10", dport: int = 9000) -> bytes:
    return socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", sport, dport)


def tcp6(source: str, sport: int, destination: str = "2001:db8::10", dport: int = 9000) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# HAProxy's send-proxy-v2 for a TLS client: ALPN, authority, unique id and
# an SSL TLV with sub-TLVs, then a NOOP for alignment.
HAPROXY_TLVS = (tlv(0x01, b"h2") + tlv(0x02, b"api.example") + tlv(0x05, b"x" * 128)
                + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client"))
                + tlv(0x04, b"\x00\x00\x00"))


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("line, source, destination", [
    (b"PROXY TCP4 198.51.100.7 192.0.2.10 56324 9000\r\n",
     IPv4Address("TCP", "198.51.100.7", 56324), IPv4Address("TCP", "192.0.2.10", 9000)),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
     IPv4Address("TCP", "255.255.255.255", 65535), IPv4Address("TCP", "0.0.0.0", 0)),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 2001:db8::10 56324 9000\r\n",
     IPv6Address("TCP", "2001:db8::7", 56324), IPv6Address("TCP", "2001:db8::10", 9000)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     IPv6Address("TCP", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
     IPv6Address("TCP", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    # A balancer listening on both families: the mapped client is IPv4.
    (b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:192.0.2.10 56324 9000\r\n",
     IPv4Address("TCP", "198.51.100.7", 56324), IPv4Address("TCP", "192.0.2.10", 9000)),
])
def test_v1_tcp_headers_name_the_client(line: bytes, source, destination) -> None:
    assert parseProxyHeader(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(1, source, destination, len(line))


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    # "The receiver must ignore anything presented before the CRLF."
    b"PROXY UNKNOWN ffff:f::f:ffff ffff:f::f:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN " + b"a" * (V1_MAX_BYTES - 16) + b"\r\n",
])
def test_v1_unknown_keeps_the_socket_peer(line: bytes) -> None:
    assert parseProxyHeader(line + b"\x16\x03\x01") == ProxyHeader(1, None, None, len(line))


def test_v2_tcp4_as_haproxy_sends_it() -> None:
    header = v2(block=tcp4("198.51.100.7", 56324))
    assert parseProxyHeader(header + b"CONNECT") == ProxyHeader(
        2, IPv4Address("TCP", "198.51.100.7", 56324), IPv4Address("TCP", "192.0.2.10", 9000), 28)


def test_v2_tcp6() -> None:
    header = v2(family=0x21, block=tcp6("2001:db8::7", 443))
    assert parseProxyHeader(header) == ProxyHeader(
        2, IPv6Address("TCP", "2001:db8::7", 443), IPv6Address("TCP", "2001:db8::10", 9000), 52)


def test_v2_mapped_ipv4_is_the_ipv4_client() -> None:
    header = v2(family=0x21, block=tcp6("::ffff:198.51.100.7", 443, "::ffff:192.0.2.10"))
    assert parseProxyHeader(header).source == IPv4Address("TCP", "198.51.100.7", 443)


@pytest.mark.parametrize("family, block", [(0x11, tcp4("198.51.100.7", 1)), (0x21, tcp6("2001:db8::7", 1))])
def test_v2_tlvs_are_skipped(family: int, block: bytes) -> None:
    header = v2(family=family, block=block + HAPROXY_TLVS)
    parsed = parseProxyHeader(header + b"rest")
    assert parsed.length == len(header) and parsed.source.port == 1


@pytest.mark.parametrize("header", [
    v2(command=0x0, family=0x00),
    # LOCAL ignores the block, whatever its family, and skips its length.
    v2(command=0x0, family=0x11, block=tcp4("198.51.100.7", 1)),
    v2(command=0x0, family=0xFF, block=b"\xff" * 40),
    # PROXY over an unspecified family: the block is ignored.
    v2(command=0x1, family=0x00, block=b"anything"),
    # Valid, but no TCP client: the specification's fallback to UNSPEC.
    v2(family=0x12, block=tcp4("198.51.100.7", 53)),
    v2(family=0x22, block=tcp6("2001:db8::7", 53)),
    v2(family=0x31, block=b"/run/client.sock".ljust(108, b"\0") + b"/run/haproxy.sock".ljust(108, b"\0")),
    v2(family=0x32, block=b"\0" * 216 + tlv(0x04, b"")),
])
def test_v2_local_and_other_families_keep_the_socket_peer(header: bytes) -> None:
    assert parseProxyHeader(header + b"GET") == ProxyHeader(2, None, None, len(header))


VALID = [
    b"PROXY TCP4 198.51.100.7 192.0.2.10 56324 9000\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(block=tcp4("198.51.100.7", 56324) + HAPROXY_TLVS),
    v2(command=0x0, family=0x00),
]


@pytest.mark.parametrize("header", VALID)
def test_every_split_waits_for_the_rest(header: bytes) -> None:
    """A header cut at any byte is incomplete, never wrong; whole, it parses to the same header."""
    for cut in range(len(header)):
        assert parseProxyHeader(header[:cut]) is None, cut
    assert parseProxyHeader(header).length == len(header)


MALFORMED = {
    "http": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "no PROXY protocol header"),
    "tls": (b"\x16\x03\x01\x02\x00\x01", "no PROXY protocol header"),
    "lower case": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol header"),
    "no space": (b"PROXYTCP4", "no PROXY protocol header"),
    "v2 signature cut": (b"\r\n\r\n\x00\r\nQUIX", "no PROXY protocol header"),
    "bare LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    "bare CR": (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "not printable"),
    "no CRLF": (b"PROXY UNKNOWN " + b"a" * 100, "without CRLF in its first 107 bytes"),
    "CRLF too late": (b"PROXY UNKNOWN " + b"a" * (V1_MAX_BYTES - 15) + b"\r\n", "without CRLF"),
    "not ascii": ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 é\r\n".encode(), "not printable"),
    "tab": (b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", "not printable"),
    "protocol": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "none of TCP4, TCP6, UNKNOWN"),
    "empty protocol": (b"PROXY \r\n", "none of TCP4, TCP6, UNKNOWN"),
    "short unknown": (b"PROXY UNKNOW\r\n", "none of TCP4, TCP6, UNKNOWN"),
    "too few fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields, not 6"),
    "too many fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "7 fields, not 6"),
    "double space": (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "7 fields, not 6"),
    "trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "7 fields, not 6"),
    "port heading zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port '01'"),
    "port range": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port '65536'"),
    "port sign": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port '+1'"),
    "octet heading zero": (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "address '1.2.3.04'"),
    "octet range": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "address '1.2.3.256'"),
    "three octets": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "address '1.2.3'"),
    "v6 in TCP4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "address '::1'"),
    "v4 in TCP6": (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address '1.2.3.4'"),
    "v6 scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "address 'fe80::1%eth0'"),
    "v6 groups": (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "address '1:2:3:4:5:6:7:8:9'"),
    "host name": (b"PROXY TCP4 client.example 5.6.7.8 1 2\r\n", "address 'client.example'"),
    "v2 version 1": (v2(version=1, block=tcp4("1.2.3.4", 1)), "version 1"),
    "v2 version 3": (v2(version=3, block=tcp4("1.2.3.4", 1)), "version 3"),
    "v2 command": (v2(command=0x2, block=tcp4("1.2.3.4", 1)), "command 2"),
    "v2 family": (v2(family=0x41, block=tcp4("1.2.3.4", 1)), "0x41"),
    "v2 protocol": (v2(family=0x13, block=tcp4("1.2.3.4", 1)), "0x13"),
    "v2 inet without protocol": (v2(family=0x10, block=tcp4("1.2.3.4", 1)), "0x10"),
    "v2 protocol without family": (v2(family=0x01, block=tcp4("1.2.3.4", 1)), "0x01"),
    "v2 short inet block": (v2(block=tcp4("1.2.3.4", 1)[:11]), "11 bytes, under the 12"),
    "v2 short inet6 block": (v2(family=0x21, block=tcp4("1.2.3.4", 1)), "12 bytes, under the 36"),
    "v2 short unix block": (v2(family=0x31, block=b"\0" * 215), "215 bytes, under the 216"),
    "v2 over the cap": (v2(command=0x0, family=0x00, length=MAX_HEADER_BYTES - 15), "over 4096"),
    "v2 TLV cut": (v2(block=tcp4("1.2.3.4", 1) + b"\x04\x00"), "TLV cut"),
    "v2 TLV overrun": (v2(block=tcp4("1.2.3.4", 1) + b"\x04\x00\x05abc"), "longer than the header"),
    "v2 TLV after a good one": (v2(block=tcp4("1.2.3.4", 1) + tlv(0x01, b"h2") + b"\x02"), "TLV cut"),
}


@pytest.mark.parametrize("data, why", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_headers_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(why)):
        parseProxyHeader(data)


@pytest.mark.parametrize("header", [
    v2(version=1, block=tcp4("1.2.3.4", 1)),
    v2(command=0x2, block=tcp4("1.2.3.4", 1)),
    v2(family=0x41, block=tcp4("1.2.3.4", 1)),
    v2(family=0x21, block=tcp4("1.2.3.4", 1)),
    v2(command=0x0, length=0xFFFF),
])
def test_v2_is_refused_on_its_fixed_16_bytes(header: bytes) -> None:
    """What the fixed part says wrong is refused before the block arrives (a length over the cap is not waited for)."""
    with pytest.raises(ProxyHeaderError):
        parseProxyHeader(header[:16])


def test_the_bounds() -> None:
    # Version 1: 106 bytes without CRLF may still end well, 107 cannot.
    start = b"PROXY UNKNOWN " + b"a" * (V1_MAX_BYTES - 14)
    assert parseProxyHeader(start[:V1_MAX_BYTES - 1]) is None
    with pytest.raises(ProxyHeaderError):
        parseProxyHeader(start)
    # Version 2: a header of exactly the cap is taken.
    largest = v2(block=tcp4("1.2.3.4", 1) + tlv(0x04, b"\0" * (MAX_HEADER_BYTES - 16 - 12 - 3)))
    assert len(largest) == MAX_HEADER_BYTES
    assert parseProxyHeader(largest).source == IPv4Address("TCP", "1.2.3.4", 1)


@pytest.mark.parametrize("description, expected", [
    ("haproxy:tcp:9000:interface=127.0.0.1", ("tcp:9000:interface=127.0.0.1", True)),
    ("HAProxy:tcp6:9000:interface=\\:\\:1", ("tcp6:9000:interface=\\:\\:1", True)),
    ("tcp:9000:interface=127.0.0.1", ("tcp:9000:interface=127.0.0.1", False)),
    ("unix:/run/haproxy.sock", ("unix:/run/haproxy.sock", False)),
    ("haproxytcp:9000", ("haproxytcp:9000", False)),
])
def test_proxied_listen(description: str, expected: tuple[str, bool]) -> None:
    assert proxiedListen(description) == expected


# ---------------------------------------------------------------------------
# The factory on in-memory transports
# ---------------------------------------------------------------------------


class Recorded(Protocol):
    """Records what reaches it (the wrapped listener's protocol)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[Failure] = []
        self.halfClosed: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Recorded):
    def readConnectionLost(self) -> None:
        self.halfClosed.append("read")

    def writeConnectionLost(self) -> None:
        self.halfClosed.append("write")


class Listener(Factory):
    """The wrapped factory: records the addresses it was asked for; C{build} makes each protocol."""

    def __init__(self, build=HalfCloseable) -> None:
        self.build = build
        self.addresses: list = []
        self.built: list[Protocol] = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        protocol = self.build()
        if protocol is not None:
            self.built.append(protocol)
        return protocol


class Connection:
    """One connection to a L{ProxyHeaderFactory} over a L{StringTransport}, on a fake clock."""

    def __init__(self, listener: Listener | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.listener = listener or Listener()
        self.factory = ProxyHeaderFactory(self.listener, self.clock)
        self.wrapper = self.factory.buildProtocol(SOCKET_PEER)
        self.transport = StringTransport(hostAddress=LISTENER, peerAddress=SOCKET_PEER)
        self.wrapper.makeConnection(self.transport)

    @property
    def inner(self) -> Protocol:
        (protocol,) = self.listener.built
        return protocol


HEADER = v2(block=tcp4("198.51.100.7", 56324))
CLIENT = IPv4Address("TCP", "198.51.100.7", 56324)


def test_the_wrapped_factory_is_asked_only_once_the_header_is_complete() -> None:
    c = Connection()
    for byte in HEADER[:-1]:
        c.wrapper.dataReceived(bytes([byte]))
    assert c.listener.addresses == []
    c.wrapper.dataReceived(HEADER[-1:])
    assert c.listener.addresses == [CLIENT]
    assert c.inner.transport.getPeer() == CLIENT
    assert c.inner.transport.getHost() == LISTENER
    assert c.clock.getDelayedCalls() == [], "the header deadline outlived the header"


def test_v1_and_local_headers() -> None:
    c = Connection()
    c.wrapper.dataReceived(b"PROXY TCP6 2001:db8::7 2001:db8::10 443 9000\r\n")
    assert c.inner.transport.getPeer() == IPv6Address("TCP", "2001:db8::7", 443)
    local = Connection()
    local.wrapper.dataReceived(v2(command=0x0, family=0x00) + b"GET")
    assert local.listener.addresses == [SOCKET_PEER] and local.inner.received == [b"GET"]


def test_bytes_after_the_header_arrive_in_order() -> None:
    c = Connection()
    c.wrapper.dataReceived(HEADER[:5])
    c.wrapper.dataReceived(HEADER[5:] + b"CONNECT a:443 HTTP/1.1\r\n")
    c.wrapper.dataReceived(b"Host: a:443\r\n\r\n")
    assert b"".join(c.inner.received) == b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"
    assert c.inner.received[0] == b"CONNECT a:443 HTTP/1.1\r\n"
    # A header then nothing: no empty delivery.
    quiet = Connection()
    quiet.wrapper.dataReceived(HEADER)
    assert quiet.inner.received == []


def test_half_close_is_passed_on_when_the_wrapped_protocol_takes_it() -> None:
    c = Connection()
    assert not IHalfCloseableProtocol.providedBy(c.wrapper), "half-closeable before there is a protocol to tell"
    c.wrapper.dataReceived(HEADER + b"x")
    assert IHalfCloseableProtocol.providedBy(c.wrapper)
    # What the socket calls: the client's FIN, then ours sent.
    c.wrapper.readConnectionLost()
    c.wrapper.writeConnectionLost()
    assert c.inner.halfClosed == ["read", "write"]
    assert c.inner.lost == []
    c.wrapper.connectionLost(Failure(ConnectionDone()))
    assert len(c.inner.lost) == 1 and c.inner.lost[0].check(ConnectionDone)


def test_a_protocol_that_is_not_half_closeable_sees_the_connection_lost() -> None:
    """The socket then treats the client's half-close as the end (as without the wrapper)."""
    c = Connection(Listener(Recorded))
    c.wrapper.dataReceived(HEADER)
    assert not IHalfCloseableProtocol.providedBy(c.wrapper)


def test_the_socket_transport_passes_through() -> None:
    c = Connection()
    c.wrapper.dataReceived(HEADER)
    transport = c.inner.transport
    assert IPushProducer.providedBy(transport) and IConsumer.providedBy(transport)
    transport.write(b"answer")
    transport.writeSequence([b" and", b" more"])
    assert c.transport.value() == b"answer and more"
    producer = Recorded()
    transport.registerProducer(producer, True)
    assert c.transport.producer is producer and c.transport.streaming
    transport.pauseProducing()
    assert c.transport.producerState == "paused"
    transport.resumeProducing()
    assert c.transport.producerState == "producing"
    transport.unregisterProducer()
    assert c.transport.producer is None
    transport.loseConnection()
    assert c.transport.disconnecting


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", v2(command=0x2), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"])
def test_a_bad_header_closes_with_one_line_naming_the_socket_peer(data: bytes) -> None:
    c = Connection()
    with capturedLogs() as events:
        c.wrapper.dataReceived(data)
        c.wrapper.dataReceived(b"more")
    assert c.transport.disconnecting and c.transport.value() == b""
    assert c.listener.addresses == []
    (event,) = events
    assert formatEvent(event).startswith("connection from 127.0.0.1:40000 closed: "), formatEvent(event)
    with capturedLogs() as after:
        c.wrapper.connectionLost(Failure(ConnectionDone()))
    assert list(after) == []


def test_a_header_late_past_the_deadline_closes() -> None:
    c = Connection()
    c.wrapper.dataReceived(HEADER[:10])
    c.clock.advance(HEADER_SECONDS - 0.1)
    assert not c.transport.disconnecting
    with capturedLogs() as events:
        c.clock.advance(0.1)
    assert c.transport.disconnecting
    assert [formatEvent(e) for e in events] == [
        f"connection from 127.0.0.1:40000 closed: no complete PROXY protocol header within {HEADER_SECONDS:g} s"
        " (PROXY protocol listener)"]
    c.wrapper.dataReceived(HEADER[10:])
    assert c.listener.addresses == []


def test_a_client_gone_before_the_header_reaches_nothing() -> None:
    c = Connection()
    c.wrapper.dataReceived(HEADER[:3])
    with capturedLogs() as events:
        c.wrapper.connectionLost(Failure(ConnectionDone()))
    assert c.listener.addresses == [] and c.clock.getDelayedCalls() == []
    assert [formatEvent(e) for e in events] == [
        "connection from 127.0.0.1:40000 closed before its PROXY protocol header was complete"]


def test_a_factory_that_returns_none_closes_the_connection() -> None:
    c = Connection(Listener(lambda: None))
    c.wrapper.dataReceived(HEADER + b"GET")
    assert c.listener.addresses == [CLIENT]
    assert c.transport.disconnecting and c.transport.value() == b""
    c.wrapper.dataReceived(b"more")
    c.wrapper.connectionLost(Failure(ConnectionDone()))


def test_a_refused_connection_gets_its_answer_as_without_the_wrapper() -> None:
    """A L{RefusedConnection} writes its 503 and closes; the client's bytes after the header go nowhere."""
    refused = Connection(Listener(lambda: RefusedConnection(b"HTTP/1.1 503 x\r\n\r\n")))
    refused.wrapper.dataReceived(HEADER + b"GET / HTTP/1.1\r\n\r\n")
    bare = StringTransport(peerAddress=CLIENT)
    RefusedConnection(b"HTTP/1.1 503 x\r\n\r\n").makeConnection(bare)
    assert refused.transport.value() == bare.value() == b"HTTP/1.1 503 x\r\n\r\n"
    assert refused.transport.disconnecting and bare.disconnecting
    assert not IHalfCloseableProtocol.providedBy(refused.wrapper)


class ClosingAtOnce(Recorded):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


def test_a_protocol_that_closes_at_once_reads_nothing_more() -> None:
    """As a socket stops reading once its protocol closes it: the bytes after the header are not delivered."""
    c = Connection(Listener(ClosingAtOnce))
    c.wrapper.dataReceived(HEADER + b"GET / HTTP/1.1\r\n\r\n")
    assert c.transport.disconnecting and c.inner.received == []


def test_connections_are_tracked_while_open() -> None:
    c = Connection()
    assert list(c.factory.protocols) == [c.wrapper]
    c.wrapper.dataReceived(HEADER)
    c.wrapper.connectionLost(Failure(ConnectionDone()))
    assert c.factory.protocols == {}


# ---------------------------------------------------------------------------
# Loopback sockets, in this process
# ---------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Summing(Protocol):
    """Reads until the client half-closes, then answers the byte count, the digest and the peer it saw."""

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)

    def readConnectionLost(self) -> None:
        peer = self.transport.getPeer()
        tcp = ITCPTransport.providedBy(self.transport)
        self.transport.write(f"{self.count} {self.digest.hexdigest()} {peer.host}:{peer.port} {tcp}\n".encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Not asked: this protocol never half-closes."""


@pytest.fixture
def listening() -> Iterator:
    """A function C{(factory) -> port number} listening on loopback in this process; the ports stop after the test."""
    ports = []

    def listen(factory: Factory) -> int:
        ports.append(reactor.listenTCP(0, factory, interface=LOOPBACK))
        return ports[-1].getHost().port

    yield listen
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def send_and_half_close(port: int, first: bytes, payload: bytes) -> bytes:
    """Send C{first} and C{payload} (with a pause between), half-close, read to the end."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(first)
        time.sleep(0.05)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest_twisted.ensureDeferred
async def test_half_close_on_a_real_socket(listening) -> None:
    port = listening(ProxyHeaderFactory(Factory.forProtocol(Summing), reactor))
    payload = b"x" * 300_000
    answer = await threads.deferToThread(send_and_half_close, port, HEADER + b"abc", payload)
    digest = hashlib.sha256(b"abc" + payload).hexdigest()
    assert answer == f"{len(payload) + 3} {digest} 198.51.100.7:56324 True\n".encode()


class Greeting(Protocol):
    """Answers its first bytes with the peer it saw."""

    def dataReceived(self, data: bytes) -> None:
        peer = self.transport.getPeer()
        self.transport.write(b"%s from %s:%d\n" % (data, peer.host.encode(), peer.port))
        self.transport.loseConnection()


def tls_after_the_header(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        raw.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.10 4711 443\r\n")
        with context.wrap_socket(raw, server_hostname=LOOPBACK) as s:
            s.sendall(b"hello")
            answer = b""
            while True:
                try:
                    chunk = s.recv(4096)
                except ssl.SSLEOFError:
                    break
                if not chunk:
                    break
                answer += chunk
    return answer


@pytest_twisted.ensureDeferred
async def test_the_header_comes_before_tls(listening, tls_files: TLSFiles, tmp_path) -> None:
    """The order of a TLS listener behind the PROXY protocol: header in the clear, then the handshake."""
    store = tmp_path / "listener.pem"
    store.write_bytes(tls_files.key_pem.read_bytes() + tls_files.cert_pem.read_bytes())
    tlsListener = TLSListener(ServerTLS(ServerTLSSettings(StoreRef(str(store)))), Factory.forProtocol(Greeting), reactor)
    port = listening(ProxyHeaderFactory(tlsListener, reactor))
    answer = await threads.deferToThread(tls_after_the_header, port, tls_files.ca_pem)
    assert answer == b"hello from 203.0.113.9:4711\n"


# ---------------------------------------------------------------------------
# Through the daemon
# ---------------------------------------------------------------------------


def start_proxied(workdir: Path, ca_pem: Path, connect_ports, dns, **sections) -> ProxyProcess:
    """A daemon whose forward listener is C{haproxy:tcp:PORT} (C{sections} as for C{proxy_factory})."""
    for _attempt in range(3):  # a free port may be taken in between
        port = get_free_port()
        config = default_config(port, workdir / "access.log", connect_ports, dns, **sections)
        config["forward"]["listen"] = f"haproxy:tcp:{port}:interface={LOOPBACK}"
        try:
            return ProxyProcess(workdir, config, {"SSL_CERT_FILE": str(ca_pem)})
        except RuntimeError as e:
            if "Address already in use" not in str(e) and "CannotListen" not in str(e):
                raise
    raise RuntimeError("no free port in three attempts")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, ca_pem, session_connect_ports, dns_server) -> Iterator[ProxyProcess]:
    """A daemon behind the PROXY protocol, one connection per client."""
    proxy = start_proxied(tmp_path_factory.mktemp("proxied"), ca_pem, session_connect_ports, dns_server,
                          limits={"max_connections_per_client": 1})
    yield proxy
    assert proxy.stop() is not None, "the daemon ignored SIGTERM for 10 s"


def through_balancer(proxy, source: str, sport: int) -> RawConnection:
    """A connection to C{proxy} as the balancer makes it for client C{source}:C{sport}."""
    c = RawConnection(proxy.port, timeout=10)
    c.send(v2(block=tcp4(source, sport)))
    return c


def test_daemon_limits_and_logs_count_the_real_client(proxied, origin) -> None:
    request = build_request("GET", f"{origin.url}/echo", [("Host", origin.authority)])
    first = through_balancer(proxied, "198.51.100.21", 50001)
    first.send(request)
    assert first.read_response().status == 200
    # Another client through the same balancer: its own connection slot.
    other = through_balancer(proxied, "198.51.100.22", 50002)
    other.send(request)
    assert other.read_response().status == 200
    # The first client again while its connection is open: over its limit.
    again = through_balancer(proxied, "198.51.100.21", 50003)
    again.send(request)
    assert again.read_response().status == 503
    for c in (first, other, again):
        c.close()
    lines = proxied.wait_access_lines(lambda l: "198.51.100.2" in l, count=3)
    assert sorted((l["client"], l["status"]) for l in lines) == [
        ("198.51.100.21:50001", "200"), ("198.51.100.21:50003", "503"), ("198.51.100.22:50002", "200")]


def test_daemon_tunnel_keeps_the_half_close(proxied, tcp_origin) -> None:
    tunnel = through_balancer(proxied, "198.51.100.31", 50001)
    tunnel.send(build_request("CONNECT", tcp_origin.authority, [("Host", tcp_origin.authority)]))
    assert tunnel.read_response("CONNECT").status == 200
    tunnel.send(b"x" * 1000)
    tunnel.shutdown_write()
    assert tunnel.read_until(b"\n") == f"1000 {hashlib.sha256(b'x' * 1000).hexdigest()}\n".encode()
    tunnel.close()


def test_daemon_refuses_a_connection_without_header(proxied) -> None:
    with RawConnection(proxied.port, timeout=5) as c:
        c.send(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert c.read_to_eof() == b""
        peer = f"127.0.0.1:{c.local_port}"
    deadline = time.monotonic() + 5
    while f"connection from {peer} closed: no PROXY protocol header" not in proxied.output():
        assert time.monotonic() < deadline, proxied.output()[-3000:]
        time.sleep(0.05)


def test_daemon_tls_listener_reads_the_header_first(tmp_path, tls_files, origin, session_connect_ports,
                                                   dns_server) -> None:
    store = tmp_path / "listener.pem"
    store.write_bytes(tls_files.key_pem.read_bytes() + tls_files.cert_pem.read_bytes())
    proxy = start_proxied(tmp_path / "proxy", tls_files.ca_pem, session_connect_ports, dns_server,
                          forward={"tls": {"key_store": str(store)}})
    try:
        check_tls_after_the_header(proxy, tls_files, origin)
    finally:
        assert proxy.stop() is not None, "the daemon ignored SIGTERM for 10 s"


def check_tls_after_the_header(proxy: ProxyProcess, tls_files: TLSFiles, origin) -> None:
    c = RawConnection(proxy.port, timeout=10)
    c.send(b"PROXY TCP4 203.0.113.9 192.0.2.10 4711 443\r\n")
    c.sock = ssl.create_default_context(cafile=str(tls_files.ca_pem)).wrap_socket(c.sock, server_hostname=LOOPBACK)
    c.send(build_request("GET", f"{origin.url}/echo", [("Host", origin.authority)]))
    assert c.read_response().status == 200
    c.close()
    (line,) = proxy.wait_access_lines(lambda l: "203.0.113.9" in l)
    assert line["client"] == "203.0.113.9:4711"
