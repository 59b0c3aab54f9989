"""
HTTP/1.1 request framing rules, written once (RFC 9112): the request head
parsed in one pass, and the request body de-framed.

We own this parser rather than ride C{HTTPChannel}'s: its hooks are not a
public API, it parses line by line, keeps header names only in canonical
case, accepts chunk sizes of any length and C{Transfer-Encoding: identity},
and refuses with a bare 400.  Here every refusal carries a status, a short
reason and the setting that decided it, and nothing ambiguous passes.
"""

from __future__ import annotations

from mydataproxy.http.target import Refusal

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Control bytes other than HTAB: includes NUL, a bare CR and a bare LF.
_CTL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"
# Visible ASCII (VCHAR), the only bytes a request target may hold.
_VISIBLE = bytes(range(0x21, 0x7F))
_HEX = frozenset(b"0123456789abcdefABCDEF")
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# At most 16 hex digits: larger sizes are no real body and overflow peers.
MAX_CHUNK_SIZE_DIGITS = 16
# A chunk-size line with its extensions (Twisted and nginx allow about as much).
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 16384


def requestLineProblem(line: bytes) -> str | None:
    """What is wrong with a request line (RFC 9112 3), or L{None}."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return "malformed request line"
    method, target, version = parts
    if not method or not _TOKEN.issuperset(method):
        return "invalid method"
    if not target or target.translate(None, _VISIBLE):
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


class RequestHead:
    """
    A parsed request head.

    @ivar fields: (name, value) pairs in received order, names spelled as
        the client sent them, values without surrounding whitespace.
    @ivar contentLength: The declared body length, or L{None}.
    @ivar chunked: Whether the body is chunked.
    @ivar connection: The lower-cased C{Connection} options.
    """

    __slots__ = ("method", "target", "version", "fields", "contentLength", "chunked", "connection", "_byName")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        fields: list[tuple[bytes, bytes]],
        byName: dict[bytes, list[bytes]],
        contentLength: int | None,
        chunked: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.fields = fields
        self._byName = byName
        self.contentLength = contentLength
        self.chunked = chunked
        self.connection = frozenset(
            token.strip().lower()
            for value in byName.get(b"connection", ())
            for token in value.split(b",")
            if token.strip()
        )

    def values(self, lowerName: bytes) -> list[bytes] | None:
        """The values of the fields named C{lowerName}, or L{None} if absent."""
        return self._byName.get(lowerName)

    @property
    def hasBody(self) -> bool:
        return self.chunked or bool(self.contentLength)

    @property
    def persistent(self) -> bool:
        """May the connection carry another request after this one?"""
        if self.version == b"HTTP/1.1":
            return b"close" not in self.connection
        return b"keep-alive" in self.connection


def parseRequestHead(
    head: bytes, maxURI: int, maxHeaders: int
) -> RequestHead:
    """
    Parse a request head: the request line and field lines separated by
    CRLF, without the blank line that ends it.

    @raise Refusal: 400, 414 or 431 with the reason.
    """
    lines = head.split(b"\r\n")
    requestLine = lines[0]
    parts = requestLine.split(b" ")
    if len(parts) == 3 and len(parts[1]) > maxURI:
        raise Refusal(414, "URI too long", "limits.max_uri_bytes")
    problem = requestLineProblem(requestLine)
    if problem:
        raise Refusal(400, f"bad request: {problem}")
    method, target, version = parts
    if len(lines) - 1 > maxHeaders:
        raise Refusal(431, "too many request header fields", "limits.max_headers")
    fields: list[tuple[bytes, bytes]] = []
    byName: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Refusal(400, "bad request: obsolete line folding in header")
        problem = headerProblem(line)
        if problem:
            raise Refusal(400, f"bad request: {problem}")
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        fields.append((name, value))
        byName.setdefault(name.lower(), []).append(value)
    if len(byName.get(b"host", ())) > 1:
        raise Refusal(400, "bad request: more than one Host field")
    contentLength, chunked = _bodyFraming(version, byName)
    if method == b"CONNECT" and (chunked or contentLength):
        raise Refusal(400, "bad request: CONNECT with a body")
    return RequestHead(method, target, version, fields, byName, contentLength, chunked)


def _bodyFraming(version: bytes, byName: dict[bytes, list[bytes]]) -> tuple[int | None, bool]:
    """
    The length rules of one request (RFC 9112 6.1-6.3): one Content-Length
    of digits, or one C{Transfer-Encoding: chunked} on HTTP/1.1, never both.
    """
    lengths = byName.get(b"content-length")
    codings = byName.get(b"transfer-encoding")
    if codings:
        if version != b"HTTP/1.1":
            raise Refusal(400, "bad request: Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) > 1:
            raise Refusal(400, "bad request: repeated Transfer-Encoding")
        if codings[0].lower() != b"chunked":
            raise Refusal(400, "bad request: unsupported transfer-coding")
    if lengths:
        if len(lengths) > 1:
            raise Refusal(400, "bad request: repeated Content-Length")
        if not lengths[0].isdigit() or not lengths[0].isascii():
            raise Refusal(400, "bad request: invalid Content-Length")
    if lengths and codings:
        raise Refusal(400, "bad request: both Content-Length and Transfer-Encoding")
    if codings:
        return None, True
    return (int(lengths[0]) if lengths else None), False


class BodyDecoder:
    """
    De-frames one request body, fed the bytes that follow the head.

    L{feed} returns the body bytes found and how many input bytes it used;
    once L{done}, the rest belongs to the next request.

    @param limit: Most body bytes accepted (0: no limit); beyond it, 413.
    """

    __slots__ = ("done", "received", "_remaining", "_chunked", "_state", "_limit", "_rule", "_trailerBytes")

    # States of a chunked body.
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, contentLength: int | None, chunked: bool, limit: int) -> None:
        self._chunked = chunked
        self._remaining = 0 if chunked else (contentLength or 0)
        self._state = self._SIZE
        self._limit = limit
        self._rule = "limits.max_body_bytes"
        self._trailerBytes = 0
        self.received = 0
        self.done = not chunked and not self._remaining

    def feed(self, data: bytes, start: int = 0) -> tuple[list[bytes], int]:
        """
        Decode from C{data[start:]}.

        @return: (body pieces, index in C{data} just past what was used).
        @raise Refusal: 400 for malformed chunked framing, 413 past the
            limit.
        """
        if not self._chunked:
            end = min(len(data), start + self._remaining)
            self._remaining -= end - start
            self.done = not self._remaining
            self._count(end - start)
            piece = data if start == 0 and end == len(data) else data[start:end]
            return ([piece] if piece else []), end
        pieces: list[bytes] = []
        position = start
        size = len(data)
        while position < size and not self.done:
            state = self._state
            if state == self._DATA:
                end = min(size, position + self._remaining)
                pieces.append(data[position:end])
                self._remaining -= end - position
                position = end
                if not self._remaining:
                    self._state = self._DATA_END
            elif state == self._DATA_END:
                if size - position < 2:
                    if data[position:] != b"\r":
                        raise Refusal(400, "bad request: chunk not followed by CRLF")
                    break
                if data[position : position + 2] != b"\r\n":
                    raise Refusal(400, "bad request: chunk not followed by CRLF")
                position += 2
                self._state = self._SIZE
            else:
                end = data.find(b"\r\n", position)
                if end < 0:
                    if size - position > MAX_CHUNK_LINE:
                        raise Refusal(400, "bad request: chunk line too long")
                    break
                line = data[position:end]
                position = end + 2
                if state == self._SIZE:
                    self._chunkSize(line)
                else:
                    self._trailer(line)
        return pieces, position

    def _chunkSize(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE or line.translate(None, _CTL) != line:
            raise Refusal(400, "bad request: malformed chunk size line")
        digits = line.split(b";", 1)[0].rstrip(b" \t")
        if not digits or not _HEX.issuperset(digits):
            raise Refusal(400, "bad request: invalid chunk size")
        if len(digits) > MAX_CHUNK_SIZE_DIGITS:
            raise Refusal(400, "bad request: chunk size too large")
        self._remaining = int(digits, 16)
        self._count(self._remaining)
        self._state = self._DATA if self._remaining else self._TRAILER

    def _trailer(self, line: bytes) -> None:
        if not line:
            self.done = True
            return
        self._trailerBytes += len(line) + 2
        if self._trailerBytes > MAX_TRAILER_BYTES:
            raise Refusal(431, "request trailer fields too large")
        if headerProblem(line):
            raise Refusal(400, "bad request: malformed trailer field")

    def narrow(self, limit: int, rule: str) -> None:
        """A tighter limit (named C{rule}) than the one given, if it is one."""
        if limit and (not self._limit or limit < self._limit):
            self._limit = limit
            self._rule = rule

    def _count(self, size: int) -> None:
        # A chunk is counted when announced, so an oversized one is refused
        # before its bytes are read.
        self.received += size
        if self._limit and self.received > self._limit:
            raise Refusal(413, "request body too large", self._rule)
