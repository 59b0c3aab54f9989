"""
The daemon's service tree: the listeners and the configuration in force
(a L{Generation}), started by twistd, reloaded on SIGHUP, drained on
SIGTERM.

A listener's socket outlives configurations: each listens through a
L{CurrentFactory} that a reload points at the new generation's factory, so
an unchanged endpoint keeps its socket (no connection is refused during a
reload) while a changed one is bound anew before the old one closes.  A
reload loads and validates the new configuration with start-up's own code
(L{config.load}, L{loadMaterial}, in a thread: key stores are slow), binds
what is new, and only then swaps, in one step on the reactor thread;
anything that fails on the way leaves everything as it was.

Stopping (SIGTERM) drains every generation still running; the logs stop
last, in the reactor's "after shutdown" phase, so that the connections torn
down during shutdown still get their access lines.
"""

from __future__ import annotations

import datetime
import os
import signal
from typing import Callable, Mapping, Protocol

import txaio
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mydataproxy import config
from mydataproxy.config import ConfigError, Settings
from mydataproxy.generation import Generation
from mydataproxy.material import Material, loadMaterial
from mydataproxy.ops.admin import adminSite
from mydataproxy.ops.metrics import METRICS
from mydataproxy.ops.reloadstatus import reportFailure, writeStatus
from mydataproxy.ops.signals import chainSignal
from mydataproxy.server.proxyheader import ProxyHeaderFactory, proxiedListen

txaio.use_twisted()
log = txaio.make_logger()

# How often a drain looks whether every connection has closed.
DRAIN_CHECK_SECONDS = 0.1
# How long a cut-off waits for the aborted connections to end.
CUT_SECONDS = 1.0


class ListenerError(SystemExit):
    """
    A configured listener could not be started: the daemon exits with this
    one line (a L{SystemExit}, so twistd prints no traceback).
    """


class CurrentFactory(Factory):
    """
    Builds each new connection's protocol with the factory in force, which
    a reload switches; the factories' own start and stop belong to their
    generation, not to the listening port.
    """

    noisy = False

    def __init__(self, current: Factory) -> None:
        self.current = current

    def buildProtocol(self, addr):
        return self.current.buildProtocol(addr)


def listenerFactory(reactor, description: str, factory: Factory) -> tuple[str, Factory]:
    """
    The endpoint to bind for a listener's C{description}, and the factory
    its connections go to: a C{haproxy:} description reads the PROXY
    protocol header first, with our own L{ProxyHeaderFactory} (Twisted's
    loses half-close, and counts the balancer as the client).
    """
    description, proxied = proxiedListen(description)
    return description, ProxyHeaderFactory(factory, reactor) if proxied else factory


def listenNow(reactor, description: str, factory: Factory) -> IListeningPort:
    """
    Listen on C{description} at once.

    @raise OSError: Naming the endpoint, if it cannot listen.
    """
    description, factory = listenerFactory(reactor, description, factory)
    outcome: list = []
    endpoints.serverFromString(reactor, description).listen(factory).addBoth(outcome.append)
    if not outcome:
        raise OSError(f"{description} did not start listening at once")
    if isinstance(outcome[0], Failure):
        raise OSError(f"cannot listen on {description}: {outcome[0].getErrorMessage()}")
    return outcome[0]


#: How a listener gets its connections when it does not bind its own
#: socket (a worker, whose supervisor accepts them): given the factory,
#: the port that hands them to it.
PortMaker = Callable[[Factory], IListeningPort]


class ListenerService(Service):
    """
    Listens on one endpoint description, and refuses to start without it.

    Twisted's C{StreamServerEndpointService} only logs a failed bind and runs
    on without the port; a proxy that silently lacks its port is worse than
    one that does not start, so a failure here is raised to twistd.

    @ivar factory: The L{CurrentFactory} the port listens through.
    """

    def __init__(
        self, name: str, description: str, factory: Factory, reactor, makePort: PortMaker | None = None
    ) -> None:
        self.setName(name)
        self.description = description
        self.factory = CurrentFactory(factory)
        self.reactor = reactor
        self.makePort = makePort
        self.port: IListeningPort | None = None

    def listen(self) -> None:
        """Listen now (a reload binds before it swaps). @raise OSError: If it cannot."""
        if self.makePort is None:
            self.port = listenNow(self.reactor, self.description, self.factory)
        else:
            self.port = self.makePort(listenerFactory(self.reactor, self.description, self.factory)[1])
        log.info("{name} listening on {address}", name=self.name, address=self.port.getHost())

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            try:
                self.listen()
            except OSError as e:
                raise ListenerError(f"mydataproxy: {self.name}: {e}") from None

    def stopService(self) -> None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            closeNow(port)


