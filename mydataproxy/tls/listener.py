"""
A TLS listener that refuses before TLS and watches its handshakes.

Twisted's C{TLSMemoryBIOFactory} hands every connection to the wrapped
factory and then waits for the client's handshake, for ever.  L{TLSListener}
adds what a listener facing many clients needs:

  - a connection the wrapped factory refuses (a L{RefusedConnection}, beyond
    the connection limits) is closed at once, before any TLS: its HTTP
    answer could only be sent after a handshake the client may never do;
  - a handshake not complete within C{HANDSHAKE_SECONDS} is aborted (a client
    that connects and sends nothing holds no connection slot for long);
  - a failed handshake (no or untrusted client certificate, plain HTTP on the
    TLS port, no common version or cipher) gets a log line with the client
    address and the reason, and is counted.
"""

from __future__ import annotations

import txaio
from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mydataproxy.egress.limits import RefusedConnection

txaio.use_twisted()
log = txaio.make_logger()

HANDSHAKE_SECONDS = 5.0

# OpenSSL's reasons, in the words of someone running the proxy.
_REASONS = {
    "http request": "plain HTTP on the TLS port",
    "https proxy request": "plain HTTP on the TLS port",
    "wrong version number": "not TLS, or a TLS version not accepted",
    "unsupported protocol": "TLS version not accepted (min_version)",
    "no shared cipher": "no cipher in common (ciphers)",
    "peer did not return a certificate": "no client certificate (client_auth = need)",
    "certificate verify failed": "client certificate not trusted (trust_store)",
    "tlsv1 alert unknown ca": "the client does not trust our certificate",
    "sslv3 alert bad certificate": "the client rejected our certificate",
    "sslv3 alert certificate unknown": "the client rejected our certificate",
}


def describeHandshakeError(error: SSL.Error) -> str:
    """A short text for why a server-side handshake failed."""
    if error.args and isinstance(error.args[0], list):
        texts = [str(entry[-1]) for entry in error.args[0] if entry]
        if texts:
            return "; ".join(_REASONS.get(text, text) for text in texts)
    return (str(error) or type(error).__name__)[:200]


class _ClosedBeforeTLS(Protocol):
    """Closes the TCP connection as soon as it is made, without a byte."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _WatchedTLS(BufferingTLSTransport):
    """Server-side TLS with a handshake deadline and a record of failures."""

    factory: "TLSListener"
    handshakeDeadline: IDelayedCall | None = None
    handshakeTimedOut = False
    peerText = ""

    def makeConnection(self, transport) -> None:
        peer = transport.getPeer()
        self.peerText = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.handshakeDeadline = self.factory.reactor.callLater(self.factory.handshakeTimeout, self.handshakeExpired)
        super().makeConnection(transport)

    def handshakeComplete(self) -> bool:
        """Whether the TLS handshake completed."""
        # The client's Finished message is the handshake's last: pyOpenSSL
        # has it only once the handshake completed.
        handle = self.getHandle()
        return handle is not None and handle.get_peer_finished() is not None

    def handshakeExpired(self) -> None:
        """The handshake deadline: abort if the handshake is not done."""
        self.handshakeDeadline = None
        if not self.handshakeComplete():
            self.handshakeTimedOut = True
            self.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self.handshakeDeadline is not None and self.handshakeDeadline.active():
            self.handshakeDeadline.cancel()
        self.handshakeDeadline = None
        if not self.handshakeComplete():
            error = getattr(self.getHandle(), "handshakeError", None)
            self.factory.handshakeFailed(self.peerText, error, self.handshakeTimedOut)
        super().connectionLost(reason)


class TLSListener(TLSMemoryBIOFactory):
    """
    Server-side TLS around C{wrappedFactory}, refusing before TLS and with a
    handshake deadline.

    @ivar refused: connections closed before TLS because the wrapped factory
        refused them.
    @ivar handshakeFailures: handshakes that failed with a TLS error.
    @ivar handshakeTimeouts: handshakes not complete within the deadline.
    @ivar abandoned: connections the client closed before completing the
        handshake without a TLS error (port checks, clients giving up).
    """

    protocol = _WatchedTLS
    noisy = False

    def __init__(
        self,
        creator: IOpenSSLServerConnectionCreator,
        wrappedFactory: Factory,
        reactor: IReactorTime,
        handshakeTimeout: float = HANDSHAKE_SECONDS,
    ) -> None:
        super().__init__(creator, False, wrappedFactory, clock=reactor)
        self.reactor = reactor
        self.handshakeTimeout = handshakeTimeout
        self.refused = 0
        self.handshakeFailures = 0
        self.handshakeTimeouts = 0
        self.abandoned = 0

    def buildProtocol(self, addr) -> Protocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        if isinstance(inner, RefusedConnection):
            self.refused += 1
            log.info(
                "connection from {client} closed before TLS: refused by the connection limits ({n} so far)",
                client=getattr(addr, "host", addr),
                n=self.refused,
            )
            return _ClosedBeforeTLS()
        return self.protocol(self, inner)

    def handshakeFailed(self, client: str, error: SSL.Error | None, timedOut: bool) -> None:
        """
        A connection ended before its handshake completed: count it and say
        why (C{error}: what the handshake failed with, if it did).
        """
        if timedOut:
            self.handshakeTimeouts += 1
            log.info(
                "TLS handshake from {client} not complete within {seconds} s: closed ({n} so far)",
                client=client,
                seconds=self.handshakeTimeout,
                n=self.handshakeTimeouts,
            )
        elif error is None:
            self.abandoned += 1
            log.debug("connection from {client} closed before the TLS handshake completed", client=client)
        else:
            self.handshakeFailures += 1
            log.info(
                "TLS handshake from {client} failed: {why} ({n} failed handshakes so far)",
                client=client,
                why=describeHandshakeError(error),
                n=self.handshakeFailures,
            )
