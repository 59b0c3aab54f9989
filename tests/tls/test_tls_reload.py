"""
Unit tests of the SIGHUP reload of TLS material (L{mydataproxy.tls.contexts}): stores
are read in a thread, never on the reactor thread, and the new material is
swapped in only on the reactor thread; a failure keeps the old.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from test_tls import make_ca, server_leaf, write_pem_identity
from mydataproxy.tls import contexts as tls
from mydataproxy.config import OriginTLSProfile, ServerTLSSettings, StoreRef


class ThreadsReactor(MemoryReactorClock):
    """A reactor stand-in with a real thread pool; C{callFromThread} calls wait for L{runHandedOver}."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool(1, 1, "reload-test")
        self.handed: queue.Queue = queue.Queue()

    def getThreadPool(self) -> ThreadPool:
        return self.pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.handed.put((f, args, kwargs))

    def runHandedOver(self) -> None:
        f, args, kwargs = self.handed.get(timeout=10)
        f(*args, **kwargs)


@pytest.fixture
def reactor():
    r = ThreadsReactor()
    r.pool.start()
    yield r
    r.pool.stop()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads key stores are read in."""
    threads: list[str] = []
    real = tls.loadKeyStore

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tls, "loadKeyStore", recording)
    return threads


@pytest.fixture
def errors():
    seen: list[str] = []

    def observer(event) -> None:
        if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def serial(holder: tls.ServerTLS) -> int:
    return holder.serverConnectionForTLS(None).get_certificate().get_serial_number()


def test_serverStoresAreReadOffTheReactorThreadAndSwappedOnIt(tmp_path: Path, reactor, loads) -> None:
    ca = make_ca("Reload CA")
    first, second = server_leaf(ca), server_leaf(ca)
    store = write_pem_identity(tmp_path / "server.pem", first)
    holder = tls.ServerTLS(ServerTLSSettings(StoreRef(str(store))))
    del loads[:]
    write_pem_identity(store, second)
    done: list[bool] = []
    holder.reload(reactor).addCallback(done.append)
    assert serial(holder) == first.cert.serial_number, "swapped before the reactor thread took it"
    reactor.runHandedOver()
    assert loads and all("reload-test" in name for name in loads), loads
    assert done == [True]
    assert serial(holder) == second.cert.serial_number


def test_aFailedServerReloadKeepsTheOldMaterial(tmp_path: Path, reactor, errors) -> None:
    ca = make_ca("Reload CA")
    first = server_leaf(ca)
    store = write_pem_identity(tmp_path / "server.pem", first)
    holder = tls.ServerTLS(ServerTLSSettings(StoreRef(str(store))))
    store.write_bytes(b"not a key store\n")
    done: list[bool] = []
    holder.reload(reactor).addCallback(done.append)
    reactor.runHandedOver()
    assert done == [False]
    assert serial(holder) == first.cert.serial_number
    assert any("forward.tls: reload failed, keeping the current certificates" in e and str(store) in e
               for e in errors), errors


def test_originStoresAreReadOffTheReactorThread(tmp_path: Path, reactor, loads) -> None:
    ca = make_ca("Origin Reload CA")
    trust = tmp_path / "trust.pem"
    trust.write_bytes(ca.cert_pem())
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(trust))), ())
    del loads[:]
    done: list[bool] = []
    holder.reload(reactor).addCallback(done.append)
    reactor.runHandedOver()
    assert done == [True]
    assert loads and all("reload-test" in name for name in loads), loads
