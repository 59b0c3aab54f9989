"""
The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) in
front of a listener: a balancer in TCP mode (C{send-proxy-v2}) writes a
header naming the real client before the client's own bytes, and the
listener's factory sees that client instead of the balancer.

Why not Twisted's C{haproxy:} endpoint: its wrapper (a private module)
builds the wrapped protocol with the balancer's address, so connection
admission (C{connections.admit}) counts the balancer, not the client; and
it does not provide L{IHalfCloseableProtocol}, so a client's half-close
(C{shutdown(SHUT_WR)} after sending, as through a CONNECT tunnel) ends the
whole connection and the answer still on its way is lost.

L{ProxyHeaderFactory} reads the header first, and only then asks the
wrapped factory for a protocol, with the real client's address; the
connection then behaves as it would without the header: the wrapped
protocol's transport (L{ProxyHeaderProtocol}) is the socket's, except that
C{getPeer()} is the real client, and it is half-closeable exactly when the
wrapped protocol is.  A listener described C{"haproxy:ENDPOINT"} listens on
C{ENDPOINT} through this factory (L{proxiedListen}); a TLS listener's
factory sits inside it (the header comes before the TLS handshake).

The parser is strict, as the specification asks ("any sequence which does
not exactly match the protocol must be discarded"), and bounded: a bad or
missing header, or one not complete within L{HEADER_SECONDS}, closes the
connection with one log line naming the socket peer, and the wrapped
factory never sees it.  Such a listener believes whoever connects to it
about the client address: only the balancer may reach it.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

import txaio
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, providedBy

txaio.use_twisted()
log = txaio.make_logger()

PREFIX = "haproxy:"
V1_PREFIX = b"PROXY "
# The longest version 1 line, CRLF included ("PROXY UNKNOWN" with two IPv6
# addresses and two ports).
V1_MAX_BYTES = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16
# A version 2 header is 16 bytes and its length field's; the addresses take
# at most 216 (AF_UNIX), the TLVs the rest: a header longer than this is
# refused (HAProxy's own, with its SSL TLVs, stays well under it).
MAX_HEADER_BYTES = 4096
# The specification's "a few seconds (at least 3 seconds to cover a TCP
# retransmit)".
HEADER_SECONDS = 5.0

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
# Version 2's family and protocol byte: the address block's size for each
# valid combination but UNSPEC (0x00, whose block is ignored).
_V2_ADDRESS_BYTES = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_V2_TCP4, _V2_TCP6 = 0x11, 0x21
# Version 1: decimal without heading zeroes (section 2.1); IPv6 addresses
# as inet_ntop writes them (hex groups, "::", a trailing dotted quad for a
# mapped address), never a scope.
_V1_DECIMAL = re.compile(r"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header, or a malformed one; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A complete PROXY protocol header.

    @ivar version: 1 (text) or 2 (binary).
    @ivar source: The real client; L{None} when the header says to keep the
        socket's peer (version 1 C{UNKNOWN}, version 2 C{LOCAL}, an
        unspecified family, or one other than TCP over IPv4 or IPv6).
    @ivar destination: The address the client connected to (the
        balancer's), or L{None} as for C{source}.
    @ivar length: How many bytes the header took; the client's own bytes
        follow.
    """

    version: int
    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None
    length: int


def parseProxyHeader(data: bytes) -> ProxyHeader | None:
    """
    Parse the PROXY protocol header at the start of C{data}, the first
    bytes of a connection.

    @return: The header, or L{None} if C{data} is the start of a header
        that may still be valid (wait for more bytes).
    @raise ProxyHeaderError: If C{data} does not start with a valid header:
        rejected as soon as its bytes tell.
    """
    if data.startswith(V2_SIGNATURE):
        return _parseV2(data)
    if data.startswith(V1_PREFIX):
        return _parseV1(data)
    if V2_SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return None
    raise ProxyHeaderError("no PROXY protocol header")


def _parseV1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"version 1 line without CRLF in its first {V1_MAX_BYTES} bytes")
        return None
    if data[end - 1] != ord("\r"):
        raise ProxyHeaderError("version 1 line ended by a bare LF")
    line = data[:end - 1]
    if not all(0x20 <= byte < 0x7F for byte in line):
        raise ProxyHeaderError("version 1 line with a byte that is not printable US-ASCII")
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        # "The receiver must ignore anything presented before the CRLF."
        return ProxyHeader(1, None, None, end + 1)
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"version 1 protocol {fields[1]!r} is none of TCP4, TCP6, UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError(f"version 1 {fields[1]} line with {len(fields)} fields, not 6")
    _, family, sourceHost, destinationHost, sourcePort, destinationPort = fields
    return ProxyHeader(
        1,
        _v1Address(family, sourceHost, sourcePort),
        _v1Address(family, destinationHost, destinationPort),
        end + 1,
    )


