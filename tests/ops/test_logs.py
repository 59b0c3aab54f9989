"""Unit tests of the access log writer: order, hand-over, drops, escaping, failures, stop."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from conftest import parse_access_line
from mydataproxy.ops import logs


def record(log: logs.AccessLog, target: str = "http://h/x") -> None:
    log.record(
        client="127.0.0.1:5555", method="GET", target=target, status=200,
        bytesIn=1, bytesOut=2, seconds=0.0015, upstream="10.0.0.1:80",
    )


def test_linesReachTheFileInOrderWithTheirFields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), Clock())
    log.start()
    record(log, "http://h/one")
    record(log, "http://h/two words")
    log.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert "client=127.0.0.1:5555 method=GET target=http://h/one status=200 in=1 out=2 ms=1.5 upstream=10.0.0.1:80" in lines[0]
    assert 'target="http://h/two words"' in lines[1]


def test_aFullQueueDropsAndCountsInsteadOfBlocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "QUEUE_BATCHES", 1)
    log = logs.AccessLog(str(tmp_path / "access.log"), Clock())  # writer not started: nothing drains
    record(log)
    log.flush()
    assert log.dropped == 0
    record(log)
    record(log)
    log.flush()
    assert log.dropped == 2


def test_gatheredLinesAreHandedOverOnTheClock(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = Clock()
    log = logs.AccessLog(str(path), clock)
    log.start()
    record(log)
    clock.advance(logs.FLUSH_SECONDS)
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    written = path.read_text()
    log.stop()
    assert len(written.splitlines()) == 1, "the periodic flush did not hand the line over"


class ThreadedClock(Clock):
    """A clock that queues C{callFromThread} calls for the test to run, noting the calling thread."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.fromThreads.put((threading.current_thread().name, f, args, kwargs))

    def runFromThreads(self, timeout: float = 5.0) -> list[str]:
        """Run the calls handed over so far (waiting up to C{timeout} for the first); their threads."""
        threads = []
        try:
            item = self.fromThreads.get(timeout=timeout)
            while True:
                name, f, args, kwargs = item
                threads.append(name)
                f(*args, **kwargs)
                item = self.fromThreads.get_nowait()
        except queue.Empty:
            return threads


@pytest.fixture
def events():
    """twisted.logger events as (thread name, formatted text)."""
    seen: list[tuple[str, str]] = []

    def observer(event) -> None:
        seen.append((threading.current_thread().name, formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("value", [
    "http://h/x\n2026-01-01T00:00:00.000Z client=1.2.3.4:1 method=GET target=/forged status=200",
    "http://h/x\r\nstatus=200",
    'http://h/"quoted" status=999',
    "http://h/back\\slash",
    "http://h/\x00nul\x1bescape\x7fdel\x85nel\u2028ls\u2029ps\ttab",
    "",
])
def test_valuesCannotForgeALine(tmp_path: Path, value: str) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), ThreadedClock())
    log.start()
    log.record(client="127.0.0.1:5555", method="GE\nT status=1", target=value, status=400,
               bytesIn=0, bytesOut=0, seconds=0, upstream="", certificate='CN=a"b\nc')
    log.stop()
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), text
    fields = parse_access_line(text.splitlines()[0])
    assert fields["target"] == value
    assert fields["method"] == "GE\nT status=1"
    assert fields["cert"] == 'CN=a"b\nc'
    assert fields["status"] == "400"


def test_plainValuesStayUnquoted(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), ThreadedClock())
    log.start()
    record(log, "http://h/ünï?q=1")
    log.stop()
    assert " target=http://h/ünï?q=1 " in path.read_text(encoding="utf-8")


def test_writeFailuresAreReportedThroughTheReactorOnce(events) -> None:
    """The writer thread never logs itself; a run of failures is one message, and the loss is counted."""
    clock = ThreadedClock()
    log = logs.AccessLog("/dev/full", clock)  # every flush fails with ENOSPC
    log.start()
    for _ in range(3):
        record(log)
        log.flush()
    threads = clock.runFromThreads()
    log.stop()
    assert [name for name, _ in events if "access log" in _] and threads == ["access-log"]
    written = [text for name, text in events if "access log /dev/full" in text]
    assert all(name == threading.current_thread().name for name, _ in events), events
    assert len([t for t in written if "write failed" in t]) == 1, written
    assert log.lost == 3
    assert any("3 lines could not be written" in t for t in written), written


def test_stopGivesUpOnAStuckWriter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events) -> None:
    """A writer blocked in write (a hung mount; here a pipe nobody reads) cannot hang stop()."""
    monkeypatch.setattr(logs, "QUEUE_BATCHES", 2)
    monkeypatch.setattr(logs, "STOP_SECONDS", 0.5, raising=False)
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = logs.AccessLog(str(fifo), ThreadedClock())
    try:
        log.start()
        for _ in range(4):  # more than the pipe holds, then a full queue
            for _ in range(logs.BATCH_LINES):
                record(log, "http://h/" + "x" * 200)
        log.flush()
        stopper = threading.Thread(target=log.stop, daemon=True)
        started = time.monotonic()
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "AccessLog.stop hangs on a stuck writer"
        assert time.monotonic() - started < 2
    finally:
        os.close(reader)  # the writer gets EPIPE and ends
    stuck = [text for _, text in events if "the writer is stuck" in text]
    assert len(stuck) == 1, events
    lost = int(re.search(r"(\d+) lines not written", stuck[0]).group(1))
    assert 0 < lost <= 4 * logs.BATCH_LINES, stuck[0]
