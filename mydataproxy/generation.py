"""
One configuration at work: what a L{Settings} and its L{Material} build —
the logs, the upstream pool, the authenticator, the admission pipeline and
the proxy factories — started, put in force, drained and stopped together.

The service runs one generation, and on SIGHUP builds the next beside it:
the new one takes the new connections, the old one L{retire}s (its idle
keep-alive connections close, the requests in flight finish on the settings
they were admitted under) and stops when its last connection has ended.
Logs on unchanged paths are handed on (and told the other new settings:
format, rotation, the chain) rather than opened twice, so a file has one
writer (one rotation, one hash chain).
"""

from __future__ import annotations

import socket
from typing import Callable

import txaio
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher

from mydataproxy.config import LoggingSettings, Settings
from mydataproxy.egress.auth import ProxyAuthenticator
from mydataproxy.egress.resolver import Resolver
from mydataproxy.forward.listener import ForwardProxy
from mydataproxy.material import Material
from mydataproxy.ops.levels import applyLevels
from mydataproxy.ops.logs import AccessLog, ErrorLog
from mydataproxy.ops.metrics import METRICS
from mydataproxy.ops.syslog import SyslogObserver
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.reverse.listener import ReverseProxy
from mydataproxy.server.channel import ProxyListener
from mydataproxy.tls.listener import TLSListener
from mydataproxy.upstream.client import UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

# How often a retiring generation looks whether its last connection ended.
RETIRE_CHECK_SECONDS = 0.5


