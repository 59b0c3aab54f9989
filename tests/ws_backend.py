"""
A WebSocket (RFC 6455) echo backend for the reverse-proxy tests, written on
the standard library alone: it lives in the test process (a thread per
connection, loopback only) and keeps what reached it, so a test can say
which handshake arrived and whether the peer's half-close came through.

Behaviour of L{WebSocketEchoServer}:

  - A request that is not a WebSocket handshake (no C{Upgrade: websocket},
    no C{upgrade} token in C{Connection}, no C{Sec-WebSocket-Key}) is
    answered C{400} with C{Connection: close}.
  - A handshake is answered C{101} with the right C{Sec-WebSocket-Accept},
    and in the same write a text frame C{hello} (bytes right behind the
    101 head, which a tunnel must relay).
  - Each complete message (text or binary, fragmented or not) is echoed as
    one unmasked frame of the same opcode; a ping is answered with a pong.
  - The text message C{bye} makes the server close first: a close frame
    (1000, C{bye}), then its write side is shut; it then waits for the
    client's close frame and EOF.
  - A close frame is answered with a close frame carrying the same payload,
    then the server shuts its write side (the server ends the TCP
    connection first, RFC 6455 section 7.1.1) and waits for EOF from the
    peer (recorded as C{eof_after_close}) before closing the socket.

The frame helpers (L{encode_frame}, L{read_frame}) serve the test's client
side too: clients mask their frames, servers do not.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

from loopback_server import LoopbackServer
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def accept_key(key: str) -> str:
    """The C{Sec-WebSocket-Accept} value for a C{Sec-WebSocket-Key} (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def new_key() -> str:
    """A fresh C{Sec-WebSocket-Key}: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def _apply_mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    stream = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bool, fin: bool = True) -> bytes:
    """One frame; C{mask} is true for frames a client sends (RFC 6455 section 5.3)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    maskBit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, maskBit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, maskBit | 126, n)
    else:
        head = struct.pack("!BBQ", first, maskBit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _apply_mask(payload, key)


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    masked: bool


def read_frame(read_exact: Callable[[int], bytes]) -> Frame:
    """Read one frame with C{read_exact(n) -> bytes} (which raises at EOF)."""
    first, second = read_exact(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", read_exact(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", read_exact(8))
    masked = bool(second & 0x80)
    key = read_exact(4) if masked else b""
    payload = read_exact(n)
    if masked:
        payload = _apply_mask(payload, key)
    return Frame(bool(first & 0x80), first & 0x0F, payload, masked)


def handshake_request(target: str, host: str, key: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The bytes of a client's opening handshake (RFC 6455 section 4.1)."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{n}: {v}" for n, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Reader:
    """Buffered exact reads from a socket; EOFError at end of stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, marker: bytes, limit: int = 65536) -> bytes:
        while marker not in self.buf:
            if len(self.buf) > limit:
                raise ValueError("head too large")
            self._fill()
        i = self.buf.index(marker)
        out = bytes(self.buf[:i])
        del self.buf[: i + len(marker)]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def at_eof(self, timeout: float) -> bool:
        """Whether the peer's EOF comes within C{timeout} (anything else read is dropped)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
            return True
        except OSError:
            return False


class WebSocketEchoServer(LoopbackServer):
    """
    The server described in the module docstring.  C{handshakes} holds one
    dict per request head received: C{target}, C{headers} (list of
    (name, value), names as sent), C{upgraded}; C{closes} one dict per
    connection that ended: C{close_payload} (of the client's close frame,
    or None), C{eof_after_close}, C{messages} (count echoed).
    """

    def __init__(self) -> None:
        self.handshakes: list[dict] = []
        self.closes: list[dict] = []
        super().__init__()

    def wait_closes(self, count: int, timeout: float = 5.0) -> list[dict]:
        """The connection ends recorded, once there are C{count} (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                seen = list(self.closes)
            if len(seen) >= count or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)

    def handle(self, sock: socket.socket) -> None:
        reader = _Reader(sock)
        if self._handshake(sock, reader):
            self._echo(sock, reader)

    def _handshake(self, sock: socket.socket, reader: _Reader) -> bool:
        lines = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else ""
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip(" \t")))
        values = {n.lower(): v for n, v in headers}
        connection = {t.strip().lower() for t in values.get("connection", "").split(",")}
        upgraded = (
            values.get("upgrade", "").lower() == "websocket"
            and "upgrade" in connection
            and bool(values.get("sec-websocket-key"))
        )
        with self.lock:
            self.handshakes.append({"target": target, "headers": headers, "upgraded": upgraded})
        if not upgraded:
            body = b"not a websocket handshake\n"
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            return False
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(values['sec-websocket-key'])}\r\n\r\n"
        ).encode("latin-1")
        sock.sendall(response + encode_frame(OP_TEXT, b"hello", mask=False))
        return True

    def _echo(self, sock: socket.socket, reader: _Reader) -> None:
        record = {"close_payload": None, "eof_after_close": False, "messages": 0}
        opcode, parts = None, []
        try:
            while True:
                frame = read_frame(reader.exact)
                if frame.opcode == OP_PING:
                    sock.sendall(encode_frame(OP_PONG, frame.payload, mask=False))
                    continue
                if frame.opcode == OP_CLOSE:
                    record["close_payload"] = frame.payload
                    sock.sendall(encode_frame(OP_CLOSE, frame.payload, mask=False))
                    sock.shutdown(socket.SHUT_WR)
                    record["eof_after_close"] = reader.at_eof(5.0)
                    return
                if frame.opcode != OP_CONTINUATION:
                    opcode, parts = frame.opcode, []
                parts.append(frame.payload)
                if not frame.fin:
                    continue
                message = b"".join(parts)
                if opcode == OP_TEXT and message == b"bye":
                    sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye", mask=False))
                    sock.shutdown(socket.SHUT_WR)
                    reply = read_frame(reader.exact)
                    record["close_payload"] = reply.payload if reply.opcode == OP_CLOSE else None
                    record["eof_after_close"] = reader.at_eof(5.0)
                    return
                sock.sendall(encode_frame(opcode, message, mask=False))
                record["messages"] += 1
        finally:
            with self.lock:
                self.closes.append(record)
