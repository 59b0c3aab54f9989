"""
The handing over of connections, in one process on the test reactor with
real sockets on loopback: the supervisor's L{Acceptor} deals connections
round robin, skips a channel that cannot take one, stops reading its socket
when none can and resumes when told, and at its stop hands over what the
kernel had queued; a L{Channel} carries a connection's descriptor and gives
back what was never read, and says when it can take more after being full;
a worker's L{HandedConnections} adopts each with its listener's factory, and
a port that stops first adopts what was already sent.
"""

from __future__ import annotations

import os
import socket

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from conftest import LOOPBACK
from mydataproxy.workers.handoff import (
    Acceptor, Channel, HandedConnections, describeAddress, parseAddress,
)

#: How long a condition awaited on the reactor may take.
WAIT_SECONDS = 5.0


async def until(condition, what: str) -> None:
    """Turn the reactor until C{condition()} holds, at most L{WAIT_SECONDS}."""
    for _ in range(int(WAIT_SECONDS / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"not within {WAIT_SECONDS} s: {what}")


class Limited:
    """A channel stand-in that takes up to C{room} connections (kept, by client port)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken: list[int] = []

    def send(self, name: bytes, connection: socket.socket) -> bool:
        assert name == b"forward"
        if len(self.taken) >= self.room:
            return False
        self.taken.append(connection.getpeername()[1])
        return True


def listening() -> socket.socket:
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(64)
    return server


def connect(server: socket.socket, count: int) -> list[socket.socket]:
    return [socket.create_connection(server.getsockname(), timeout=5) for _ in range(count)]


def peek(client: socket.socket) -> bytes | None:
    """What C{client} has to read now (C{b""}: closed by its peer), without waiting; L{None} if nothing."""
    client.setblocking(False)
    try:
        return client.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


@pytest_twisted.ensureDeferred
async def test_connections_are_dealt_round_robin_and_a_full_channel_is_skipped() -> None:
    one, two = Limited(100), Limited(2)
    acceptor = Acceptor(reactor, "forward", listening(), lambda: [one, two])
    clients: list[socket.socket] = []
    try:
        acceptor.resume()
        for _ in range(8):
            clients += connect(acceptor.socket, 1)
            await until(lambda: acceptor.handed == len(clients), "the connection was handed over")
        ports = [c.getsockname()[1] for c in clients]
        assert one.taken == [ports[0], ports[2], *ports[4:]]
        assert two.taken == [ports[1], ports[3]]
    finally:
        acceptor.stop()
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_when_no_channel_can_take_one_the_socket_waits_until_resumed() -> None:
    only = Limited(1)
    acceptor = Acceptor(reactor, "forward", listening(), lambda: [only])
    clients: list[socket.socket] = []
    try:
        acceptor.resume()
        clients += connect(acceptor.socket, 4)
        await until(lambda: not acceptor.reading, "the acceptor stopped reading")
        await task.deferLater(reactor, 0.1, lambda: None)
        # One taken, one waiting in the acceptor, two left in the kernel's backlog.
        assert acceptor.handed == 1 and len(only.taken) == 1
        only.room = 10
        acceptor.resume()
        await until(lambda: acceptor.handed == 4, "the waiting connections were handed over")
        assert sorted(only.taken) == sorted(c.getsockname()[1] for c in clients)
        assert acceptor.reading
    finally:
        acceptor.stop()
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_stop_hands_over_what_the_kernel_had_queued_then_refuses() -> None:
    taker = Limited(100)
    acceptor = Acceptor(reactor, "forward", listening(), lambda: [taker])
    where = acceptor.socket.getsockname()
    clients = connect(acceptor.socket, 3)  # queued: the acceptor does not read yet
    try:
        acceptor.stop()
        assert sorted(taker.taken) == sorted(c.getsockname()[1] for c in clients)
        try:
            socket.create_connection(where, timeout=2).close()
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("the stopped acceptor's socket still takes connections")
    finally:
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_channel_carries_the_descriptor_gives_back_the_unread_and_says_when_it_has_room() -> None:
    writable: list[bool] = []
    channel = Channel(reactor, lambda: writable.append(True))
    server = listening()
    client = connect(server, 1)[0]
    accepted, _ = server.accept()
    try:
        assert channel.send(b"forward", accepted)
        accepted.close()
        back = channel.takeBack()
        assert [name for name, _ in back] == [b"forward"]
        with back[0][1] as carried:
            carried.sendall(b"through the channel")
            assert client.recv(100) == b"through the channel"
        sent = 0
        while channel.send(b"forward", client) and sent < 10_000:
            sent += 1
        assert 0 < sent < 10_000 and channel.full
        assert not channel.send(b"forward", client)
        for _, copy in channel.takeBack():
            copy.close()
        await until(lambda: writable, "the channel said it has room again")
        assert not channel.full and channel.send(b"forward", client)
    finally:
        channel.close()
        client.close()
        server.close()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@pytest_twisted.ensureDeferred
async def test_a_worker_adopts_each_connection_for_its_listener_and_a_stop_adopts_what_was_sent() -> None:
    channel = Channel(reactor, lambda: None)
    handed = HandedConnections(reactor, os.dup(channel.childFD))
    where = IPv4Address("TCP", LOOPBACK, 9)
    port = handed.port("forward", Factory.forProtocol(Echo), where)
    server = listening()
    clients: list[socket.socket] = []

    def hand(name: bytes) -> socket.socket:
        client = connect(server, 1)[0]
        clients.append(client)
        accepted, _ = server.accept()
        with accepted:
            assert channel.send(name, accepted)
        return client

    try:
        handed.start()
        first = hand(b"forward")
        first.sendall(b"one")
        await until(lambda: peek(first) == b"one", "the adopted connection was served")
        stray = hand(b"elsewhere")
        await until(lambda: peek(stray) == b"", "a connection for a listener the worker does not serve was closed")
        late = hand(b"forward")  # sent, not yet read, as the port stops
        port.stopListening()
        assert handed.closed and port.getHost() == where
        late.sendall(b"two")
        await until(lambda: peek(late) == b"two", "the connection sent before the stop was served")
    finally:
        handed.connectionLost(Failure(CONNECTION_DONE))
        channel.close()
        for client in clients:
            client.close()
        server.close()


def test_a_listening_address_survives_the_command_line() -> None:
    for where in (IPv4Address("TCP", "127.0.0.1", 9000), IPv4Address("TCP", "0.0.0.0", 80)):
        assert parseAddress(describeAddress(where)) == where
    assert parseAddress(describeAddress(IPv6Address("TCP", "::1", 8443))) == IPv6Address("TCP", "::1", 8443)
    assert parseAddress(describeAddress(UNIXAddress("/run/p.sock"))) == UNIXAddress("/run/p.sock")
