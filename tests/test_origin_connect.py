"""Unit tests of resolving and connecting to origins (in memory)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.connect import connect, resolve


class Origin(Protocol):
    def __init__(self) -> None:
        self.ready: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)


class FakeResolver:
    """An IHostnameResolver answering from a table."""

    def __init__(self, table: dict[str, list]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            receiver.addressResolved(address)
        receiver.resolutionComplete()


def outcome(d: Deferred) -> list:
    results: list = []
    d.addBoth(results.append)
    return results


def test_ipLiteralsAreNotLookedUp() -> None:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeResolver({})
    assert outcome(resolve(reactor, "10.0.0.1")) == [["10.0.0.1"]]
    assert outcome(resolve(reactor, "::1")) == [["::1"]]
    assert reactor.nameResolver.asked == []


def test_namesResolveToDistinctAddressesInOrder() -> None:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeResolver(
        {
            "origin.test": [
                IPv6Address("TCP", "::1", 0),
                IPv4Address("TCP", "127.0.0.1", 0),
                IPv4Address("TCP", "127.0.0.1", 0),
            ]
        }
    )
    assert outcome(resolve(reactor, "origin.test")) == [["::1", "127.0.0.1"]]


def test_unknownNameIsDNSLookupError() -> None:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeResolver({})
    [failure] = outcome(resolve(reactor, "nohost.invalid"))
    assert isinstance(failure, Failure) and failure.check(DNSLookupError)


def test_connectFallsBackToTheNextAddress() -> None:
    reactor = MemoryReactorClock()
    origin = Origin()
    d = connect(reactor, ["::1", "127.0.0.1"], 8080, 5.0, origin)
    assert [c[:2] for c in reactor.tcpClients] == [("::1", 8080)]
    assert reactor.tcpClients[0][3] == 5.0
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert [c[:2] for c in reactor.tcpClients] == [("::1", 8080), ("127.0.0.1", 8080)]
    assert not d.called
    protocol = reactor.tcpClients[1][2].buildProtocol(None)
    assert protocol is origin, "the prepared protocol must be used as is, not wrapped"
    protocol.makeConnection(StringTransport())
    assert outcome(d) == [origin]


def test_connectFailsWithTheLastError() -> None:
    reactor = MemoryReactorClock()
    d = connect(reactor, ["127.0.0.1"], 1, 5.0, Origin())
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    [failure] = outcome(d)
    assert failure.check(ConnectionRefusedError)


def test_tlsWrapsTheConnection() -> None:
    from twisted.internet.ssl import optionsForClientTLS
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    reactor = MemoryReactorClock()
    origin = Origin()
    connect(reactor, ["127.0.0.1"], 443, 5.0, origin, optionsForClientTLS("localhost"))
    protocol = reactor.tcpClients[0][2].buildProtocol(None)
    assert isinstance(protocol, TLSMemoryBIOProtocol)
    assert protocol.wrappedProtocol is origin
