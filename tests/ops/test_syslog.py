"""
The daemon's events to a syslog socket as RFC 5424 messages: a real UNIX
datagram socket stands in for /dev/log.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from twisted.logger import Logger

from mydataproxy.ops.syslog import SyslogObserver

RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<host>\S+) mydataproxy "
    r"(?P<pid>\d+) - - \[(?P<namespace>[^\]]+)\] (?P<text>.*)"
)


@pytest.fixture
def syslogSocket(tmp_path: Path):
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield path, server
    server.close()


def test_eventsArriveAsRfc5424Messages(syslogSocket) -> None:
    path, server = syslogSocket
    observer = SyslogObserver(str(path), "local3")
    logger = Logger(namespace="mydataproxy.test", observer=observer)
    logger.warn("backend {name} down\nsecond line", name="b1")
    logger.debug("detail")
    observer.close()
    first = RFC5424.fullmatch(server.recv(4096).decode())
    assert first, "not an RFC 5424 message"
    assert int(first["pri"]) == 19 * 8 + 4, "local3.warning"
    assert first["namespace"] == "mydataproxy.test" and first["text"] == "backend b1 down second line"
    second = RFC5424.fullmatch(server.recv(4096).decode())
    assert int(second["pri"]) == 19 * 8 + 7


def test_aSyslogThatIsNotThereCostsMessagesNotErrors(tmp_path: Path) -> None:
    observer = SyslogObserver(str(tmp_path / "absent"))
    Logger(namespace="mydataproxy.test", observer=observer).error("lost")
    observer.close()
    assert observer.dropped == 1


def test_theDaemonLogsToSyslogWhenAsked(proxy_factory, syslogSocket) -> None:
    path, server = syslogSocket
    proxy_factory(logging={"syslog": str(path), "syslog_facility": "daemon"})
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:
        message = RFC5424.fullmatch(server.recv(4096).decode())
        assert message, "not an RFC 5424 message"
        seen.append(message["text"])
        if message["text"].startswith("configuration from"):
            assert int(message["pri"]) == 3 * 8 + 6, "daemon.info"
            return
    pytest.fail(f"no start-up line reached syslog: {seen}")
