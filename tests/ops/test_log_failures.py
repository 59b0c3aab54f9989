"""
The log mount fails, traffic goes on: a real proxy under load whose access
log is a FIFO nobody reads, or whose log directory vanishes and comes back;
SIGUSR1 after an outside rename; a log directory that cannot be created; the
daemon's own lines in the error log; the MyData fields of a real request.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    TWISTD,
    LogWatch,
    RawConnection,
    build_request,
    default_config,
    get_free_port,
    to_toml,
    wait_for_port,
)

# Slower than this, a proxied request counts as slowed by the log.
P99_BOUND = 0.2
# The writer checks every MOVED_CHECK_SECONDS (5 s) that the path still names its file.
MOVED_CHECK_SECONDS = 5.0
HOST = socket.gethostname()
TAGGED = re.compile(r"/echo/(\w+)/(\d+)\?")


@dataclass
class Result:
    tag: str
    seq: int
    status: int
    seconds: float
    started: float


class Load:
    """
    Requests through the forward proxy to the origin from a few worker
    threads (keep-alive connections), each request's status and latency kept.
    The target is C{/echo/TAG/SEQ?PAD}: its access line names it.
    """

    def __init__(self, proxy, origin, tag: str, workers: int = 4, pad: int = 0, pause: float = 0.0) -> None:
        self.proxy = proxy
        self.origin = origin
        self.tag = tag
        self.workers = workers
        self.pad = "p" * pad
        self.pause = pause
        self.results: list[Result] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._limit: int | None = None

    def _next(self) -> int | None:
        with self._lock:
            seq = next(self._seq)
        if self._stop.is_set() or (self._limit is not None and seq >= self._limit):
            return None
        return seq

    def _work(self) -> None:
        connection = None
        while (seq := self._next()) is not None:
            started = time.monotonic()
            status = 0
            try:
                if connection is None:
                    connection = RawConnection(self.proxy.port, timeout=10)
                connection.send(build_request(
                    "GET", f"{self.origin.url}/echo/{self.tag}/{seq}?{self.pad}", [("Host", self.origin.authority)]))
                status = connection.read_response().status
            except (OSError, AssertionError):
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self.results.append(Result(self.tag, seq, status, time.monotonic() - started, started))
            if self.pause:
                time.sleep(self.pause)
        if connection is not None:
            connection.close()

    def start(self, count: int | None = None) -> "Load":
        self._limit = count
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 60.0) -> list[Result]:
        for thread in self._threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self._threads), "the load did not finish"
        return self.results

    def stop(self) -> list[Result]:
        self._stop.set()
        return self.join()

    def run(self, count: int) -> list[Result]:
        return self.start(count).join()


def assert_all_fast_and_ok(results: list[Result]) -> None:
    """Every request answered 200, and the 99th percentile of latencies under the bound."""
    assert results, "no request was sent"
    failed = [r for r in results if r.status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    latencies = sorted(r.seconds for r in results)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < P99_BOUND, f"p99 {p99 * 1000:.0f} ms over {len(results)} requests (max {latencies[-1] * 1000:.0f} ms)"


def tagged(data: bytes) -> list[tuple[str, int]]:
    """The (tag, seq) of each complete access line in C{data}."""
    found = []
    for line in data.rpartition(b"\n")[0].decode("utf-8", "replace").splitlines():
        match = TAGGED.search(line)
        assert match, f"an access line of no request of this test: {line[:300]!r}"
        found.append((match.group(1), int(match.group(2))))
    return found


class FifoDrain:
    """Reads a FIFO in a thread, from when it is started until stopped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.fd], [], [], 0.05)
            if not readable:
                continue
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            if chunk:
                self.data += chunk
            else:
                time.sleep(0.02)  # no writer (yet, or any more)

    def start(self) -> "FifoDrain":
        self._thread.start()
        return self

    def stop(self) -> bytes:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        return bytes(self.data)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_aFifoWhoseReaderStoppedDropsLinesButNoRequest(proxy_factory, origin, tmp_path: Path) -> None:
    fifo = tmp_path / "logs" / "access.log"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    # A reader that never reads: the writer fills the pipe (made as small as
    # Linux allows) and blocks in write, as on a hung NFS mount.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    drain = FifoDrain(reader)
    try:
        fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        proxy = proxy_factory(logging={"access_log": str(fifo), "queue_lines": 512})
        watch = LogWatch(proxy)
        # ~1.1 KiB lines: the pipe holds 4; more lines than the queue holds
        # (512), over more flushes than it has room for.
        blocked = Load(proxy, origin, "blocked", workers=8, pad=1000, pause=0.01).run(1000)
        assert_all_fast_and_ok(blocked)
        watch.wait(rf"access log {re.escape(str(fifo))} is not keeping up: dropping lines")

        drain.start()
        resumed = LogWatch(proxy)
        after = Load(proxy, origin, "after").run(100)
        assert_all_fast_and_ok(after)
        line = resumed.wait(r"access log .* takes lines again")
        dropped, lost = map(int, re.search(r"(\d+) dropped, (\d+) not written in all", line).groups())
        assert dropped > 0 and lost == 0, line
        wait_until(lambda: len([t for t in tagged(bytes(drain.data)) if t[0] == "after"]) == 100, 10,
                   "the lines after the reader came back did not all reach the FIFO")

        stopping = LogWatch(proxy)
        assert proxy.stop() is not None
        at_stop = stopping.new()
    finally:
        data = drain.stop()
        os.close(reader)
    assert "not keeping up" not in resumed.new(), "lines were dropped again after the reader came back"
    assert data.endswith(b"\n")
    lines = tagged(data)
    assert len(set(lines)) == len(lines), "a line was written twice"
    assert {seq for tag, seq in lines if tag == "after"} == set(range(100)), "a line after the reader came back is missing"
    # Every request is accounted for: its line reached the FIFO, or was counted as dropped.
    assert len(lines) + dropped == len(blocked) + len(after), (len(lines), dropped)
    # The drops of the last minute are not left for a report that never comes.
    assert re.search(rf"access log .*\b{dropped}\b.*dropped", at_stop), at_stop[-3000:]


