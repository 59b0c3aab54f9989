"""
Parts of the client channel: its idle timeout (one pending timer per
connection, re-armed lazily) and its writer (straight to the socket until
the kernel first takes less than all).
"""

import socket

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mydataproxy.server.channel import IdleTimer
from mydataproxy.sockets import DirectWriter, directSocket


def _timer():
    clock = Clock()
    fired = []
    return clock, IdleTimer(clock, lambda: fired.append(clock.seconds())), fired


def test_fires_after_the_period_of_silence():
    clock, timer, fired = _timer()
    timer.start(10)
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [10]
    assert clock.getDelayedCalls() == []


def test_activity_pushes_the_deadline_without_a_new_timer():
    clock, timer, fired = _timer()
    timer.start(10)
    clock.advance(6)
    timer.restart()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4)
    assert fired == []  # the timer fired early and waits the rest
    clock.advance(5.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [16]


def test_stopped_counting_never_fires_and_restarts_from_zero():
    clock, timer, fired = _timer()
    timer.start(10)
    clock.advance(5)
    timer.start(None)
    clock.advance(100)
    assert fired == []
    timer.start(10)
    clock.advance(9)
    assert fired == []
    clock.advance(1)
    assert fired == [115]


def test_restart_while_stopped_does_not_start_counting():
    clock, timer, fired = _timer()
    timer.start(None)
    timer.restart()
    clock.advance(100)
    assert fired == [] and clock.getDelayedCalls() == []


def test_a_shorter_period_fires_sooner():
    clock, timer, fired = _timer()
    timer.start(60)
    timer.start(5)
    clock.advance(5)
    assert fired == [5]


def test_cancel_then_stopping_again_leaves_no_timer():
    clock, timer, fired = _timer()
    timer.start(10)
    timer.cancel()
    timer.start(None)
    assert clock.getDelayedCalls() == []


def test_cancel_leaves_no_timer():
    clock, timer, fired = _timer()
    timer.start(10)
    timer.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert fired == []


class KernelDouble:
    """A socket whose kernel takes what C{room} allows, then nothing (EAGAIN)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent = b""

    def _take(self, data: bytes) -> int:
        if not self.room:
            raise BlockingIOError
        taken = data[: self.room]
        self.room -= len(taken)
        self.sent += taken
        return len(taken)

    def send(self, data: bytes) -> int:
        return self._take(data)

    def sendmsg(self, parts: list[bytes]) -> int:
        return self._take(b"".join(parts))


def test_writes_go_to_the_socket_while_it_takes_all():
    kernel, transport = KernelDouble(100), StringTransport()
    writer = DirectWriter(transport, kernel)
    writer.write(b"head")
    writer.writeSequence([b"a", b"b"])
    assert (kernel.sent, transport.value()) == (b"headab", b"")


def test_after_a_short_write_everything_goes_through_the_transport_in_order():
    kernel, transport = KernelDouble(6), StringTransport()
    writer = DirectWriter(transport, kernel)
    writer.write(b"0123456789")
    kernel.room = 1000  # the kernel has room again, but the transport still holds bytes
    writer.write(b"abc")
    writer.writeSequence([b"d", b"e"])
    assert kernel.sent == b"012345"
    assert transport.value() == b"6789abcde"


def test_a_full_socket_hands_the_whole_sequence_to_the_transport():
    kernel, transport = KernelDouble(0), StringTransport()
    writer = DirectWriter(transport, kernel)
    writer.writeSequence([b"1\r\n", b"x", b"\r\n"])
    kernel.room = 1000
    writer.write(b"0\r\n\r\n")
    assert (kernel.sent, transport.value()) == (b"", b"1\r\nx\r\n0\r\n\r\n")


def test_once_stopped_the_writer_leaves_the_socket_alone():
    kernel, transport = KernelDouble(100), StringTransport()
    writer = DirectWriter(transport, kernel)
    writer.stopWritingDirectly()
    writer.write(b"x")
    assert (kernel.sent, transport.value()) == (b"", b"x")


def test_only_a_plain_tcp_transport_is_written_to_directly():
    assert directSocket(StringTransport()) is None