def _v1Address(family: str, host: str, port: str) -> IPv4Address | IPv6Address:
    if not _V1_DECIMAL.fullmatch(port) or int(port) > 65535:
        raise ProxyHeaderError(f"version 1 port {port!r} is not a decimal in 0-65535 without heading zeroes")
    try:
        if family == "TCP4":
            if not _V1_IPV4.fullmatch(host):
                raise ValueError(host)
            return _address(ipaddress.IPv4Address(host), int(port))
        if not _V1_IPV6.fullmatch(host):
            raise ValueError(host)
        return _address(ipaddress.IPv6Address(host), int(port))
    except ValueError:
        raise ProxyHeaderError(f"version 1 {family} address {host!r} is not valid") from None


def _parseV2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED_BYTES:
        return None
    versionCommand, familyProtocol = data[12], data[13]
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"version 2 signature with version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"version 2 command {command} is neither LOCAL nor PROXY")
    length = V2_FIXED_BYTES + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER_BYTES:
        raise ProxyHeaderError(f"version 2 header of {length} bytes, over {MAX_HEADER_BYTES}")
    if command == _V2_LOCAL:
        # The balancer's own connection (a health check): the block,
        # family included, is skipped.
        return None if len(data) < length else ProxyHeader(2, None, None, length)
    addressBytes = _V2_ADDRESS_BYTES.get(familyProtocol, 0)
    if familyProtocol != 0x00:
        if not addressBytes:
            raise ProxyHeaderError(f"version 2 family and protocol {familyProtocol:#04x} are not valid")
        if length - V2_FIXED_BYTES < addressBytes:
            raise ProxyHeaderError(
                f"version 2 address block of {length - V2_FIXED_BYTES} bytes, under the {addressBytes} "
                f"of family and protocol {familyProtocol:#04x}"
            )
    if len(data) < length:
        return None
    if familyProtocol == 0x00:
        return ProxyHeader(2, None, None, length)
    block = data[V2_FIXED_BYTES:length]
    _checkTLVs(block[addressBytes:])
    if familyProtocol == _V2_TCP4:
        return ProxyHeader(2, _v2Address(block[0:4], block[8:10]), _v2Address(block[4:8], block[10:12]), length)
    if familyProtocol == _V2_TCP6:
        return ProxyHeader(2, _v2Address(block[0:16], block[32:34]), _v2Address(block[16:32], block[34:36]), length)
    # UDP and AF_UNIX are valid but no TCP client: the specification's
    # fallback to UNSPEC, the socket's peer.
    return ProxyHeader(2, None, None, length)


