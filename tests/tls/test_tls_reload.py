"""
Unit tests of how a reload (SIGHUP) takes new TLS material
(L{mydataproxy.service.ProxyService.reload}): the config file and its key
stores are read in a thread of the reactor's pool, never on the reactor
thread, and the new holders are put in force only on the reactor thread; a
store that cannot be loaded leaves the old material in force and says why.

The reactor is a stand-in (L{ThreadsReactor}) with a real thread pool whose
C{callFromThread} hands each call over to the test, which stands for the
reactor thread.  The service is built from a real config file but not
started: a reload that keeps the listener's endpoint binds nothing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool

from conftest import LOOPBACK, to_toml
from test_tls import Issued, make_ca, server_leaf, write_pem_identity
from mydataproxy import config
from mydataproxy.material import loadMaterial
from mydataproxy.service import ProxyService
from mydataproxy.tls import contexts as tls

POOL_NAME = "reload-test"


class ThreadsReactor(MemoryReactorClock):
    """
    A reactor stand-in with a real thread pool; what a thread hands over
    with C{callFromThread} waits, uncalled, for L{handedOver}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool(1, 1, POOL_NAME)
        self.handed: queue.Queue = queue.Queue()

    def getThreadPool(self) -> ThreadPool:
        return self.pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.handed.put((f, args, kwargs))

    def handedOver(self, timeout: float = 10.0) -> Callable[[], None]:
        """Wait for the next call a thread hands over, and return it, to be run by the caller."""
        f, args, kwargs = self.handed.get(timeout=timeout)
        return lambda: f(*args, **kwargs)


def write_config(path: Path, tmp_path: Path, key_store: Path, **tls_settings: str) -> Path:
    """A config file whose forward listener speaks TLS with C{key_store}."""
    path.write_text(to_toml({
        "forward": {"listen": f"tcp:0:interface={LOOPBACK}"},
        "forward.tls": {"key_store": str(key_store), **tls_settings},
        "logging": {"access_log": str(tmp_path / "access.log")},
    }))
    return path


@contextmanager
def reloadable(path: Path) -> Iterator[tuple[ProxyService, ThreadsReactor]]:
    """
    A service built from the config file at C{path} as start-up builds it,
    on a L{ThreadsReactor} whose pool runs; stopped at the end.
    """
    reactor = ThreadsReactor()
    reactor.pool.start()
    settings = config.load(str(path))
    service = ProxyService(settings, loadMaterial(settings), reactor)
    try:
        yield service, reactor
    finally:
        for generation in (service.generation, *service.retiring):
            generation.stop(logs=False)
        reactor.pool.stop()


def reloadNow(service: ProxyService, reactor: ThreadsReactor) -> bool:
    """Run a reload to its end: the load in the pool, then the swap here; whether it took."""
    outcome: list[bool] = []
    service.reload().addCallback(outcome.append)
    reactor.handedOver()()
    assert len(outcome) == 1, "the reload did not end once its load was handed over"
    return outcome[0]


def served(service: ProxyService) -> int:
    """The serial of the certificate the forward listener's new connections are given."""
    generation = service.generation
    assert service.listeners["forward"].factory.current is generation.factories["forward"]
    return generation.material.serverTLS.serverConnectionForTLS(None).get_certificate().get_serial_number()


def leaf_store(tmp_path: Path, leaf: Issued) -> Path:
    return write_pem_identity(tmp_path / "server.pem", leaf)


def recordLoads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name of the thread each key store is read in."""
    threads: list[str] = []
    real = tls.loadKeyStore

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tls, "loadKeyStore", recording)
    return threads


def test_theStoresAreReadOffTheReactorThreadAndTheSwapIsOnIt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = make_ca("Reload CA")
    first, second = server_leaf(ca), server_leaf(ca)
    store = leaf_store(tmp_path, first)
    with reloadable(write_config(tmp_path / "mydataproxy.toml", tmp_path, store)) as (service, reactor):
        assert served(service) == first.cert.serial_number
        threads = recordLoads(monkeypatch)
        write_pem_identity(store, second)
        outcome: list[bool] = []
        service.reload().addCallback(outcome.append)
        swap = reactor.handedOver()
        # The load is over (its result was handed over), and nothing changed yet.
        assert threads and all(POOL_NAME in name for name in threads), threads
        assert service.generation.number == 1 and served(service) == first.cert.serial_number
        swap()
        assert outcome == [True]
        assert service.generation.number == 2 and served(service) == second.cert.serial_number
        assert all(POOL_NAME in name for name in threads), "a store was read on the reactor thread"


@pytest.mark.parametrize("content, why", [
    (b"not a key store\n", "unknown key store format"),
    (b"", "empty file"),
])
def test_aStoreThatFailsToLoadKeepsTheOldMaterial(tmp_path: Path, content: bytes, why: str) -> None:
    first = server_leaf(make_ca("Reload CA"))
    store = leaf_store(tmp_path, first)
    path = write_config(tmp_path / "mydataproxy.toml", tmp_path, store)
    line = path.read_text().splitlines().index("[forward.tls]") + 1
    with reloadable(path) as (service, reactor):
        material = service.generation.material
        store.write_bytes(content)
        with capturedLogs() as events:
            assert reloadNow(service, reactor) is False
        assert service.generation.number == 1 and service.generation.material is material
        assert served(service) == first.cert.serial_number
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        assert len(errors) == 1 and errors[0].startswith(
            f"reload failed, still on generation 1: {path}:{line}: forward.tls: {store}: {why}"), errors
        # The store mended, the next reload takes it.
        second = server_leaf(make_ca("Reload CA"))
        write_pem_identity(store, second)
        assert reloadNow(service, reactor) is True
        assert service.generation.number == 2 and served(service) == second.cert.serial_number
