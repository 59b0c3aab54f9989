"""
The daemon's log events to the local syslog socket (C{logging.syslog}), as
RFC 5424 messages, for operators who ship logs to a SIEM.

Why not C{twisted.python.syslog} or the stdlib's C{SysLogHandler}: the
first is the legacy observer API over C{syslog(3)} (RFC 3164, blocking), the
second a C{logging} handler.  This observer sends one datagram per event
on a non-blocking UNIX socket: a syslog daemon that does not keep up costs
messages (counted), never the reactor.
"""

from __future__ import annotations

import datetime
import os
import socket

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

# RFC 5424 6.2.1: facility codes and severities.
FACILITIES = {
    "kern": 0, "user": 1, "daemon": 3, "auth": 4, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
_SEVERITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6, LogLevel.debug: 7}
# Most syslog daemons take datagrams of 2 KiB at least; longer messages are cut.
MAX_MESSAGE = 2048


@implementer(ILogObserver)
class SyslogObserver:
    """
    Sends each log event to the syslog socket at C{path}.

    @ivar dropped: Messages the socket did not take.
    """

    def __init__(self, path: str, facility: str = "daemon", appName: str = "mydataproxy") -> None:
        self.path = path
        self.facility = FACILITIES[facility]
        self.host = socket.gethostname() or "-"
        self.appName = appName
        self.dropped = 0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def close(self) -> None:
        self._socket.close()

    def message(self, event: dict) -> bytes:
        """The RFC 5424 message for C{event}."""
        severity = _SEVERITY.get(event.get("log_level"), 6)
        when = datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        text = (formatEvent(event) or "").replace("\n", " ")
        namespace = event.get("log_namespace", "-")
        head = f"<{self.facility * 8 + severity}>1 {stamp} {self.host} {self.appName} {os.getpid()} - - "
        return (head + f"[{namespace}] {text}").encode("utf-8", "replace")[:MAX_MESSAGE]

    def __call__(self, event: dict) -> None:
        try:
            self._socket.sendto(self.message(event), self.path)
        except OSError:
            self.dropped += 1
