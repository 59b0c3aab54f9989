"""Unit tests of connecting to origins (in memory)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.egress.connect import connect


class Origin(Protocol):
    def __init__(self) -> None:
        self.ready: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)


def outcome(d: Deferred) -> list:
    results: list = []
    d.addBoth(results.append)
    return results


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