class Generation:
    """
    What one configuration builds.  Nothing runs until L{start}.

    @param previous: The generation in force, whose logs are taken over
        when their settings are unchanged.
    @ivar factories: The protocol factory of each proxy listener by name
        (C{forward}, C{reverse}), TLS included.
    @ivar proxies: The proxy factories themselves, for draining.
    """

    def __init__(
        self, number: int, settings: Settings, material: Material, reactor, previous: Generation | None = None
    ) -> None:
        self.number = number
        self.settings = settings
        self.material = material
        self.reactor = reactor
        logging = settings.logging
        host = socket.gethostname()
        errorPath = logging.errorPath(host)
        # The same files (and syslog): the logs are taken over, and told
        # any other new setting at start.
        kept = previous is not None and _logTargets(logging, host) == _logTargets(previous.settings.logging, host)
        self.accessLog = previous.accessLog if kept else AccessLog(logging.accessPath(host), reactor, logging)
        if kept:
            self.errorLog, self.syslog = previous.errorLog, previous.syslog
        else:
            self.errorLog = ErrorLog(errorPath, reactor, logging) if errorPath else None
            self.syslog = SyslogObserver(logging.syslog, logging.syslog_facility) if logging.syslog else None
        self.pool = UpstreamPool(reactor, settings.upstream, material.originTLS, METRICS.upstream(settings))
        forward = settings.forward
        self.authenticator = (
            ProxyAuthenticator(material.htpasswd, forward.auth_realm, reactor) if material.htpasswd is not None else None
        )
        self.pipeline = RequestPipeline(settings, Resolver(reactor, settings.resolver), self.authenticator, reactor)
        self.proxies: dict[str, ProxyListener] = {}
        self.factories: dict[str, Factory] = {}
        if forward.enabled:
            self._add("forward", ForwardProxy(settings, self.pipeline, self.pool, self.accessLog, reactor),
                      material.serverTLS)
        if settings.reverse is not None:
            self._add("reverse", ReverseProxy(settings, self.pipeline, self.pool, self.accessLog, reactor),
                      material.reverseTLS)
        # Whether this generation opens its logs (or takes them over), and
        # whether it is the one to stop them.
        self._opensLogs = not kept
        self._ownsLogs = True
        self._retiring: LoopingCall | None = None

    def _add(self, name: str, proxy: ProxyListener, tls) -> None:
        self.proxies[name] = proxy
        self.factories[name] = TLSListener(tls, proxy, self.reactor) if tls is not None else proxy

    def listens(self) -> dict[str, str]:
        """The endpoint description of each listener this configuration wants (admin included)."""
        wanted = {}
        if "forward" in self.factories:
            wanted["forward"] = self.settings.forward.listen
        if "reverse" in self.factories:
            wanted["reverse"] = self.settings.reverse.listen
        if self.settings.admin is not None:
            wanted["admin"] = self.settings.admin.listen
        return wanted

    def startLogs(self) -> None:
        """
        Open this generation's own logs (those handed on are open already).

        @raise OSError: If a log file cannot be opened; nothing is left open.
        """
        if not self._opensLogs:
            return
        opened = []
        try:
            for each in (self.errorLog, self.accessLog):
                if each is not None:
                    each.start()
                    opened.append(each)
        except OSError:
            for each in opened:
                each.stop()
            raise

    def start(self, previous: Generation | None) -> None:
        """
        Put this generation in force (its logs started): levels, log
        observers, the authenticator's threads, the factories and the
        metrics' view.
        """
        logging = self.settings.logging
        applyLevels(logging)
        if previous is not None and not self._opensLogs:
            previous._ownsLogs = False
            if previous.settings.logging != logging:
                self.accessLog.reconfigure(logging)
                if self.errorLog is not None:
                    self.errorLog.reconfigure(logging)
        if self._opensLogs:
            for observer in (previous.errorLog, previous.syslog) if previous is not None else ():
                if observer is not None:
                    globalLogPublisher.removeObserver(observer)
            for observer in (self.errorLog, self.syslog):
                if observer is not None:
                    globalLogPublisher.addObserver(observer)
        if self.authenticator is not None:
            self.authenticator.start()
        for factory in self.factories.values():
            factory.doStart()
        METRICS.watchPool(self.pool)
        METRICS.watchLog("access", self.accessLog)
        if self.errorLog is not None:
            METRICS.watchLog("error", self.errorLog.writer)
        for name, proxy in self.proxies.items():
            METRICS.watchListener(name, proxy)
            if isinstance(proxy, ReverseProxy):
                for route, room in proxy.rooms.items():
                    METRICS.watchQueue(f"route {route}", lambda room=room: room.waiting)

    @property
    def busy(self) -> bool:
        """Whether a client connection of this generation is still open."""
        return any(proxy.channels for proxy in self.proxies.values())

    def drain(self) -> None:
        """Close the idle connections now and the others after their response; no new upstream reuse."""
        for proxy in self.proxies.values():
            proxy.drain()
        self.pool.closeIdle()

    def cutOff(self) -> None:
        """Drop every connection still open."""
        for proxy in self.proxies.values():
            proxy.cutOff()

    def retire(self, done: Callable[[Generation], None]) -> None:
        """
        A newer generation is in force: drain, and once the last connection
        has ended, L{stop} and call C{done(self)}.
        """
        self.drain()

        def check() -> None:
            if not self.busy:
                self._retiring.stop()
                self.stop()
                done(self)

        self._retiring = LoopingCall(check)
        self._retiring.clock = self.reactor
        self._retiring.start(RETIRE_CHECK_SECONDS, now=True)

    def stop(self, logs: bool = True) -> None:
        """
        Stop the factories and the authenticator, and (with C{logs}) the
        logs this generation opened that no newer one took over.
        """
        if self._retiring is not None and self._retiring.running:
            self._retiring.stop()
        for factory in self.factories.values():
            factory.doStop()
        if self.authenticator is not None:
            self.authenticator.stop()
        if logs:
            self.stopLogs()

    def stopLogs(self) -> None:
        """Stop the logs this generation owns (a log handed on belongs to the newer one)."""
        if not self._ownsLogs:
            return
        self.accessLog.stop()
        for observer in (self.errorLog, self.syslog):
            if observer is not None:
                globalLogPublisher.removeObserver(observer)
        if self.errorLog is not None:
            self.errorLog.stop()
        if self.syslog is not None:
            self.syslog.close()


def _logTargets(logging: LoggingSettings, host: str) -> tuple[str, str, str, str]:
    """Where C{logging} writes: the access and error logs' paths, syslog and its facility."""
    return logging.accessPath(host), logging.errorPath(host), logging.syslog, logging.syslog_facility
