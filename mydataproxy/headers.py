"""
Header rules a proxy applies in both directions (RFC 9110 section 7.6).

Hop-by-hop fields describe one connection, not the message, so they are
removed before a message is relayed: the fixed set below, plus every name the
C{Connection} field lists.  Framing (C{Transfer-Encoding}, C{Content-Length}
on chunked messages) is redone by the proxy for each connection.
"""

from __future__ import annotations

from typing import Sequence

from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

VIA = b"1.1 mydataproxy"

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request fields the proxy sets itself or consumes: Host is rewritten from the
# target, Expect is answered by the proxy (it sends the 100 itself), Via and
# X-Forwarded-For are appended to rather than copied.
_REWRITTEN_REQUEST_FIELDS = frozenset({b"host", b"expect", b"via", b"x-forwarded-for"})

HeaderList = list[tuple[bytes, bytes]]


def connectionTokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """
    The lower-cased option names listed in C{Connection} field values.
    """
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower()
        for value in values
        for token in value.split(b",")
        if token.strip()
    )


def _appended(existing: Sequence[bytes] | None, value: bytes) -> bytes:
    if existing:
        return b", ".join([*existing, value])
    return value


def upstreamRequestHeaders(
    headers: Headers, drop: frozenset[bytes], host: bytes, clientAddress: bytes
) -> HeaderList:
    """
    The header fields to send to the origin for a client request.

    @param headers: The fields the client sent.
    @param drop: Lower-cased names never forwarded (the configured filter).
    @param host: The value for C{Host} (the target's authority).
    @param clientAddress: The client's IP address, appended to
        C{X-Forwarded-For}.
    @return: (name, value) pairs in the client's order, repeated fields kept.
    """
    listed = connectionTokens(headers.getRawHeaders(b"connection", ()))
    out: HeaderList = [(b"Host", host)]
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if (
            lower in HOP_BY_HOP
            or lower in _REWRITTEN_REQUEST_FIELDS
            or lower in listed
            or lower in drop
        ):
            continue
        out.extend((name, value) for value in values)
    forwardedFor = None if b"x-forwarded-for" in drop else headers.getRawHeaders(b"x-forwarded-for")
    out.append((b"X-Forwarded-For", _appended(forwardedFor, clientAddress)))
    out.append((b"Via", _appended(headers.getRawHeaders(b"via"), VIA)))
    return out


def relayedResponseFields(fields: HeaderList) -> HeaderList:
    """
    The origin's response fields to relay to the client: hop-by-hop fields
    removed, our C{Via} appended to the origin's.
    """
    lowered = [(name.lower(), name, value) for name, value in fields]
    listed = connectionTokens([v for lower, _, v in lowered if lower == b"connection"])
    out: HeaderList = []
    via: list[bytes] = []
    for lower, name, value in lowered:
        if lower in HOP_BY_HOP or lower in listed:
            continue
        if lower == b"via":
            via.append(value)
        else:
            out.append((name, value))
    out.append((b"Via", _appended(via, VIA)))
    return out


def plainResponse(status: int, reason: str, close: bool, fields: HeaderList = ()) -> bytes:
    """A complete plain-text response, for answers the proxy gives itself."""
    body = (reason + "\n").encode("utf-8")
    phrase = RESPONSES.get(status, b"Error")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            *(b"%s: %s\r\n" % field for field in fields),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        ]
    )
