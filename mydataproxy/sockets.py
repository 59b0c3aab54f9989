"""
Writing to a connection without waiting for the reactor's next turn.

Why not just C{transport.write}: Twisted's TCP transport buffers every
write and sends it when the reactor next polls, which costs a poll event,
two epoll updates and a dispatch per write; on a small proxied exchange
that is as much as the relaying itself.  L{DirectWriter} sends on the spot
and leaves the rest to the transport, using only its public socket handle.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport


def directSocket(transport) -> socket.socket | None:
    """The socket of C{transport} if L{DirectWriter} may write to it directly: plain TCP."""
    if isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(transport):
        # Each write is sent as it is made, not held for the ACK of the last
        # (Nagle's algorithm against the client's delayed ACK would hold a
        # body written after its head for 40 ms).
        transport.setTcpNoDelay(True)
        return transport.getHandle()
    return None


class DirectWriter:
    """
    Writes to a connection (a client's, an origin's): straight to its
    socket C{sock} (L{directSocket}; L{None}: never), until the kernel
    first takes less than all; what it left, and everything after it, go to
    the transport, whose buffer we can't see, so bytes never overtake each
    other.  A small keep-alive exchange never gets there.
    """

    __slots__ = ("_transport", "_socket")

    def __init__(self, transport, sock: socket.socket | None) -> None:
        self._transport = transport
        self._socket = sock

    def write(self, data: bytes) -> None:
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error the transport will meet and report
            if sent == len(data):
                return
            self._socket = None
            data = data[sent:]
        self._transport.write(data)

    def writeSequence(self, parts: list[bytes]) -> None:
        """Write C{parts}, in one system call while writing directly."""
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.sendmsg(parts)
            except OSError:
                sent = 0
            data = b"".join(parts)
            if sent == len(data):
                return
            self._socket = None
            parts = [data[sent:]]
        self._transport.writeSequence(parts)

    def stopWritingDirectly(self) -> None:
        """From now on everything goes through the transport (others write to it too)."""
        self._socket = None
