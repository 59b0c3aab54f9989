"""
The skeleton the test servers share: a TCP listener on 127.0.0.1, a thread
per connection running C{handle(sock)}, and a close that ends them all.
"""

from __future__ import annotations

import socket
import threading

LOOPBACK = "127.0.0.1"


class LoopbackServer:
    """
    A TCP server on 127.0.0.1 (on C{port}, or a free one), a thread per
    connection running C{handle(sock)}; a peer going away (C{EOFError},
    C{OSError}, C{ValueError} from a torn read) ends its thread quietly, and
    the socket is closed after C{handle} returns.
    """

    def __init__(self, port: int = 0, backlog: int = 64) -> None:
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, port))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def handle(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self._sockets.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handle(sock)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