def test_aVanishedLogDirectoryLosesLinesButNoRequestAndRecovers(proxy_factory, origin, tmp_path: Path) -> None:
    mount = tmp_path / "efs"
    mount.mkdir()
    access = mount / "access.log"
    proxy = proxy_factory(logging={"directory": str(mount), "access_log": str(access), "queue_lines": 512})
    watch = LogWatch(proxy)
    load = Load(proxy, origin, "load", pause=0.005).start()
    try:
        time.sleep(0.5)
        away = tmp_path / "efs-unmounted"
        os.rename(mount, away)
        # The writer notices at its next path check (every 5 s).
        failed = watch.wait(rf"access log {re.escape(str(access))} write failed", timeout=MOVED_CHECK_SECONDS + 3)
        time.sleep(0.5)
        os.rename(away, mount)
        back = time.monotonic()
        recovered = watch.wait(rf"access log {re.escape(str(access))} is written again", timeout=10)
        recovered_at = time.monotonic()
        time.sleep(0.5)
    finally:
        results = load.stop()
    assert_all_fast_and_ok(results)
    lost = int(re.search(r"\((\d+) lines lost in all\)", recovered).group(1))
    assert lost > 0, recovered
    assert recovered_at - back < 10, f"writing resumed {recovered_at - back:.1f} s after the directory came back"
    stopping = LogWatch(proxy)
    assert proxy.stop() is not None
    final = re.search(r"access log .*: (\d+) lines could not be written", stopping.new())
    assert final, f"no count of the lost lines at stop: {stopping.new()[-2000:]}"
    lines = tagged(access.read_bytes())
    assert len(set(lines)) == len(lines), "a line was written twice"
    later = {("load", r.seq) for r in results if r.started > recovered_at}
    assert later and later <= set(lines), "requests sent once writing resumed are missing from the file"
    assert len(lines) + int(final.group(1)) == len(results), (len(lines), final.group(0), len(results), failed)