class ClosablePort(Protocol):
    """A listening port as Twisted's C{tcp.Port} is one: a read descriptor that accepts in C{doRead}."""

    def stopReading(self) -> None: ...

    def doRead(self) -> object: ...

    def connectionLost(self, reason: Failure) -> None: ...


def closeNow(port: ClosablePort) -> None:
    """
    Stop listening on C{port} without resetting a connection: accept what
    the kernel has queued (those are served, and, draining, closed after
    their answer), then close the socket in the same reactor turn.

    C{stopListening} closes the socket a turn later, and the kernel resets
    every connection that completed its handshake in between: a balancer
    that has not yet seen the readiness change sees failed requests.
    """
    port.stopReading()
    port.doRead()
    port.connectionLost(Failure(ConnectionDone("the listener closed")))


class ProxyService(MultiService):
    """
    The whole daemon, starting on one L{Settings} and the L{Material}
    loaded from them (by L{loadMaterial}: the service loads nothing itself
    at start).

    @param ports: For the listeners (by name: C{forward}, C{reverse}) that
        bind no socket of their own, how they get their connections (a
        worker's, from its supervisor).
    @param statusPath: Where to write each load's outcome for C{mydataproxy
        reload} (L{mydataproxy.ops.reloadstatus}), or L{None}.
    @ivar generation: The configuration in force.
    @ivar retiring: Older generations still finishing their connections.
    """

    def __init__(
        self, settings: Settings, material: Material, reactor,
        ports: Mapping[str, PortMaker] | None = None, statusPath: str | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.ports = dict(ports or {})
        self.statusPath = statusPath
        self.generation = Generation(1, settings, material, reactor)
        self.retiring: list[Generation] = []
        self.listeners: dict[str, ListenerService] = {}
        self.admin = adminSite(self.notReady, METRICS.registry)
        for name, description in self.generation.listens().items():
            listener = ListenerService(
                name, description, self._factoryFor(self.generation, name), reactor, self.ports.get(name)
            )
            listener.setServiceParent(self)
            self.listeners[name] = listener
        self.draining = False
        self._attempts = 1
        self._cutAt: float | None = None
        self._reloads = DeferredLock()
        self._reportCertificates()

    @property
    def settings(self) -> Settings:
        """The settings in force."""
        return self.generation.settings

    def _factoryFor(self, generation: Generation, name: str) -> Factory:
        return self.admin if name == "admin" else generation.factories[name]

    def _generations(self) -> list[Generation]:
        return [self.generation, *self.retiring]

    def notReady(self) -> list[str]:
        """
        Why the proxy should get no traffic now (for C{/readyz}): a listener
        not listening, expired key material, draining; empty when ready.
        """
        reasons = [
            f"{each.name} is not listening on {each.description}" for each in self.listeners.values()
            if each.port is None
        ]
        now = datetime.datetime.now(datetime.timezone.utc)
        material = self.generation.material
        for holder in (material.serverTLS, material.reverseTLS, material.originTLS):
            if holder is None:
                continue
            for certificate, what in holder.loaded.own:
                if certificate.not_valid_after_utc < now:
                    reasons.append(f"{what}: {certificate.subject.rfc4514_string()} expired")
        if self.draining:
            reasons.append("draining (shutting down)")
        return reasons

    def _reportCertificates(self) -> None:
        material = self.generation.material
        for label, holder in (("forward.tls", material.serverTLS), ("reverse.tls", material.reverseTLS),
                              ("upstream.tls", material.originTLS)):
            METRICS.setCertificates(label, [c for c, _ in (*holder.loaded.own, *holder.loaded.pinned)]
                                    if holder is not None else [])

    def _writeStatus(self, ok: bool, message: str) -> None:
        writeStatus(self.statusPath, generation=self.generation.number, attempt=self._attempts, ok=ok, message=message)

    # Reload (SIGHUP)

    def reload(self) -> Deferred:
        """
        Load the configuration file again and put it in force (SIGHUP);
        reloads run one after the other.

        @return: Fires with whether the new configuration took.
        """
        return self._reloads.run(self._reload)

    def _reload(self) -> Deferred:
        self._attempts += 1
        source = self.settings.source
        log.info("SIGHUP: reloading the configuration from {source}", source=source)
        loading = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _load, source)
        return loading.addCallbacks(self._swap, self._failed)

    def _failed(self, failure: Failure) -> bool:
        reportFailure(
            self.statusPath, failure, generation=self.generation.number, attempt=self._attempts,
            expected=(ConfigError, OSError),
        )
        return False

    def _swap(self, loaded: tuple[Settings, Material]) -> bool:
        if self.draining:
            return self._failed(Failure(ConfigError(self.settings.source, None, "shutting down")))
        settings, material = loaded
        old = self.generation
        new = Generation(old.number + 1, settings, material, self.reactor, old)
        wanted = new.listens()
        bound: dict[str, ListenerService] = {}
        try:
            for name, description in wanted.items():
                current = self.listeners.get(name)
                if current is not None and current.description == description:
                    continue
                if name in self.ports:
                    raise ConfigError(settings.source, f"{name}.listen",
                                      "a worker cannot change the listener its supervisor binds")
                listener = ListenerService(name, description, self._factoryFor(new, name), self.reactor)
                try:
                    listener.listen()
                except OSError as e:
                    raise ConfigError(settings.source, f"{name}.listen", str(e)) from None
                bound[name] = listener
            new.startLogs()
        except (ConfigError, OSError) as e:
            for listener in bound.values():
                listener.stopService()
            return self._failed(Failure(e))
        new.start(old)
        for name, listener in list(self.listeners.items()):
            if name in bound or name not in wanted:
                listener.disownServiceParent()
                del self.listeners[name]
            else:
                listener.factory.current = self._factoryFor(new, name)
        for name, listener in bound.items():
            listener.setServiceParent(self)
            self.listeners[name] = listener
        self.generation = new
        self.retiring.append(old)
        old.retire(self.retiring.remove)
        self._reportCertificates()
        _startNotices(settings)
        _reportMaterial(material)
        message = f"reload: generation {new.number} in force from {settings.source}"
        log.info("{message}", message=message)
        self._writeStatus(True, message)
        return True

    # Start and stop

    def privilegedStartService(self) -> None:
        generation = self.generation
        try:
            generation.startLogs()
        except OSError as e:
            raise ListenerError(f"mydataproxy: cannot open the log {e.filename or ''}: {e.strerror or e}") from None
        generation.start(None)
        self.admin.doStart()
        _startNotices(self.settings)
        _reportMaterial(generation.material)
        super().privilegedStartService()
        self._writeStatus(True, f"generation 1 in force from {self.settings.source}")

    def startService(self) -> None:
        super().startService()
        # After the reactor's "during" phase, which tears down the
        # connections still open (their access lines come then).
        self.reactor.addSystemEventTrigger("after", "shutdown", self._stopLast)
        # twistd leaves SIGHUP at its default, which kills the process.
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))
        # twistd's own SIGTERM handler has the process end by the signal
        # once stopped; a drained stop is a clean exit (0).  The reactor
        # installs its handlers as it starts running: ours replace them then.
        self.reactor.callWhenRunning(self._handleStopSignals)
        # SIGUSR1: reopen our logs (after logrotate's rename); twistd's own
        # handler, if it set one for --logfile, still runs.
        chainSignal(self.reactor, signal.SIGUSR1, self.reopenLogs)

    def _handleStopSignals(self) -> None:
        if self.draining:
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda signum, frame: self.reactor.callFromThread(self._stopOn, signum))

    def _stopOn(self, number: int) -> None:
        log.info("{signal}: stopping", signal=signal.Signals(number).name)
        self.reactor.stop()

    def reopenLogs(self) -> None:
        """Open the log files afresh (SIGUSR1)."""
        log.info("SIGUSR1: reopening the log files")
        for generation in self._generations():
            for each in (generation.accessLog, generation.errorLog):
                if each is not None:
                    each.reopen()

    def stopService(self) -> Deferred:
        """
        SIGTERM: stop accepting and turn not ready at once, close idle
        connections, give the requests and tunnels in flight up to
        C{daemon.shutdown_timeout} seconds (a second SIGTERM or SIGINT: none
        more), then cut what is left and stop the admin listener last.
        """
        self.draining = True
        generations = self._generations()
        timeout = self.settings.daemon.shutdown_timeout
        log.info(
            "draining: {n} client connections open, up to {s:g} s (daemon.shutdown_timeout)",
            n=sum(len(p.channels) for g in generations for p in g.proxies.values()), s=timeout,
        )
        for name, listener in self.listeners.items():
            if name != "admin":
                listener.stopService()
        for generation in generations:
            generation.drain()
        drained = Deferred()
        deadline = self.reactor.callLater(timeout, self._cutOff, drained)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda signum, frame: self.reactor.callFromThread(self._cutOff, drained))

        def check() -> None:
            if drained.called:
                return
            busy = any(g.busy for g in generations)
            # After a cut-off, the aborted connections' ends (and access
            # lines) come at the next turns of the reactor.
            if busy and (self._cutAt is None or self.reactor.seconds() - self._cutAt < CUT_SECONDS):
                self.reactor.callLater(DRAIN_CHECK_SECONDS, check)
                return
            if deadline.active():
                deadline.cancel()
            if self._cutAt is None:
                log.info("drained: every request and tunnel finished")
            drained.callback(None)

        check()
        drained.addCallback(lambda _: self._stopGenerations(generations))
        drained.addCallback(lambda _: super(ProxyService, self).stopService())
        return drained

    def _stopGenerations(self, generations: list[Generation]) -> None:
        for generation in generations:
            generation.stop(logs=False)

    def _cutOff(self, drained: Deferred) -> None:
        if drained.called or self._cutAt is not None:
            return
        self._cutAt = self.reactor.seconds()
        generations = self._generations()
        log.warn(
            "shutdown: cutting off {n} client connections still open",
            n=sum(len(p.channels) for g in generations for p in g.proxies.values()),
        )
        for generation in generations:
            generation.cutOff()

    def _stopLast(self) -> None:
        self.admin.doStop()
        for generation in self._generations():
            generation.stopLogs()


