"""
Wire logging: the heads of the messages the proxy sends and receives,
logged at C{debug} by the C{mydataproxy.http.wire} component
(C{logging.levels = {"mydataproxy.http.wire" = "debug"}}; the Java
product's C{logging.level.org.apache.http.wire} maps onto it), with
credentials redacted: C{Authorization}, C{Proxy-Authorization}, C{Cookie}
and C{Set-Cookie} values, and password-like query parameters.

Off by default, and cheap when off: the text is built only if an observer
formats the event.
"""

from __future__ import annotations

import re

import txaio

txaio.use_twisted()
log = txaio.make_logger()

_SECRET_FIELD = re.compile(rb"(?im)^(authorization|proxy-authorization|cookie|set-cookie)[ \t]*:[^\r\n]*")
_SECRET_PARAMETER = re.compile(rb"(?i)([?&;](?:pass(?:word)?|pwd|secret|token|api_?key|access_token)=)[^&;#\s]*")


def redacted(head: bytes) -> str:
    """C{head} as a log may show it: credentials replaced by C{[redacted]}."""
    head = _SECRET_FIELD.sub(lambda m: m.group(1) + b": [redacted]", head)
    head = _SECRET_PARAMETER.sub(lambda m: m.group(1) + b"[redacted]", head)
    return head.decode("latin-1").rstrip("\r\n").replace("\r\n", "\n  ")


class _Head:
    """A head, redacted when (and only if) the log event is formatted."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __str__(self) -> str:
        return redacted(self.data)


def logHead(direction: str, peer: str, head: bytes) -> None:
    """Log a message head sent (C{">>"}) to or received (C{"<<"}) from C{peer}."""
    log.debug("{direction} {peer}\n  {head}", direction=direction, peer=peer, head=_Head(head))