def test_sigusr1AfterAnOutsideRenameStartsANewFile(proxy_factory, origin, tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    access = directory / "access.log"
    proxy = proxy_factory(logging={"directory": str(directory), "access_log": str(access)})
    before = Load(proxy, origin, "before", workers=1).run(5)
    wait_until(lambda: len(proxy.access_lines()) == 5, 5, "the first lines never reached the file")
    os.rename(access, directory / "access.log.1")  # logrotate, without copytruncate
    watch = LogWatch(proxy)
    proxy.proc.send_signal(signal.SIGUSR1)
    watch.wait("SIGUSR1: reopening the log files")
    after = Load(proxy, origin, "after", workers=1).run(5)
    wait_until(lambda: len(proxy.access_lines()) == 5, 2, "the lines after SIGUSR1 did not reach a new access.log")
    assert_all_fast_and_ok(before + after)
    assert proxy.alive(), "SIGUSR1 stopped the proxy"
    assert sorted(tagged(access.read_bytes())) == [("after", n) for n in range(5)]
    assert sorted(tagged((directory / "access.log.1").read_bytes())) == [("before", n) for n in range(5)]
    assert stat.S_IMODE(access.stat().st_mode) == 0o640


def start_daemon(workdir: Path, config: dict) -> tuple[subprocess.Popen, Path]:
    """C{twistd -n mydataproxy} with C{config}; its combined output goes to C{workdir}/twistd.out."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "mydataproxy.toml"
    path.write_text(to_toml(config))
    output = workdir / "twistd.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "mydataproxy", "--config", str(path)],
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, path


def test_theLogDirectoryIsCreatedAndTheFilesNamedWithTheHost(
    tmp_path: Path, origin, session_connect_ports, dns_server
) -> None:
    directory = tmp_path / "mnt" / "proxy" / "log"
    port = get_free_port()
    config = default_config(port, directory / "unused", session_connect_ports, dns_server)
    config["logging"] = {"directory": str(directory), "level": "info"}
    proc, config_path = start_daemon(tmp_path / "daemon", config)
    try:
        assert wait_for_port(port, 10, proc), (tmp_path / "daemon" / "twistd.out").read_text()
        with RawConnection(port) as c:
            c.send(build_request("GET", f"{origin.url}/echo/created/0?", [("Host", origin.authority)]))
            assert c.read_response().status == 200
        access = directory / f"access.{HOST}.log"
        error = directory / f"error.{HOST}.log"
        wait_until(lambda: access.exists() and b"/echo/created/0?" in access.read_bytes(), 5,
                   f"no access line in {access}: {sorted(p.name for p in directory.iterdir())}")
        wait_until(lambda: b"listening on" in error.read_bytes(), 5, f"no daemon lines in {error}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    # A drained stop exits 0.
    assert proc.returncode == 0, (tmp_path / "daemon" / "twistd.out").read_text()
    assert sorted(p.name for p in directory.iterdir()) == sorted([access.name, error.name])
    for path in (access, error):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    daemon = error.read_text()
    assert f"configuration from {config_path}" in daemon, daemon
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ .*forward listening on", daemon, re.M), daemon


@pytest.mark.parametrize("case", ["under a file", "not permitted"])
def test_aLogDirectoryThatCannotBeCreatedIsOneLineAtStart(
    tmp_path: Path, session_connect_ports, dns_server, case: str
) -> None:
    if case == "under a file":
        blocker = tmp_path / "efs"
        blocker.write_text("a file where the mount point should be\n")
        directory = blocker / "log"
    else:
        # sysfs refuses new directories to everyone, root included.
        directory = Path("/sys/mydataproxy-test-log")
    port = get_free_port()
    config = default_config(port, tmp_path / "unused", session_connect_ports, dns_server)
    config["logging"] = {"directory": str(directory)}
    proc, config_path = start_daemon(tmp_path / "daemon", config)
    try:
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    output = (tmp_path / "daemon" / "twistd.out").read_text()
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    assert not directory.exists()
    named = [line for line in output.splitlines() if str(directory) in line]
    assert len(named) == 1 and "mydataproxy: " in named[0], output
    # One line, as for a bad config file: not a log event among twistd's start-up lines.
    assert output.splitlines() == [named[0]] and named[0].startswith("mydataproxy: "), output


def test_theErrorLogGetsTheDaemonsLines(proxy_factory, origin, tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    proxy = proxy_factory(logging={"directory": str(directory), "access_log": str(directory / "access.log")})
    error = directory / f"error.{HOST}.log"
    wait_until(lambda: error.exists() and b"listening on" in error.read_bytes(), 5,
               f"no daemon lines in {error}: {proxy.output()[-2000:]}")
    watch = LogWatch(proxy)
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", "/echo/refused/0?", [("Host", "x")]))  # no x-target-host: refused
        assert c.read_response().status == 403
    refusal = watch.wait("/echo/refused/0")
    wait_until(lambda: b"/echo/refused/0" in error.read_bytes(), 5, f"the refusal line is not in {error}")
    assert proxy.stop() is not None
    daemon = error.read_text()
    assert f"configuration from {proxy.config_path}" in daemon, daemon
    assert refusal.split("] ", 1)[1] in daemon, (refusal, daemon)
    assert stat.S_IMODE(error.stat().st_mode) == 0o640


def test_aProxiedRequestsTransactionIdAndUserAgentReachTheAccessLog(proxy_factory, origin) -> None:
    """The MyData transaction id and the user agent of a real request, in a json access line."""
    proxy = proxy_factory(logging={"format": "json"})
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", f"{origin.url}/echo/fields/0?", [
            ("Host", origin.authority), ("x-api-tran-id", "1234567890M00000000000001"),
            ("User-Agent", "MyDataClient/1.0 (bank)")]))
        assert c.read_response().status == 200
    wait_until(lambda: any("/echo/fields/0?" in line for line in proxy.access_lines()), 5, "no access line")
    [entry] = [json.loads(line) for line in proxy.access_lines() if "/echo/fields/0?" in line]
    assert entry["method"] == "GET" and entry["status"] == 200, entry
    assert entry.get("tran_id") == "1234567890M00000000000001", entry
    assert entry.get("ua") == "MyDataClient/1.0 (bank)", entry
