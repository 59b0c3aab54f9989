#!/usr/bin/env python
"""
A test origin server for the MyData Proxy integration tests.

Run it as a subprocess::

    python tests/origin.py --port 0 [--tls-cert cert.pem --tls-key key.pem] [--mode http|tcp]

It prints the port it bound as the first line of standard output and then
serves until SIGTERM.  It binds loopback only.

C{--mode http} (the default) is a small HTTP/1.1 server written as a raw
Twisted protocol, so that it sees and sends headers exactly as they are on the
wire (order, case, repeats, hop-by-hop names) and streams bodies both ways
without holding them in memory:

  - C{GET|HEAD /bytes/N}: N deterministic bytes (L{iterPattern}) with a
    Content-Length, written by a pull producer.
  - C{GET|HEAD /chunked/N}: the same bytes, chunked (no Content-Length).
  - C{GET /eof/N}: the same bytes delimited by closing the connection (no
    Content-Length, no chunked).
  - C{POST|PUT /sha256}: the request body (Content-Length or chunked) is fed
    through hashlib as it arrives; answers JSON C{{"sha256", "length"}}.
  - C{POST|PUT /count}: like C{/sha256} without hashing (for huge bodies).
    Both take C{?pause_ms=N}: stop reading the connection for N ms once the
    head has arrived (a consumer that applies back-pressure).
  - C{/echo} (and any path not listed here): JSON with the method, the raw
    request-target, the HTTP version, the headers as a list of
    C{[name, value]} in wire order, the body's length and sha256, whether the
    connection is TLS, the connection serial number and the request's index
    on its connection.  C{?close_after_ms=N} closes the (kept-alive)
    connection N ms after answering, as an origin's idle timeout would.
  - C{/status/N}: a response with status N (204 and 304 without a body;
    C{?cl=K} adds a C{Content-Length: K} header to a 304, as some origins do;
    C{?early=1} answers as soon as the head is in, then drains the body).
  - C{/early-hints}: a C{103 Early Hints} interim response, then the echo.
  - C{/hop}: a response carrying hop-by-hop headers that a proxy must drop.
  - C{/rep}: a response carrying repeated headers.
  - C{/delay/MS}: answers after MS milliseconds.
  - C{/slow}: never answers.
  - C{/reset}: aborts the TCP connection with a RST once the request head
    has arrived.
  - C{/close}: closes the connection cleanly without answering.
  - C{/stats}: JSON C{{"connections", "requests", "accepted", "open"}}.
    C{connections} counts connections that carried at least one request
    other than C{/stats}; C{requests} counts requests other than C{/stats}.

Any request with C{Expect: 100-continue} and a body is answered with an
interim C{100 Continue} before the body is read.

C{--mode tcp} is a raw TCP service for tunnel tests, with half-close
support: it hashes everything it receives until the peer shuts down its write
side, then writes C{"<length> <sha256>\\n"} and closes.  If the first bytes
received start with C{CLOSE} it answers C{"closing\\n"} and closes at once
(the origin closes first).

This module only imports the reactor inside L{main}, so the tests can import
it for L{iterPattern} and friends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
from urllib.parse import parse_qs, urlsplit

from zope.interface import implementer

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPullProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol

# ---------------------------------------------------------------------------
# Deterministic payload
# ---------------------------------------------------------------------------

#: A prime block length, so that reordered or duplicated chunks of any
#: power-of-two size change the stream.
BLOCK_SIZE = 65521


def _makeBlock() -> bytes:
    out = bytearray()
    i = 0
    while len(out) < BLOCK_SIZE:
        out += hashlib.sha256(b"mydataproxy-origin-%d" % i).digest()
        i += 1
    return bytes(out[:BLOCK_SIZE])


BLOCK = _makeBlock()


def iterPattern(n: int):
    """Yield the first C{n} bytes of the pattern as consecutive pieces."""
    full, rest = divmod(n, BLOCK_SIZE)
    for _ in range(full):
        yield BLOCK
    if rest:
        yield BLOCK[:rest]


def patternBytes(n: int) -> bytes:
    """The first C{n} bytes of the pattern."""
    return b"".join(iterPattern(n))


def patternSha256(n: int) -> str:
    """Hex sha256 of the first C{n} bytes of the pattern."""
    h = hashlib.sha256()
    for piece in iterPattern(n):
        h.update(piece)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# HTTP origin
# ---------------------------------------------------------------------------

REASONS = {
    100: b"Continue",
    200: b"OK",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
}

NO_BODY_STATUSES = {204, 304}


class BadRequest(Exception):
    pass


class OriginRequest:
    """One parsed request head."""

    def __init__(self, method: bytes, uri: bytes, version: bytes, headers):
        self.method = method
        self.uri = uri
        self.version = version
        self.headers = headers  # list of (name, value) bytes, wire order
        parts = urlsplit(uri.decode("latin-1"))
        self.path = parts.path
        self.query = parse_qs(parts.query)

    def header(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def tokens(self, name: bytes) -> set[bytes]:
        out = set()
        for value in self.header(name):
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
        return out


@implementer(IPullProducer)
class PatternProducer:
    """Writes the pattern to a transport, a few blocks per call."""

    BLOCKS_PER_CALL = 4

    def __init__(self, protocol: "OriginProtocol", n: int, chunked: bool):
        self.protocol = protocol
        self.pieces = iterPattern(n)
        self.chunked = chunked
        self.done = False

    def resumeProducing(self) -> None:
        if self.done:
            return
        transport = self.protocol.transport
        for _ in range(self.BLOCKS_PER_CALL):
            piece = next(self.pieces, None)
            if piece is None:
                self.done = True
                if self.chunked:
                    transport.write(b"0\r\n\r\n")
                transport.unregisterProducer()
                self.protocol.responseDone()
                return
            if self.chunked:
                transport.writeSequence([b"%x\r\n" % len(piece), piece, b"\r\n"])
            else:
                transport.write(piece)

    def stopProducing(self) -> None:
        self.done = True


class OriginProtocol(Protocol):
    """A deliberately plain HTTP/1.1 server state machine."""

    MAX_HEAD = 64 * 1024
    PAUSE_ABOVE = 1024 * 1024

    def connectionMade(self) -> None:
        f = self.factory
        f.accepted += 1
        f.open += 1
        self.connId = f.accepted
        self.counted = False
        self.requestsOnConnection = 0
        self.tls = ISSLTransport.providedBy(self.transport)
        self.buf = bytearray()
        self.state = "head"
        self.request: OriginRequest | None = None
        self.handler = None
        self.keepAlive = True
        self.remaining = 0
        self.processing = False
        self.paused = False
        self.earlyResponse = False

    def connectionLost(self, reason=None) -> None:
        self.factory.open -= 1
        self.state = "closed"
        if self.handler is not None:
            self.handler.connectionLost()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.buf += data
        self.process()

    # -- parsing ------------------------------------------------------------

    def process(self) -> None:
        if self.processing:
            return
        self.processing = True
        try:
            while self.state != "closed":
                if self.state == "head":
                    if not self.parseHead():
                        break
                elif self.state in ("cl", "chunk-size", "chunk-data", "chunk-crlf", "trailers"):
                    if not self.parseBody():
                        break
                else:  # handling / responding: wait for responseDone
                    if len(self.buf) > self.PAUSE_ABOVE and not self.paused:
                        self.paused = True
                        self.transport.pauseProducing()
                    break
        except BadRequest as e:
            self.sendSimple(400, str(e).encode() + b"\n", close=True)
        finally:
            self.processing = False

    def parseHead(self) -> bool:
        while self.buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore leading CRLF
            del self.buf[:2]
        idx = self.buf.find(b"\r\n\r\n")
        if idx < 0:
            if len(self.buf) > self.MAX_HEAD:
                raise BadRequest("head too large")
            return False
        head = bytes(self.buf[:idx])
        del self.buf[: idx + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            raise BadRequest("bad request line")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadRequest("bad header line")
            headers.append((name, value.strip(b" \t")))
        req = OriginRequest(parts[0], parts[1], parts[2], headers)
        self.request = req
        self.requestsOnConnection += 1
        f = self.factory
        if req.path != "/stats":
            f.requests += 1
            if not self.counted:
                self.counted = True
                f.connections += 1

        conn = req.tokens(b"connection")
        if req.version == b"HTTP/1.0":
            self.keepAlive = b"keep-alive" in conn
        else:
            self.keepAlive = b"close" not in conn

        te = req.header(b"transfer-encoding")
        cl = req.header(b"content-length")
        if te:
            if te[-1].strip().lower().split(b",")[-1].strip() != b"chunked":
                raise BadRequest("unsupported transfer-encoding")
            self.state = "chunk-size"
            hasBody = True
        elif cl:
            try:
                self.remaining = int(cl[0])
            except ValueError:
                raise BadRequest("bad content-length") from None
            self.state = "cl"
            hasBody = self.remaining > 0
        else:
            self.remaining = 0
            self.state = "cl"
            hasBody = False

        self.earlyResponse = False
        self.handler = route(self, req)
        if self.state == "closed":  # the handler aborted the connection
            return False
        if hasBody and b"100-continue" in req.tokens(b"expect") and req.version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.handler.start()
        return True

    def parseBody(self) -> bool:
        if self.state == "cl":
            if self.remaining:
                if not self.buf:
                    return False
                take = min(self.remaining, len(self.buf))
                chunk = bytes(self.buf[:take])
                del self.buf[:take]
                self.remaining -= take
                self.handler.bodyChunk(chunk)
                if self.remaining:
                    return False
            self.finishBody()
            return True
        if self.state == "chunk-size":
            idx = self.buf.find(b"\r\n")
            if idx < 0:
                if len(self.buf) > 4096:
                    raise BadRequest("chunk size line too long")
                return False
            line = bytes(self.buf[:idx]).split(b";")[0].strip()
            del self.buf[: idx + 2]
            try:
                self.remaining = int(line, 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            self.state = "chunk-data" if self.remaining else "trailers"
            return True
        if self.state == "chunk-data":
            if not self.buf:
                return False
            take = min(self.remaining, len(self.buf))
            chunk = bytes(self.buf[:take])
            del self.buf[:take]
            self.remaining -= take
            self.handler.bodyChunk(chunk)
            if not self.remaining:
                self.state = "chunk-crlf"
            return True
        if self.state == "chunk-crlf":
            if len(self.buf) < 2:
                return False
            if self.buf[:2] != b"\r\n":
                raise BadRequest("missing CRLF after chunk")
            del self.buf[:2]
            self.state = "chunk-size"
            return True
        if self.state == "trailers":
            idx = self.buf.find(b"\r\n")
            if idx < 0:
                return False
            del self.buf[: idx + 2]
            if idx == 0:
                self.finishBody()
            return True
        raise AssertionError(self.state)

    def finishBody(self) -> None:
        if self.earlyResponse:  # answered before the body ended: next request
            self.earlyResponse = False
            self.state = "head"
            self.handler = None
            return
        self.state = "handling"
        self.handler.bodyDone()

    # -- responding -----------------------------------------------------------

    def writeHead(self, status: int, headers, length: int | None) -> None:
        """Write a status line and headers; C{length} None means no C{Content-Length}."""
        reason = REASONS.get(status, b"Whatever")
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        for name, value in headers:
            lines.append(name + b": " + value)
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        if not self.keepAlive:
            lines.append(b"Connection: close")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def sendSimple(self, status: int, body: bytes, headers=(), close: bool = False,
                   contentLength: bool = True) -> None:
        if close:
            self.keepAlive = False
        isHead = self.request is not None and self.request.method == b"HEAD"
        self.writeHead(status, list(headers), len(body) if contentLength else None)
        if not isHead and status not in NO_BODY_STATUSES:
            self.transport.write(body)
        self.responseDone()

    def sendJSON(self, obj) -> None:
        body = json.dumps(obj).encode() + b"\n"
        self.sendSimple(200, body, [(b"Content-Type", b"application/json")])

    def responseDone(self) -> None:
        if self.state == "closed":
            return
        self.handler = None
        if not self.keepAlive:
            self.state = "closed"
            self.transport.loseConnection()
            return
        if self.state in ("handling", "responding"):
            self.state = "head"
        else:
            # An early response while the request body is still arriving:
            # keep parsing the body, but nobody listens to it any more.
            self.handler = _Discard()
            self.earlyResponse = True
            return
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        self.process()


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------


class Handler:
    def __init__(self, proto: OriginProtocol, req: OriginRequest):
        self.proto = proto
        self.req = req
        self.length = 0
        self.hash = hashlib.sha256()

    def bodyChunk(self, data: bytes) -> None:
        self.length += len(data)
        self.hash.update(data)

    def start(self) -> None:
        """The head has been parsed (the body, if any, follows)."""

    def bodyDone(self) -> None:
        raise NotImplementedError

    def connectionLost(self) -> None:
        pass


class _Discard(Handler):
    def __init__(self):
        pass

    def bodyChunk(self, data):
        pass

    def bodyDone(self):
        pass


class Echo(Handler):
    def bodyDone(self) -> None:
        p, r = self.proto, self.req
        closeAfter = r.query.get("close_after_ms")
        if closeAfter:
            # Keep-alive response, then a silent close while the connection idles.
            from twisted.internet import reactor

            reactor.callLater(int(closeAfter[0]) / 1000.0, p.transport.loseConnection)
        self.proto.sendJSON(
            {
                "method": r.method.decode("latin-1"),
                "uri": r.uri.decode("latin-1"),
                "version": r.version.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in r.headers],
                "body_length": self.length,
                "body_sha256": self.hash.hexdigest(),
                "tls": bool(p.tls),
                "connection": p.connId,
                "request_on_connection": p.requestsOnConnection,
            }
        )


class Sha256(Handler):
    def bodyDone(self) -> None:
        self.proto.sendJSON({"sha256": self.hash.hexdigest(), "length": self.length})


class Count(Handler):
    def bodyChunk(self, data: bytes) -> None:
        self.length += len(data)

    def bodyDone(self) -> None:
        self.proto.sendJSON({"length": self.length})


class Bytes(Handler):
    def __init__(self, proto, req, n: int, chunked: bool, eof: bool = False):
        super().__init__(proto, req)
        self.n = n
        self.chunked = chunked
        self.eof = eof
        self.producer = None

    def bodyDone(self) -> None:
        p = self.proto
        p.state = "responding"
        headers = [(b"Content-Type", b"application/octet-stream")]
        if self.eof:
            p.keepAlive = False  # body delimited by closing the connection
            p.writeHead(200, headers, None)
        elif self.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
            p.writeHead(200, headers, None)
        else:
            p.writeHead(200, headers, self.n)
        if self.req.method == b"HEAD":
            p.state = "handling"
            p.responseDone()
            return
        self.producer = PatternProducer(p, self.n, self.chunked)
        p.transport.registerProducer(self.producer, False)

    def connectionLost(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()


class Status(Handler):
    def __init__(self, proto, req, code: int):
        super().__init__(proto, req)
        self.code = code

    def bodyDone(self) -> None:
        p, code = self.proto, self.code
        if code == 304:
            headers = [(b"ETag", b'"v1"')]
            cl = self.req.query.get("cl")
            if cl:
                headers.append((b"Content-Length", cl[0].encode()))
            p.sendSimple(304, b"", headers, contentLength=False)
        elif code == 204:
            p.sendSimple(204, b"", [(b"X-Status", b"204")], contentLength=False)
        else:
            p.sendSimple(code, b"status %d\n" % code, [(b"Content-Type", b"text/plain")])


class EarlyStatus(Status):
    """Answers as soon as the head is in, before (and without) reading the body."""

    def start(self) -> None:
        Status.bodyDone(self)

    def bodyDone(self) -> None:
        pass


class EarlyHints(Echo):
    """A 103 interim response, then the echo."""

    def bodyDone(self) -> None:
        self.proto.transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        Echo.bodyDone(self)


class Hop(Handler):
    def bodyDone(self) -> None:
        self.proto.sendSimple(
            200,
            b"hop\n",
            [
                (b"Content-Type", b"text/plain"),
                (b"Connection", b"X-Custom, Keep-Alive"),
                (b"X-Custom", b"1"),
                (b"Keep-Alive", b"timeout=5, max=100"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Trailer", b"X-Trail"),
                (b"Upgrade", b"foo/2"),
                (b"X-End-To-End", b"yes"),
            ],
        )


class Rep(Handler):
    def bodyDone(self) -> None:
        self.proto.sendSimple(
            200,
            b"rep\n",
            [
                (b"Set-Cookie", b"a=1"),
                (b"X-Rep", b"1"),
                (b"Set-Cookie", b"b=2"),
                (b"X-Rep", b"2"),
                (b"X-Rep", b"3"),
            ],
        )


class Delay(Handler):
    def __init__(self, proto, req, ms: int):
        super().__init__(proto, req)
        self.ms = ms
        self.call = None

    def bodyDone(self) -> None:
        from twisted.internet import reactor

        def answer():
            self.call = None
            self.proto.sendSimple(200, b"delayed %d\n" % self.ms, [(b"Content-Type", b"text/plain")])

        self.call = reactor.callLater(self.ms / 1000.0, answer)

    def connectionLost(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()


class Slow(Handler):
    def bodyDone(self) -> None:
        pass  # never answer


class Stats(Handler):
    def bodyDone(self) -> None:
        f = self.proto.factory
        self.proto.sendJSON(
            {
                "connections": f.connections,
                "requests": f.requests,
                "accepted": f.accepted,
                "open": f.open,
            }
        )


def abortWithReset(proto: OriginProtocol) -> None:
    transport = proto.transport
    try:
        sock = transport.getHandle()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except Exception:
        pass
    proto.state = "closed"
    transport.abortConnection()


def pauseReading(proto: OriginProtocol, ms: int) -> None:
    """Stop reading from the connection for C{ms} milliseconds (a slow consumer)."""
    from twisted.internet import reactor

    transport = proto.transport
    transport.pauseProducing()
    reactor.callLater(ms / 1000.0, transport.resumeProducing)


def route(proto: OriginProtocol, req: OriginRequest) -> Handler:
    path = req.path
    method = req.method
    parts = path.strip("/").split("/")
    try:
        if parts[0] in ("bytes", "chunked", "eof") and len(parts) == 2:
            return Bytes(proto, req, int(parts[1]), chunked=parts[0] == "chunked",
                         eof=parts[0] == "eof")
        if parts[0] == "status" and len(parts) == 2:
            if req.query.get("early"):
                return EarlyStatus(proto, req, int(parts[1]))
            return Status(proto, req, int(parts[1]))
        if parts[0] == "delay" and len(parts) == 2:
            return Delay(proto, req, int(parts[1]))
    except ValueError:
        pass
    if path in ("/sha256", "/count") and method in (b"POST", b"PUT"):
        pause = req.query.get("pause_ms")
        if pause:
            pauseReading(proto, int(pause[0]))
        return (Sha256 if path == "/sha256" else Count)(proto, req)
    if path == "/hop":
        return Hop(proto, req)
    if path == "/early-hints":
        return EarlyHints(proto, req)
    if path == "/rep":
        return Rep(proto, req)
    if path == "/slow":
        return Slow(proto, req)
    if path == "/stats":
        return Stats(proto, req)
    if path == "/reset":
        abortWithReset(proto)
        return _Discard()
    if path == "/close":
        proto.state = "closed"
        proto.transport.loseConnection()
        return _Discard()
    return Echo(proto, req)


class OriginFactory(Factory):
    protocol = OriginProtocol

    def __init__(self):
        self.accepted = 0
        self.connections = 0
        self.requests = 0
        self.open = 0


# ---------------------------------------------------------------------------
# Raw TCP mode
# ---------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class HalfCloseSink(Protocol):
    def connectionMade(self) -> None:
        self.hash = hashlib.sha256()
        self.length = 0
        self.first = True
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if self.first and data.startswith(b"CLOSE"):
            self.closed = True
            self.transport.write(b"closing\n")
            self.transport.loseConnection()
            return
        self.first = False
        self.length += len(data)
        self.hash.update(data)

    def readConnectionLost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport.write(b"%d %s\n" % (self.length, self.hash.hexdigest().encode()))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


# ---------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--mode", choices=["http", "tcp"], default="http")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    if args.mode == "http":
        factory = OriginFactory()
    else:
        factory = Factory.forProtocol(HalfCloseSink)

    if args.tls_cert:
        from twisted.internet import ssl

        with open(args.tls_cert, "rb") as f:
            certPem = f.read()
        with open(args.tls_key or args.tls_cert, "rb") as f:
            keyPem = f.read()
        pem = ssl.PrivateCertificate.loadPEM(certPem + b"\n" + keyPem)
        # Explicit ALPN: without it, a client offering ALPN (curl does) gets
        # a TLS "internal error" alert from this Twisted/pyOpenSSL pair.
        options = ssl.CertificateOptions(
            privateKey=pem.privateKey.original,
            certificate=pem.original,
            acceptableProtocols=[b"http/1.1"],
        )
        port = reactor.listenSSL(args.port, factory, options, interface=args.host)
    else:
        port = reactor.listenTCP(args.port, factory, interface=args.host)

    sys.stdout.write("%d\n" % port.getHost().port)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