def _v2Address(host: bytes, port: bytes) -> IPv4Address | IPv6Address:
    return _address(ipaddress.ip_address(host), int.from_bytes(port, "big"))


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> IPv4Address | IPv6Address:
    """
    A TCP address; an IPv4-mapped IPv6 address (a balancer listening on
    both families) is the IPv4 client it stands for, so that C{client_allow},
    the per-client limits and the access log see one address per client.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return IPv6Address("TCP", str(ip), port)
        ip = ip.ipv4_mapped
    return IPv4Address("TCP", str(ip), port)


def _checkTLVs(tlvs: bytes) -> None:
    """The TLVs (type, 2-byte length, value) must fill the rest of the block exactly; their values are skipped."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError(f"version 2 TLV cut in its type and length ({len(tlvs) - offset} bytes left)")
        offset += 3 + int.from_bytes(tlvs[offset + 1:offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("version 2 TLV longer than the header")


def proxiedListen(description: str) -> tuple[str, bool]:
    """
    Split a listener's endpoint description: C{"haproxy:ENDPOINT"} is
    C{(ENDPOINT, True)} (listen on C{ENDPOINT} through a
    L{ProxyHeaderFactory}), anything else C{(description, False)}.
    The prefix is matched without regard to case, as Twisted's endpoint
    types are.
    """
    if description[:len(PREFIX)].lower() == PREFIX:
        return description[len(PREFIX):], True
    return description, False


class _State(enum.Enum):
    HEADER = "header"  # reading the header
    PASSING = "passing"  # the wrapped protocol has the connection
    CLOSED = "closed"  # refused or lost: nothing more is passed on


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads one connection's PROXY protocol header, then hands the
    connection to the protocol that the wrapped factory builds for the
    real client, as its transport (see the module docstring).

    It provides the socket transport's interfaces (as L{ProtocolWrapper}
    does), and L{IHalfCloseableProtocol} only when the wrapped protocol
    does: the socket asks for it at the client's half-close, and a
    protocol that is not half-closeable must then see the connection
    lost, as without the header.
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, socketPeer: IAddress) -> None:
        super().__init__(factory, None)
        self.socketPeer = socketPeer
        self.client = socketPeer
        self._state = _State.HEADER
        self._buffer = b""
        self._deadline: IDelayedCall | None = None
        self._closing = False

    def logPrefix(self) -> str:
        return self.factory.logPrefix()

    def _peerText(self) -> str:
        return f"{getattr(self.socketPeer, 'host', self.socketPeer)}:{getattr(self.socketPeer, 'port', '')}"

    # The socket's side.

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._deadline = self.factory.reactor.callLater(self.factory.headerTimeout, self._headerExpired)

    def dataReceived(self, data: bytes) -> None:
        if self._state is _State.PASSING:
            self.wrappedProtocol.dataReceived(data)
        elif self._state is _State.HEADER:
            self._buffer += data
            try:
                header = parseProxyHeader(self._buffer)
            except ProxyHeaderError as e:
                self._refuse(str(e))
                return
            if header is not None:
                self._headerReceived(header)

    def readConnectionLost(self) -> None:
        """The client half-closed (only asked when the wrapped protocol is half-closeable)."""
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        """Our half-close is done (likewise)."""
        self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self._cancelDeadline()
        self.factory.unregisterProtocol(self)
        state, self._state = self._state, _State.CLOSED
        if state is _State.HEADER:
            if self._buffer:
                log.info("connection from {peer} closed before its PROXY protocol header was complete",
                         peer=self._peerText())
            else:
                log.debug("connection from {peer} closed before any byte (PROXY protocol listener)",
                          peer=self._peerText())
        elif state is _State.PASSING:
            protocol, self.wrappedProtocol = self.wrappedProtocol, None
            protocol.connectionLost(reason)

    # The wrapped protocol's side (the rest passes through ProtocolWrapper).

    def getPeer(self) -> IAddress:
        """The real client (the socket's peer until the header says otherwise)."""
        return self.client

    def loseConnection(self) -> None:
        self._closing = True
        super().loseConnection()

    def abortConnection(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    # The header.

    def _headerReceived(self, header: ProxyHeader) -> None:
        self._cancelDeadline()
        rest, self._buffer = self._buffer[header.length:], b""
        if header.source is not None:
            self.client = header.source
        protocol = self.factory.wrappedFactory.buildProtocol(self.client)
        if protocol is None:
            # As a port does when its factory returns None.
            self._state = _State.CLOSED
            self.transport.loseConnection()
            return
        self._state = _State.PASSING
        self.wrappedProtocol = protocol
        if IHalfCloseableProtocol.providedBy(protocol):
            alsoProvides(self, IHalfCloseableProtocol)
        protocol.makeConnection(self)
        # The client's first bytes, as they would have come in its first
        # read, unless the protocol closed the connection at once.
        if rest and not self._closing and self._state is _State.PASSING:
            protocol.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        self._state = _State.CLOSED
        self._cancelDeadline()
        log.warn("connection from {peer} closed: {why} (PROXY protocol listener)", peer=self._peerText(), why=why)
        self.transport.loseConnection()

    def _headerExpired(self) -> None:
        self._deadline = None
        self._refuse(f"no complete PROXY protocol header within {self.factory.headerTimeout:g} s")

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None


class ProxyHeaderFactory(WrappingFactory):
    """
    A listener's factory behind the PROXY protocol: each connection reads
    its header first, and C{wrappedFactory.buildProtocol} is asked only
    then, with the real client's address (or not at all: a bad header, or
    none within C{headerTimeout} seconds, closes the connection).

    @ivar reactor: The clock of the header deadlines.
    """

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory: Factory, reactor: IReactorTime, headerTimeout: float = HEADER_SECONDS) -> None:
        super().__init__(wrappedFactory)
        self.reactor = reactor
        self.headerTimeout = headerTimeout

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderProtocol:
        return self.protocol(self, addr)
