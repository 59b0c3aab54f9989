"""
L{mydataproxy.generation.Generation} on an in-memory reactor: a reload's
new generation takes over the logs whose settings did not change (one
writer per file) and opens its own otherwise; a retiring generation stops
once its last connection has ended, and stops only the logs it still owns.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.config import LoggingSettings, Settings
from mydataproxy.generation import RETIRE_CHECK_SECONDS, Generation
from mydataproxy.material import loadMaterial


def settingsLogging(path: Path, **logging) -> Settings:
    return Settings(logging=LoggingSettings(access_log=str(path), error_log="", **logging))


def running(number: int, settings: Settings, reactor, previous: Generation | None = None) -> Generation:
    generation = Generation(number, settings, loadMaterial(settings), reactor, previous)
    generation.startLogs()
    generation.start(previous)
    return generation


def writes(generation: Generation, line: str, timeout: float = 2.0) -> bool:
    """Whether C{line}, given to the generation's access log, reaches its file (a stopped log writes nothing)."""
    writer = generation.accessLog.writer
    writer.add(line)
    writer.flush()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in Path(writer.path).read_text():
            return True
        time.sleep(0.02)
    return False


def test_unchangedLoggingIsHandedOver(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    settings = settingsLogging(tmp_path / "access.log")
    old = running(1, settings, reactor)
    new = running(2, dataclasses.replace(settings, source="reloaded"), reactor, old)
    try:
        assert new.accessLog is old.accessLog
        old.retire(lambda generation: None)
        assert writes(new, "after the retirement"), "the retiring generation stopped the log it handed over"
    finally:
        new.stop()
    assert not writes(new, "after the stop", timeout=0.3)


def test_newSettingsOnTheSamePathAreTold(tmp_path: Path) -> None:
    """Same file, new format: one writer still, and the new lines in the new format."""
    reactor = MemoryReactorClock()
    old = running(1, settingsLogging(tmp_path / "access.log"), reactor)
    new = running(2, settingsLogging(tmp_path / "access.log", format="json"), reactor, old)
    try:
        assert new.accessLog is old.accessLog
        old.retire(lambda generation: None)
        new.accessLog.record(client="127.0.0.1:1", method="GET", target="/j", status=200, bytesIn=0, bytesOut=0,
                             seconds=0.0, upstream="")
        assert writes(new, "probe")
        assert any(line.startswith("{") and '"/j"' in line for line in (tmp_path / "access.log").read_text().splitlines())
    finally:
        new.stop()


def test_changedPathOpensItsOwn(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    old = running(1, settingsLogging(tmp_path / "old.log"), reactor)
    new = running(2, settingsLogging(tmp_path / "new.log"), reactor, old)
    try:
        assert new.accessLog is not old.accessLog
        retired: list[Generation] = []
        old.retire(retired.append)
        assert retired == [old] and not writes(old, "old, retired", timeout=0.3)
        assert writes(new, "new")
    finally:
        new.stop()


def test_retiringWaitsForTheLastConnection(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    old = running(1, settingsLogging(tmp_path / "access.log"), reactor)
    new = running(2, settingsLogging(tmp_path / "new.log"), reactor, old)
    channel = old.factories["forward"].buildProtocol(None)
    channel.callLater = reactor.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    # Half a head in: the request is on its way.
    channel.dataReceived(b"GET http://example.test/x HTTP/1.1\r\nHost: exa")
    retired: list[Generation] = []
    old.retire(retired.append)
    reactor.advance(RETIRE_CHECK_SECONDS * 4)
    assert retired == [] and not transport.disconnecting and writes(old, "old, still busy")
    transport.loseConnection()
    channel.connectionLost(Failure(ConnectionDone()))
    reactor.advance(RETIRE_CHECK_SECONDS)
    assert retired == [old] and not writes(old, "old, retired", timeout=0.3)
    new.stop()
