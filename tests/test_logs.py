"""Unit tests of the access log writer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mydataproxy import logs


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
