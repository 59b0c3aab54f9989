"""
The daemon's service tree: listeners, the upstream pool, the authenticator
and the access log, started and stopped together by twistd.

Stopping (SIGTERM) closes the listeners first; the connections still open
are torn down by the reactor during its shutdown, and their access lines are
written because the access log (and the authenticator's threads) stop only
after that, in the reactor's "after shutdown" phase.
"""

from __future__ import annotations

import datetime
import signal
import socket

import txaio
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mydataproxy.egress.auth import ProxyAuthenticator
from mydataproxy.config import Settings
from mydataproxy.forward.listener import ForwardProxy
from mydataproxy.reverse.listener import ReverseProxy
from mydataproxy.server.channel import ProxyListener
from mydataproxy.tls.listener import TLSListener
from mydataproxy.ops.admin import adminSite
from mydataproxy.ops.levels import applyLevels
from mydataproxy.ops.logs import AccessLog, ErrorLog
from mydataproxy.ops.metrics import METRICS
from mydataproxy.ops.syslog import SyslogObserver
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.egress.resolver import Resolver
from mydataproxy.upstream.client import UpstreamPool
from mydataproxy.material import Material, loadMaterial

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


class ListenerService(Service):
    """
    Listens on one endpoint description, and refuses to start without it.

    Twisted's C{StreamServerEndpointService} only logs a failed bind and runs
    on without the port; a proxy that silently lacks its port is worse than
    one that does not start, so a failure here is raised to twistd.
    """

    def __init__(self, name: str, description: str, factory: Factory, reactor) -> None:
        self.setName(name)
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        outcome: list = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise ListenerError(f"mydataproxy: {self.name}: {self.description} did not start listening at once")
        if isinstance(outcome[0], Failure):
            raise ListenerError(
                f"mydataproxy: {self.name}: cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0]
        log.info("{name} listening on {address}", name=self.name, address=self.port.getHost())

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class ProxyService(MultiService):
    """
    The whole daemon for one L{Settings} and the L{Material} loaded from
    them (by L{loadMaterial}: the service loads nothing itself).
    """

    def __init__(self, settings: Settings, material: Material, reactor) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        # Material: loaded by mydataproxy.material, held here for SIGHUP.
        self.material = material
        self.originTLS = material.originTLS
        self.serverTLS = material.serverTLS
        host = socket.gethostname()
        self.accessLog = AccessLog(settings.logging.accessPath(host), reactor, settings.logging)
        errorPath = settings.logging.errorPath(host)
        self.errorLog = ErrorLog(errorPath, reactor, settings.logging) if errorPath else None
        logging = settings.logging
        self.syslog = SyslogObserver(logging.syslog, logging.syslog_facility) if logging.syslog else None
        self.pool = UpstreamPool(reactor, settings.upstream, self.originTLS, METRICS.upstream(settings))
        METRICS.watchPool(self.pool)
        METRICS.watchLog("access", self.accessLog)
        if self.errorLog is not None:
            METRICS.watchLog("error", self.errorLog.writer)
        self.listeners: list[ListenerService] = []
        self.proxies: list[ProxyListener] = []
        self.draining = False
        self._cutAt: float | None = None
        forwardSettings = settings.forward
        self.authenticator = (
            ProxyAuthenticator(material.htpasswd, forwardSettings.auth_realm, reactor)
            if material.htpasswd is not None
            else None
        )
        # One admission pipeline, shared by every listener.
        self.pipeline = RequestPipeline(settings, Resolver(reactor, settings.resolver), self.authenticator, reactor)
        self.tlsListener: TLSListener | None = None
        if forwardSettings.enabled:
            forwardProxy = ForwardProxy(settings, self.pipeline, self.pool, self.accessLog, reactor)
            self.proxies.append(forwardProxy)
            forward: Factory = forwardProxy
            METRICS.watchListener("forward", forward)
            if self.serverTLS is not None:
                forward = self.tlsListener = TLSListener(self.serverTLS, forward, reactor)
            self._listen("forward", forwardSettings.listen, forward)
        self.reverseTLS = material.reverseTLS
        if settings.reverse is not None:
            reverseProxy = ReverseProxy(settings, self.pipeline, self.pool, self.accessLog, reactor)
            self.proxies.append(reverseProxy)
            METRICS.watchListener("reverse", reverseProxy)
            for name, room in reverseProxy.rooms.items():
                METRICS.watchQueue(f"route {name}", lambda room=room: room.waiting)
            reverse: Factory = reverseProxy
            if self.reverseTLS is not None:
                reverse = TLSListener(self.reverseTLS, reverse, reactor)
            self._listen("reverse", settings.reverse.listen, reverse)
        if settings.admin is not None:
            self._listen("admin", settings.admin.listen, adminSite(self.notReady, METRICS.registry))
        self._reportCertificates()
        self._reloads = DeferredLock()

    def _listen(self, name: str, description: str, factory: Factory) -> None:
        listener = ListenerService(name, description, factory, self.reactor)
        listener.setServiceParent(self)
        self.listeners.append(listener)

    def notReady(self) -> list[str]:
        """
        Why the proxy should get no traffic now (for C{/readyz}): a listener
        not listening, expired key material, draining; empty when ready.
        """
        reasons = [f"{each.name} is not listening on {each.description}" for each in self.listeners if each.port is None]
        now = datetime.datetime.now(datetime.timezone.utc)
        for holder in (self.serverTLS, self.reverseTLS, self.originTLS):
            if holder is None:
                continue
            for certificate, what in holder.loaded.own:
                if certificate.not_valid_after_utc < now:
                    reasons.append(f"{what}: {certificate.subject.rfc4514_string()} expired")
        if self.draining:
            reasons.append("draining (shutting down)")
        return reasons

    def _reportCertificates(self) -> None:
        for label, holder in (("forward.tls", self.serverTLS), ("reverse.tls", self.reverseTLS),
                              ("upstream.tls", self.originTLS)):
            if holder is not None:
                loaded = holder.loaded
                METRICS.setCertificates(label, [c for c, _ in (*loaded.own, *loaded.pinned)])

    def reloadTLS(self) -> Deferred:
        """
        Re-read every key and trust store (SIGHUP), in a thread; the new
        material is swapped in on the reactor thread, and a store that fails
        keeps the old.  Reloads run one after the other.

        @return: fires when this reload is done.
        """
        log.info("SIGHUP: reloading key and trust stores")
        return self._reloads.run(self._reloadAll).addBoth(self._reloaded)

    def _reloaded(self, result: object) -> object:
        # Operators and tests learn here that new handshakes use what was read.
        self._reportCertificates()
        log.info("SIGHUP: reload of key and trust stores done")
        return result

    def _reloadAll(self) -> Deferred:
        holders = [holder for holder in (self.serverTLS, self.reverseTLS, self.originTLS) if holder is not None]
        return gatherResults([holder.reload(self.reactor) for holder in holders])

    def startService(self) -> None:
        super().startService()
        if self.authenticator is not None:
            self.authenticator.start()
        # After the reactor's "during" phase, which tears down the
        # connections still open (their access lines come then).
        self.reactor.addSystemEventTrigger("after", "shutdown", self._stopLast)
        # twistd leaves SIGHUP at its default, which kills the process.
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reloadTLS))
        # SIGUSR1: reopen our logs (after logrotate's rename); twistd's own
        # handler, if it set one for --logfile, still runs.
        previous = signal.getsignal(signal.SIGUSR1)

        def reopen(signum, frame) -> None:
            self.reactor.callFromThread(self.reopenLogs)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGUSR1, reopen)

    def reopenLogs(self) -> None:
        """Open the log files afresh (SIGUSR1)."""
        log.info("SIGUSR1: reopening the log files")
        for each in (self.accessLog, self.errorLog):
            if each is not None:
                each.reopen()

    def privilegedStartService(self) -> None:
        applyLevels(self.settings.logging)
        for each in (self.errorLog, self.accessLog):
            if each is None:
                continue
            try:
                each.start()
            except OSError as e:
                raise ListenerError(f"mydataproxy: cannot open the log {each.path}: {e}") from None
        for observer in (self.errorLog, self.syslog):
            if observer is not None:
                globalLogPublisher.addObserver(observer)
        log.info("configuration from {source}", source=self.settings.source)
        for notice in self.settings.notices:
            log.warn("{notice}", notice=notice)
        if self.settings.forward.enabled and not self.settings.forward.client_allow:
            log.info("forward.client_allow is empty: every client that reaches the listener may use it")
        if not self.settings.egress.guard:
            log.warn("egress.guard is off: private, loopback and cloud metadata addresses are reachable")
        for holder in (self.serverTLS, self.reverseTLS):
            if holder is not None:
                holder.report()
        self.originTLS.report()
        super().privilegedStartService()

    def stopService(self) -> Deferred:
        """
        SIGTERM: stop accepting and turn not ready at once, close idle
        connections, give the requests and tunnels in flight up to
        C{daemon.shutdown_timeout} seconds (a second SIGTERM or SIGINT: none
        more), then cut what is left and stop the admin listener last.
        """
        self.draining = True
        log.info(
            "draining: {n} client connections open, up to {s:g} s (daemon.shutdown_timeout)",
            n=sum(len(p.channels) for p in self.proxies), s=self.settings.daemon.shutdown_timeout,
        )
        stopped = [each.stopService() for each in self.listeners if each.name != "admin"]
        for proxy in self.proxies:
            proxy.drain()
        self.pool.closeIdle()
        drained = Deferred()
        deadline = self.reactor.callLater(self.settings.daemon.shutdown_timeout, self._cutOff, drained)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda signum, frame: self.reactor.callFromThread(self._cutOff, drained))

        def check() -> None:
            if drained.called:
                return
            busy = any(p.channels for p in self.proxies)
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
        drained.addCallback(lambda _: gatherResults([d for d in stopped if d is not None]))
        drained.addCallback(lambda _: super(ProxyService, self).stopService())
        return drained

    def _cutOff(self, drained: Deferred) -> None:
        if drained.called or self._cutAt is not None:
            return
        self._cutAt = self.reactor.seconds()
        log.warn(
            "shutdown: cutting off {n} client connections still open", n=sum(len(p.channels) for p in self.proxies)
        )
        for proxy in self.proxies:
            proxy.cutOff()

    def _stopLast(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
        self.accessLog.stop()
        if self.errorLog is not None:
            globalLogPublisher.removeObserver(self.errorLog)
            self.errorLog.stop()
        if self.syslog is not None:
            globalLogPublisher.removeObserver(self.syslog)
            self.syslog.close()


def makeService(settings: Settings, material: Material | None = None, reactor=None) -> ProxyService:
    """
    Build the daemon's service tree (nothing listens until it starts).

    @param material: What L{loadMaterial} loaded from C{settings}; loaded
        here when not given.
    @raise ConfigError: If C{material} is not given and cannot be loaded.
    """
    if reactor is None:
        from twisted.internet import reactor
    if material is None:
        material = loadMaterial(settings)
    return ProxyService(settings, material, reactor)