def _load(source: str) -> tuple[Settings, Material]:
    """Start-up's loading, for a reload (in a thread)."""
    settings = config.load(source) if os.path.exists(source) else Settings()
    return settings, loadMaterial(settings)


def _startNotices(settings: Settings) -> None:
    log.info("configuration from {source}", source=settings.source)
    for notice in settings.notices:
        log.warn("{notice}", notice=notice)
    if settings.forward.enabled and not settings.forward.client_allow:
        log.info("forward.client_allow is empty: every client that reaches the listener may use it")
    if not settings.egress.guard:
        log.warn("egress.guard is off: private, loopback and cloud metadata addresses are reachable")


def _reportMaterial(material: Material) -> None:
    for holder in (material.serverTLS, material.reverseTLS, material.originTLS):
        if holder is not None:
            holder.report()


def makeService(
    settings: Settings, material: Material | None = None, reactor=None,
    ports: Mapping[str, PortMaker] | None = None, statusPath: str | None = None,
) -> ProxyService:
    """
    Build the daemon's service tree (nothing listens until it starts).

    @param material: What L{loadMaterial} loaded from C{settings}; loaded
        here when not given.
    @param ports: How the listeners that bind no socket get their connections.
    @param statusPath: Where each load's outcome is written, or L{None}.
    @raise ConfigError: If C{material} is not given and cannot be loaded.
    """
    if reactor is None:
        from twisted.internet import reactor
    if material is None:
        material = loadMaterial(settings)
    return ProxyService(settings, material, reactor, ports, statusPath)
