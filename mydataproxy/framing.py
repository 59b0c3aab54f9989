"""
HTTP/1.1 request framing rules, written once (RFC 9112).

C{HTTPChannel} already rejects much of this, but silently (a bare 400) and
not all of it (it accepts C{Transfer-Encoding: identity} and joins folded
lines).  These checks run first, so every refusal has a reason and a log
line, and nothing ambiguous is ever forwarded.
"""

from __future__ import annotations

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Control bytes other than HTAB: includes NUL, a bare CR and a bare LF.
_CTL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


def requestLineProblem(line: bytes) -> str | None:
    """What is wrong with a request line (RFC 9112 3), or L{None}."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return "malformed request line"
    method, target, version = parts
    if not method or not _TOKEN.issuperset(method):
        return "invalid method"
    if not target or any(c < 0x21 or c > 0x7E for c in target):
        return "invalid request target"
    if version not in VERSIONS:
        return "unsupported HTTP version"
    return None


def headerProblem(line: bytes) -> str | None:
    """What is wrong with one header field line (RFC 9112 5), or L{None}."""
    name, colon, value = line.partition(b":")
    if not colon or not name or not _TOKEN.issuperset(name):
        return "invalid header field name"
    if value.translate(None, _CTL) != value:
        return "control character in header field value"
    return None


class BodyFramingCheck:
    """
    The length rules of one request (RFC 9112 6.1-6.3), fed each field:
    one Content-Length of digits, or one C{Transfer-Encoding: chunked} on
    HTTP/1.1, never both.
    """

    def __init__(self, version: bytes) -> None:
        self._version = version
        self._length = False
        self._chunked = False

    def problem(self, name: bytes, value: bytes) -> str | None:
        """What is wrong with this field given the ones before, or L{None}."""
        lower = name.lower()
        if lower == b"content-length":
            if self._length:
                return "repeated Content-Length"
            if not value.strip(b" \t").isdigit():
                return "invalid Content-Length"
            self._length = True
        elif lower == b"transfer-encoding":
            if self._version != b"HTTP/1.1":
                return "Transfer-Encoding in an HTTP/1.0 request"
            if self._chunked:
                return "repeated Transfer-Encoding"
            if value.strip(b" \t").lower() != b"chunked":
                return "unsupported transfer-coding"
            self._chunked = True
        else:
            return None
        if self._length and self._chunked:
            return "both Content-Length and Transfer-Encoding"
        return None
