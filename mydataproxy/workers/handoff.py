"""
Connections handed from the supervisor to its workers: the supervisor
accepts on every proxy listener itself (L{Acceptor}) and sends each
accepted connection's file descriptor to one worker, round robin over the
workers that serve, over a socket pair of that worker's own (L{Channel}:
C{SOCK_SEQPACKET}, one message per connection, carrying the listener's
name); the worker adopts it (L{HandedConnections}) with the factory in
force for that listener, as if it had accepted it itself.

Why not a listening socket shared by the workers, each accepting from it:
Twisted's port accepts up to a hundred connections each time it wakes up,
so a burst (a load generator opening 50 connections, an API gateway's pool
filling at start-up) lands entirely on whichever worker wakes first, and
keep-alive clients then stay there for good; the bench saw one worker do
3.55 CPU-seconds and the other 0.01.  Nor C{SO_REUSEPORT}: the kernel
hashes each connection to one worker's own accept queue, blind to how busy
it is, and those queued to a worker that dies are reset.  Handing over
spreads a burst evenly, leaves no backlog stranded on a dead worker, and
keeps one place that accepts (and binds, privileged ports included, once).
Node.js's cluster does the same on Linux, for the same reason.

The cost: one C{accept}, one C{sendmsg} and one C{close} in the
supervisor per connection (a worker then does one C{recvmsg} instead of the
C{accept}); nothing per request on a kept-alive connection.

Back-pressure: a worker whose channel is full (it does not read: busy, or
stopped) is skipped for that connection; when no worker can take one it
waits in the L{Acceptor} and the listening socket is not read until one
can (the kernel's backlog holds the rest): the supervisor's reactor never
blocks.  A connection the supervisor sent to a worker that then dies is not
lost unless that worker had already read it: the supervisor keeps the
worker's end of the pair open too, and takes back what is still queued
there (L{Channel.takeBack}) to hand it to another worker.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Callable

import txaio
from twisted.internet import address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IReadDescriptor, IWriteDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

txaio.use_twisted()
log = txaio.make_logger()

#: The most connections accepted, or received, at one wake-up of the reactor.
ACCEPTS_PER_READ = 64
#: How long the supervisor stops accepting when it cannot (out of file descriptors or memory).
ACCEPT_RETRY_SECONDS = 0.5
#: The longest listener name a message carries.
MAX_NAME_BYTES = 256

#: What accept says of a client that left before it was accepted: the next one is asked for.
_GONE = (errno.ECONNABORTED, errno.EPROTO)


def describeAddress(where: address.IPv4Address | address.IPv6Address | address.UNIXAddress) -> str:
    """A listening address as one token (C{TCP:127.0.0.1:9000}, C{UNIX:/run/p.sock}), for L{parseAddress}."""
    if isinstance(where, address.UNIXAddress):
        name = where.name.decode() if isinstance(where.name, bytes) else where.name
        return f"UNIX:{name or ''}"
    return f"TCP:{where.host}:{where.port}"


def parseAddress(text: str) -> address.IPv4Address | address.IPv6Address | address.UNIXAddress:
    """
    The address that L{describeAddress} wrote.

    @raise ValueError: If C{text} is not one.
    """
    kind, _, rest = text.partition(":")
    if kind == "UNIX":
        return address.UNIXAddress(rest or None)
    host, _, port = rest.rpartition(":")
    if kind != "TCP" or not host or not port.isdigit():
        raise ValueError(f"not a listening address: {text!r}")
    return (address.IPv6Address if ":" in host else address.IPv4Address)("TCP", host, int(port))


# The supervisor's side


@implementer(IWriteDescriptor)
class Channel:
    """
    The supervisor's end of one worker's socket pair, and a copy of the
    worker's end (L{childFD}, given to the worker at its spawn; kept here to
    take back what the worker never read).

    @param onWritable: Called when the channel, full at a L{send}, can take
        connections again.
    """

    def __init__(self, reactor, onWritable: Callable[[], None]) -> None:
        self.reactor = reactor
        self.onWritable = onWritable
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ours.setblocking(False)
        self._theirs.setblocking(False)
        self.full = False
        self.closed = False

    @property
    def childFD(self) -> int:
        """The worker's end, for its spawn."""
        return self._theirs.fileno()

    def send(self, name: bytes, connection: socket.socket) -> bool:
        """
        Send C{connection} (accepted on listener C{name}) to the worker: whether
        it was sent (the caller then closes its own copy); L{False} if the
        channel is full (then L{onWritable} is called once it is not) or closed.
        """
        if self.full or self.closed:
            return False
        try:
            socket.send_fds(self._ours, [name], [connection.fileno()])
        except BlockingIOError:
            self.full = True
            self.reactor.addWriter(self)
            return False
        except OSError as e:
            # ETOOMANYREFS: this user has too many descriptors in flight;
            # the next connection may go through.
            if e.errno != errno.ETOOMANYREFS:
                log.warn("cannot hand a connection to a worker: {e}", e=e)
            return False
        return True

    def takeBack(self) -> list[tuple[bytes, socket.socket]]:
        """The connections sent that the worker never read (once it has ended), by listener name."""
        back: list[tuple[bytes, socket.socket]] = []
        if self.closed:
            return back
        while True:
            try:
                name, fds, _, _ = socket.recv_fds(self._theirs, MAX_NAME_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                return back
            if not fds:
                return back
            back.append((name, socket.socket(fileno=fds[0])))

    def close(self) -> None:
        """Close both ends (what is still queued in them is closed with them)."""
        if self.closed:
            return
        self.closed = True
        if self.full:
            self.reactor.removeWriter(self)
        self._ours.close()
        self._theirs.close()

    def fileno(self) -> int:
        return -1 if self.closed else self._ours.fileno()

    def logPrefix(self) -> str:
        return "worker channel"

    def doWrite(self) -> None:
        self.reactor.removeWriter(self)
        self.full = False
        self.onWritable()

    def connectionLost(self, reason: Failure) -> None:
        self.full = False


@implementer(IReadDescriptor)
class Acceptor:
    """
    Accepts on one listening socket of the supervisor and hands each
    connection over, round robin, to the channels C{receivers} gives (those
    of the workers that serve this listener now, in a stable order).

    It reads the socket only while some worker can take a connection: a
    connection none can take waits here and the socket is left unread until
    L{resume} is called (a worker ready, a channel writable again), so what
    waits is that one connection and those taken back from a worker that
    died (at most what its channel held).

    @param listening: A listening socket of this process's own (closed by
        L{stop}, and only closed: never shut down).
    """

    def __init__(
        self, reactor, name: str, listening: socket.socket, receivers: Callable[[], list[Channel]],
    ) -> None:
        self.reactor = reactor
        self.name = name
        self._name = name.encode()
        self.socket = listening
        self.socket.setblocking(False)
        self.receivers = receivers
        self.reading = False
        self.stopped = False
        self.handed = 0
        self._waiting: deque[socket.socket] = deque()
        self._turn = 0
        self._retry = None

    def fileno(self) -> int:
        return -1 if self.stopped else self.socket.fileno()

    def logPrefix(self) -> str:
        return f"{self.name} acceptor"

    def resume(self) -> None:
        """Hand over what waits, then read the socket again if every connection found a worker."""
        if self.stopped or self._retry is not None:
            return
        self._handOver()
        if not self._waiting and self.receivers():
            self._startReading()

    def takeBack(self, connection: socket.socket) -> None:
        """A connection a worker never read: handed to another, first."""
        if self.stopped:
            connection.close()
            return
        self._waiting.appendleft(connection)
        self.resume()

    def stop(self) -> None:
        """
        Stop accepting: what the kernel has queued is accepted and handed
        over first (the caller closes the socket in the same reactor turn,
        so that no connection queued is reset), what no worker takes is
        closed, and so is this copy of the listening socket.
        """
        if self.stopped:
            return
        self._stopReading()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        for _ in range(socket.SOMAXCONN):
            try:
                connection = self._accepted()
            except OSError:
                break
            if connection is None:
                break
            self._waiting.append(connection)
            self._handOver()
        self.stopped = True
        while self._waiting:
            self._waiting.popleft().close()
        self.socket.close()

    def doRead(self) -> None:
        for _ in range(ACCEPTS_PER_READ):
            try:
                connection = self._accepted()
            except OSError as e:
                log.warn("{name}: cannot accept ({e}): accepting again in {s:g} s",
                         name=self.name, e=e.strerror, s=ACCEPT_RETRY_SECONDS)
                self._stopReading()
                self._retry = self.reactor.callLater(ACCEPT_RETRY_SECONDS, self._retried)
                return
            if connection is None:
                return
            self._waiting.append(connection)
            self._handOver()
            if self._waiting:
                self._stopReading()
                return

    def connectionLost(self, reason: Failure) -> None:
        self.reading = False

    def _accepted(self) -> socket.socket | None:
        """
        The next connection queued, or L{None} if there is none now.

        @raise OSError: If none can be accepted (out of file descriptors or
            memory).
        """
        while True:
            try:
                return self.socket.accept()[0]
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in _GONE:
                    raise

    def _retried(self) -> None:
        self._retry = None
        self.resume()

    def _handOver(self) -> None:
        channels = self.receivers() if self._waiting else []
        while self._waiting:
            for offset in range(len(channels)):
                channel = channels[(self._turn + offset) % len(channels)]
                if channel.send(self._name, self._waiting[0]):
                    self._turn += offset + 1
                    self._waiting.popleft().close()
                    self.handed += 1
                    break
            else:
                return

    def _startReading(self) -> None:
        if not self.reading:
            self.reading = True
            self.reactor.addReader(self)

    def _stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)


