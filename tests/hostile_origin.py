"""
A scripted origin for the adversarial origin corpus: it answers each request
with raw bytes chosen by the test, then closes cleanly, resets (RST), closes
a TLS stream without close_notify, or keeps the connection for the next
request; and it records every request it received, raw.

It lives in the test process, in threads, on 127.0.0.1 and an ephemeral
port.  Its own request parser is lenient on purpose (a head ends at the first
CRLFCRLF; a body is read by Content-Length or chunked framing): whatever a
proxy sends is recorded, not judged.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LOOPBACK = "127.0.0.1"

# What the origin does after sending a reply.
KEEP = "keep"  # read the next request on the same connection
CLOSE = "close"  # clean close (TLS: close_notify first)
RESET = "reset"  # RST: SO_LINGER 0, then close
ABRUPT = "abrupt"  # TLS: close the socket without close_notify
HOLD = "hold"  # send nothing more, read nothing more, keep the socket open


@dataclass
class Reply:
    """
    One scripted answer.

    @ivar data: The raw bytes sent (pieces are sent one by one, C{pause}
        seconds apart, so a test can control how the proxy's reads split).
    @ivar then: What to do after: L{KEEP}, L{CLOSE}, L{RESET}, L{ABRUPT}, L{HOLD}.
    @ivar early: Answer as soon as the request head arrived, before reading
        its body (the body is then read and discarded if C{then} is KEEP).
    """

    data: bytes | list[bytes]
    then: str = KEEP
    early: bool = False
    pause: float = 0.05


@dataclass
class Received:
    """A request as the origin saw it."""

    connection: int
    index: int  # on its connection, from 0
    head: bytes
    body: bytes = b""
    complete: bool = False

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def path(self) -> str:
        parts = self.request_line.split(" ")
        return parts[1] if len(parts) > 1 else ""


@dataclass
class _Connection:
    number: int
    sock: socket.socket
    raw: bytearray = field(default_factory=bytearray)


Responder = Callable[[Received], Reply]


class HostileOrigin:
    """
    A threaded origin whose answers come from C{responder(request)}.

    @param tls: C{(cert_pem, key_pem)} to speak TLS (the proxy must trust
        the certificate's CA).
    """

    def __init__(self, responder: Responder, tls: tuple[Path, Path] | None = None) -> None:
        self.responder = responder
        self.lock = threading.Lock()
        self.requests: list[Received] = []
        self.connections: list[_Connection] = []
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(tls[0]), str(tls[1]))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self._context is not None else "http"
        return f"{scheme}://{self.authority}"

    def received(self) -> list[Received]:
        """The requests received so far (a copy)."""
        with self.lock:
            return list(self.requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for c in self.connections:
                try:
                    c.sock.close()
                except OSError:
                    pass
        self._thread.join(5)

    def __enter__(self) -> "HostileOrigin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- serving --------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                connection = _Connection(len(self.connections), sock)
                self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_side=True)
                connection.sock = sock
            reader = _Reader(sock, connection.raw, self.lock)
            index = 0
            while True:
                head = reader.until(b"\r\n\r\n")
                request = Received(connection.number, index, head)
                with self.lock:
                    self.requests.append(request)
                index += 1
                reply = self.responder(request)
                if not reply.early:
                    self._readBody(reader, request)
                self._send(sock, reply)
                if reply.then == KEEP:
                    if reply.early:
                        self._readBody(reader, request)
                    continue
                self._finish(sock, reply.then)
                return
        except (EOFError, OSError, ssl.SSLError, ValueError):
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _readBody(reader: "_Reader", request: Received) -> None:
        fields = {}
        for line in request.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        body = bytearray()
        if b"transfer-encoding" in fields:
            while True:
                size = int(reader.until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while reader.until(b"\r\n") != b"\r\n":
                        pass
                    break
                body += reader.exact(size)
                reader.exact(2)
        elif b"content-length" in fields:
            body += reader.exact(int(fields[b"content-length"]))
        request.body = bytes(body)
        request.complete = True

    @staticmethod
    def _send(sock: socket.socket, reply: Reply) -> None:
        pieces = [reply.data] if isinstance(reply.data, bytes) else reply.data
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(reply.pause)
            sock.sendall(piece)

    @staticmethod
    def _finish(sock: socket.socket, how: str) -> None:
        if how == HOLD:
            return  # closed by close() at the end of the test
        if how == RESET:
            raw = sock
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            return
        if how == CLOSE and isinstance(sock, ssl.SSLSocket):
            try:
                sock = sock.unwrap()  # sends close_notify
            except (OSError, ssl.SSLError):
                pass
        # ABRUPT: an SSLSocket closed without unwrap() sends no close_notify.
        sock.close()


class _Reader:
    """Buffered reads from a socket, recording every byte."""

    def __init__(self, sock: socket.socket, raw: bytearray, lock: threading.Lock) -> None:
        self.sock = sock
        self.raw = raw
        self.lock = lock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        with self.lock:
            self.raw += data
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out
