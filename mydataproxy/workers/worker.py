"""
One worker process: C{python -m mydataproxy.workers}, started by the
supervisor (L{mydataproxy.workers.supervisor}), never by hand.

It loads the configuration with start-up's own code (L{config.load},
L{loadMaterial}), refuses a file whose SHA-256 is not the one the supervisor
validated (the operator may have edited it since; a worker never runs a
configuration its supervisor did not check), and runs the ordinary service
(L{makeService}) on the connections the supervisor accepted and hands to it
(L{mydataproxy.workers.handoff}: the worker holds no listening socket), each
adopted with the factory in force for its listener, so that draining and
everything else behave as for a connection it had accepted itself.  What
differs from a single process is only where things come from and go,
through the file descriptors the supervisor set up:

  - fd 0, the lifeline: a pipe the supervisor never writes.  It reads as
    end-of-file once the supervisor is gone, however it died (SIGKILL
    included), and the worker then drains and exits.  A pipe rather than
    C{PR_SET_PDEATHSIG}: it is plain POSIX, it is seen by the reactor like
    any other event (the exit is the usual drain, not a signal arriving in
    the middle of start-up), and Linux's death signal fires when the
    I{thread} that forked the worker ends, not the process;
  - fd 3, the access lines, formatted here, written by the access log's
    writer thread into a pipe that the supervisor splits into whole lines
    and gives to the one writer of the file (rotation, gzip, retention and
    the hash chain need one writer): a slow log disk blocks that thread,
    never this reactor;
  - fd 4, the daemon's own log events, as JSON lines (L{EventLog}), which
    the supervisor logs as its own (twistd's output, the error log, syslog);
  - fd 5, this worker's final metrics, written once as it exits, so that
    the supervisor's totals lose nothing the worker counted;
  - fd 6, the channel of the handed connections (a C{SOCK_SEQPACKET} socket,
    one connection a message, naming its listener); the listeners it serves
    are named on the command line with the supervisor's listening address
    (C{--listen forward=TCP:127.0.0.1:9000}).  SIGTERM stops it: what was
    sent before is still adopted (and drained), then the channel is closed.

The worker serves no public admin listener: its C{/readyz} and C{/metrics}
are on a private UNIX socket (C{--admin-socket}) in the supervisor's 0700
directory.  SIGTERM drains (the service's own stop); SIGINT is ignored (a
terminal's Ctrl-C reaches the whole process group: the supervisor passes
it on as SIGTERM, once); SIGHUP is ignored (a reload is a new generation of
workers, started by the supervisor).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from dataclasses import replace
from typing import Mapping, Sequence

import txaio
from twisted.internet import fdesc
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory
from twisted.logger import globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy import config
from mydataproxy.config import AdminSettings, ConfigError, LoggingSettings, Settings
from mydataproxy.material import Material, loadMaterial
from mydataproxy.ops.logs import EventLog
from mydataproxy.ops.metrics import METRICS
from mydataproxy.service import PortMaker, ProxyService, makeService
from mydataproxy.workers.handoff import HandedConnections, parseAddress

txaio.use_twisted()
log = txaio.make_logger()

LIFELINE_FD = 0
ACCESS_FD = 3
EVENTS_FD = 4
METRICS_FD = 5
HANDOFF_FD = 6

#: The worker's exit status when it refuses its configuration.
EXIT_CONFIG = os.EX_CONFIG
#: The worker's exit status when it cannot start serving (a socket, a log).
EXIT_START = os.EX_SOFTWARE

#: What the final metrics are written as (and the supervisor parses).
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class WorkerRefused(Exception):
    """The worker will not run on the configuration it was given."""


def configDigest(path: str) -> str:
    """
    The SHA-256 of the config file at C{path}, in hex.

    @raise OSError: If it cannot be read.
    """
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def workerCommand(
    configPath: str | None, digest: str | None, index: int, generation: int, adminSocket: str,
    listeners: Mapping[str, str],
) -> list[str]:
    """
    The command line of a worker.

    @param listeners: The listening address of each listener whose
        connections it is handed, by name (as
        L{mydataproxy.workers.handoff.describeAddress} writes them).
    """
    argv = [sys.executable, "-m", "mydataproxy.workers", "--index", str(index),
            "--generation", str(generation), "--admin-socket", adminSocket]
    if configPath is not None:
        argv += ["--config", configPath, "--sha256", digest or ""]
    for name, where in listeners.items():
        argv += ["--listen", f"{name}={where}"]
    return argv


def workerSettings(settings: Settings, adminSocket: str) -> Settings:
    """
    The settings a worker runs: C{settings}, with the access log into its
    pipe to the supervisor (no rotation, no chain: the supervisor's writer
    does those), no error log or syslog of its own (its events go to the
    supervisor), and its admin listener on its private UNIX socket.
    """
    logging = replace(
        settings.logging, access_log=f"/dev/fd/{ACCESS_FD}", error_log="", directory="", syslog="",
        tamper_evident=False, max_size=0, daily=False, compress=False,
    )
    admin = AdminSettings(listen=f"unix:{quoteStringArgument(adminSocket)}:mode=600:lockfile=0")
    return replace(settings, logging=logging, admin=admin)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mydataproxy.workers", description="A MyData Proxy worker.")
    parser.add_argument("--config", default=None)
    parser.add_argument("--sha256", default="")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--listen", action="append", default=[], metavar="NAME=ADDRESS")
    options = parser.parse_args(argv)
    listeners = {}
    for each in options.listen:
        name, _, where = each.partition("=")
        listeners[name] = parseAddress(where)
    options.listeners = listeners
    return options


def _load(options: argparse.Namespace) -> tuple[Settings, Material]:
    """The settings and material, as start-up loads them; refused if the file is not the validated one."""
    path = options.config
    if path is None:
        settings = Settings()
        return settings, loadMaterial(settings)
    try:
        before = configDigest(path)
    except OSError as e:
        raise WorkerRefused(f"cannot read {path}: {e.strerror}") from None
    if before != options.sha256:
        raise WorkerRefused(
            f"{path} changed since the supervisor validated it (sha256 {before[:12]}, not {options.sha256[:12]}): "
            "send SIGHUP to the supervisor to load it"
        )
    settings = config.load(path)
    material = loadMaterial(settings)
    try:
        after = configDigest(path)
    except OSError as e:
        raise WorkerRefused(f"cannot read {path}: {e.strerror}") from None
    if after != before:
        raise WorkerRefused(f"{path} changed while it was being loaded")
    return settings, material


@implementer(IReadDescriptor)
class Lifeline:
    """
    The read end of the supervisor's lifeline pipe: when it reads as
    end-of-file, the supervisor is gone and the reactor is stopped (the
    service drains as on SIGTERM).
    """

    def __init__(self, reactor, name: str, fd: int = LIFELINE_FD) -> None:
        self.reactor = reactor
        self.name = name
        self.fd = fd
        self.stopping = False
        self.gone = False

    def start(self) -> None:
        fdesc.setNonBlocking(self.fd)
        self.reactor.addReader(self)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self) -> None:
        self.stopping = True

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "supervisor lifeline"

    def doRead(self) -> object:
        # Nothing is ever written: whatever comes is dropped; the end is what counts.
        return fdesc.readFromFD(self.fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        """
        The pipe ended (or failed), or the reactor is stopping: told apart
        by the shutdown having begun.
        """
        if self.stopping:
            return
        self.gone = True
        # Standard error (journald, twistd's output): the log went with the supervisor.
        sys.__stderr__.write(f"mydataproxy: {self.name} (pid {os.getpid()}): the supervisor is gone: stopping\n")
        sys.__stderr__.flush()
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def _writeFinalMetrics() -> None:
    from prometheus_client.openmetrics.exposition import generate_latest

    data = memoryview(generate_latest(METRICS.registry))
    try:
        while data:
            data = data[os.write(METRICS_FD, data):]
        os.close(METRICS_FD)
    except OSError:
        pass  # the supervisor is gone: nobody to count them for


def _ignoreSignals() -> None:
    # After the reactor's own handlers and the service's (callWhenRunning,
    # in that order): a drain starts with SIGTERM only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run one worker until it is stopped (SIGTERM, or its supervisor gone).

    @return: 0 after a drain; L{EXIT_CONFIG} when the configuration is
        refused; L{EXIT_START} when the service cannot start.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = _parse(argv)
    from twisted.internet import reactor

    events = EventLog(f"/dev/fd/{EVENTS_FD}", reactor, LoggingSettings())
    events.start()
    globalLogBeginner.beginLoggingTo([events], redirectStandardIO=False)
    try:
        try:
            settings, material = _load(options)
        except (ConfigError, WorkerRefused) as e:
            log.critical(
                "worker {index} of generation {generation} refuses its configuration: {e}",
                index=options.index, generation=options.generation, e=str(e),
            )
            return EXIT_CONFIG
        handed = HandedConnections(reactor, HANDOFF_FD)

        def handedPort(name: str, where: str) -> PortMaker:
            def makePort(factory: Factory) -> IListeningPort:
                log.info("{name}: serving the connections the supervisor accepts on {address}",
                         name=name, address=where)
                return handed.port(name, factory, where)

            return makePort

        ports = {name: handedPort(name, where) for name, where in options.listeners.items()}
        service: ProxyService = makeService(
            workerSettings(settings, options.admin_socket), material, reactor, ports=ports
        )
        try:
            service.privilegedStartService()
        except SystemExit as e:
            log.critical(
                "worker {index} of generation {generation} cannot start: {e}",
                index=options.index, generation=options.generation, e=str(e),
            )
            return EXIT_START
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        service.startService()
        handed.start()
        lifeline = Lifeline(reactor, f"worker {options.index} of generation {options.generation}")
        lifeline.start()
        reactor.callWhenRunning(_ignoreSignals)
        reactor.run()
        # Stopped: the reactor's handlers are gone, and a SIGTERM passed on
        # now (a second one) must not end the last writes.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if lifeline.gone:
            # Nobody else will remove the supervisor's directory: the last
            # worker out does (its socket is gone with its port).
            try:
                os.rmdir(os.path.dirname(options.admin_socket))
            except OSError:
                pass
        else:
            _writeFinalMetrics()
        return 0
    finally:
        events.stop()