# The worker's side


@implementer(IListeningPort)
class HandedPort:
    """
    What a worker's listener has instead of a listening port: the
    connections its supervisor accepted for it, adopted with C{factory}.
    L{stopListening} first adopts every connection already sent (the
    supervisor sends none to a worker it told to stop), then takes no more.

    It also stops as a listening port closed at once does
    (L{mydataproxy.service.closeNow}): L{stopReading}, L{doRead} for what
    is queued, L{connectionLost}.
    """

    def __init__(self, receiver: HandedConnections, name: str, factory: Factory,
                 where: address.IPv4Address | address.IPv6Address | address.UNIXAddress) -> None:
        self.receiver = receiver
        self.name = name
        self.factory = factory
        self.where = where
        self.listening = True

    def startListening(self) -> None:
        """Nothing to do: the supervisor listens."""

    def stopListening(self) -> Deferred[None]:
        self.doRead()
        self.connectionLost(Failure(CONNECTION_DONE))
        return succeed(None)

    def stopReading(self) -> None:
        """Nothing to do: the channel is read for every listener until the last one stops."""

    def doRead(self) -> None:
        """Adopt every connection already sent (for every listener still taking them)."""
        self.receiver.receive()

    def connectionLost(self, reason: Failure) -> None:
        """Take no more connections."""
        if self.listening:
            self.listening = False
            self.receiver.portStopped()

    def getHost(self) -> address.IPv4Address | address.IPv6Address | address.UNIXAddress:
        """The supervisor's listening address."""
        return self.where


