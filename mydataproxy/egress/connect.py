"""
Opening connections to origins: connect to already resolved (and checked)
addresses in turn.

The caller resolves and checks the addresses first: the egress policy must
see the very addresses that are then connected to (no second lookup that DNS
rebinding could answer differently).  The connection is made with
C{reactor.connectTCP} and the protocol is built directly, without the
wrapping protocol endpoints add to every C{dataReceived} of a long-lived
tunnel.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure


class OriginProtocol(TypingProtocol):
    """
    What L{connect} needs of a protocol: a C{ready} Deferred that the
    protocol fires with itself from C{connectionMade}.
    """

    ready: defer.Deferred


class _OneConnectionFactory(ClientFactory):
    """Builds the one prepared protocol; on failure, tries the next address."""

    noisy = False

    def __init__(self, reactor, addresses: list[str], port: int, timeout: float, protocol: OriginProtocol, tls) -> None:
        self.reactor = reactor
        self.addresses = list(addresses)
        self.port = port
        self.timeout = timeout
        self.protocol = protocol
        self.tls = tls

    def start(self) -> None:
        factory: ClientFactory = self
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, True, self)
            factory.noisy = False
        self.reactor.connectTCP(self.addresses.pop(0), self.port, factory, self.timeout)

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if self.addresses:
            self.start()
        else:
            self.protocol.ready.errback(reason)


def connect(
    reactor,
    addresses: list[str],
    port: int,
    timeout: float,
    protocol: OriginProtocol,
    tls: IOpenSSLClientConnectionCreator | None = None,
) -> defer.Deferred:
    """
    Connect C{protocol} to the first of C{addresses} that accepts, each
    attempt bounded by C{timeout} seconds; with C{tls}, speak TLS over it.

    @return: C{protocol.ready}: fires with the protocol once connected, or
        fails with the last attempt's error.
    """
    _OneConnectionFactory(reactor, addresses, port, timeout, protocol, tls).start()
    return protocol.ready
