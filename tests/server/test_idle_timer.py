"""The channel's idle timeout: one pending timer per connection, re-armed lazily."""

from twisted.internet.task import Clock

from mydataproxy.server.channel import IdleTimer


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


def test_cancel_leaves_no_timer():
    clock, timer, fired = _timer()
    timer.start(10)
    timer.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert fired == []