@implementer(IReadDescriptor)
class HandedConnections:
    """
    A worker's end of its channel from the supervisor: each message one
    connection, adopted (C{reactor.adoptStreamConnection}) by the
    L{HandedPort} of the listener it names, then this copy of it closed.
    """

    def __init__(self, reactor, fd: int) -> None:
        self.reactor = reactor
        self.socket = socket.socket(fileno=fd)
        self.socket.setblocking(False)
        self.ports: dict[str, HandedPort] = {}
        self.closed = False

    def port(self, name: str, factory: Factory,
             where: address.IPv4Address | address.IPv6Address | address.UNIXAddress) -> HandedPort:
        """The port of listener C{name}, whose connections C{factory} serves."""
        self.ports[name] = HandedPort(self, name, factory, where)
        return self.ports[name]

    def start(self) -> None:
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.closed else self.socket.fileno()

    def logPrefix(self) -> str:
        return "handed connections"

    def doRead(self) -> object:
        return self.receive(ACCEPTS_PER_READ)

    def receive(self, most: int | None = None) -> object:
        """
        Adopt the connections sent, up to C{most} (L{None}: all there are
        now); L{CONNECTION_DONE} once the supervisor's end is closed.
        """
        count = 0
        while not self.closed and (most is None or count < most):
            try:
                name, fds, _, _ = socket.recv_fds(self.socket, MAX_NAME_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return None
            except OSError:
                return CONNECTION_LOST
            if not name and not fds:
                return CONNECTION_DONE
            count += 1
            for fd in fds:
                self._adopt(name.decode("utf-8", "replace"), fd)
        return None

    def _adopt(self, name: str, fd: int) -> None:
        with socket.socket(fileno=fd) as connection:
            port = self.ports.get(name)
            if port is None or not port.listening:
                log.warn("a connection for listener {name!r}, which does not take any, was closed", name=name)
                return
            try:
                connection.setblocking(False)
                self.reactor.adoptStreamConnection(connection.fileno(), connection.family, port.factory)
            except OSError as e:
                log.debug("{name}: a handed connection was gone before it was adopted: {e}", name=name, e=e)
            except Exception:
                log.failure("{name}: a handed connection could not be adopted", name=name)

    def portStopped(self) -> None:
        """A port stopped; the last one out closes the channel."""
        if not any(port.listening for port in self.ports.values()):
            self.connectionLost(Failure(CONNECTION_DONE))

    def connectionLost(self, reason: Failure) -> None:
        if self.closed:
            return
        self.reactor.removeReader(self)
        self.closed = True
        self.socket.close()

