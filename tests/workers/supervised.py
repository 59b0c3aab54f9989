"""
Helpers for the workers tests: a proxy started with C{[daemon] workers},
seen from outside as an operator would (its admin listener, /proc), and a
worker's private admin socket asked directly.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import pytest
import requests

from conftest import LOOPBACK, ProxyProcess, get_free_port, wait_for_port
from prometheus_client.parser import text_string_to_metric_families


def children(pid: int) -> list[int]:
    """The worker processes of supervisor C{pid} (from /proc: its children running mydataproxy.workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == pid and b"mydataproxy.workers" in argv:
            found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    """Whether process C{pid} still runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def admin_socket(pid: int) -> str:
    """The private admin socket of worker C{pid}, from its command line."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("--admin-socket") + 1]


def unix_get(path: str, target: str, accept: str = "") -> tuple[int, str]:
    """GET C{target} from the HTTP server on UNIX socket C{path}: status and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        head = f"GET {target} HTTP/1.0\r\nHost: worker\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        s.sendall((head + "\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a text exposition, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_counted(text: str) -> float:
    """The requests a text exposition counts, over every mode, method and status."""
    return sum(v for (name, _), v in samples(text).items() if name == "mydataproxy_requests_total")


@dataclass
class Supervised:
    """A proxy run by a supervisor: the twistd process, and the admin port it serves."""

    proxy: ProxyProcess
    admin_port: int

    @property
    def pid(self) -> int:
        return self.proxy.pid

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}{path}"

    def readyz(self) -> requests.Response:
        return requests.get(self.url("/readyz"), timeout=5)

    def metrics(self) -> str:
        return requests.get(self.url("/metrics"), timeout=5).text

    def workers(self) -> list[int]:
        return children(self.pid)

    def wait_ready(self, count: int, timeout: float = 15.0, other_than: tuple[int, ...] = ()) -> list[int]:
        """
        Wait until /readyz says ready with C{count} workers running, none of
        them in C{other_than}; return their pids.
        """
        deadline = time.monotonic() + timeout
        while True:
            pids = self.workers()
            try:
                ready = self.readyz().status_code == 200
            except requests.RequestException:
                ready = False
            if ready and len(pids) == count and not set(pids) & set(other_than):
                return pids
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not ready with {count} new workers within {timeout} s: workers {pids}, "
                    f"readyz {self.readyz().text!r}; output:\n{self.proxy.output()[-3000:]}"
                )
            time.sleep(0.05)


def start_supervised(proxy_factory, workers: int = 2, **sections) -> Supervised:
    """A proxy with C{workers} workers and an admin listener, once every worker is ready."""
    admin = get_free_port()
    daemon = {"workers": workers, "shutdown_timeout": 1.0}
    daemon.update(sections.pop("daemon", {}))
    proxy = proxy_factory(daemon=daemon, admin={"listen": f"tcp:{admin}:interface={LOOPBACK}"}, **sections)
    assert wait_for_port(admin, 10.0, proxy.proc), proxy.output()
    supervised = Supervised(proxy, admin)
    supervised.wait_ready(workers)
    return supervised
