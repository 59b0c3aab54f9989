"""
The supervisor: with C{[daemon] workers = N} (N > 1), the twistd process
binds the proxy listeners, accepts their connections and hands each to one
of N worker processes (L{mydataproxy.workers.worker}), which it keeps
running; it serves no proxy traffic itself.

Listening sockets are bound once, here (privileged ports before twistd
drops its privileges), and only the supervisor accepts on them: each
connection's descriptor goes to a worker that serves, round robin, over a
channel of that worker's own (L{mydataproxy.workers.handoff}, which says
why not a socket shared by the workers, nor C{SO_REUSEPORT}: a burst of
connections would land on one worker, and a dead worker's backlog would be
lost).  An unchanged listener keeps its very socket across a reload; its
connections go to the new generation once it is in force.  A worker told
to stop (a reload, SIGTERM) is handed nothing more, and one that dies loses
only the connections it had taken: those still queued to it are taken back
and handed to another.

What the supervisor does:

  - B{start}: bind the sockets and the public admin listener, open the log
    files, then spawn the workers; each is ready once its private
    C{/readyz} answers 200.
  - B{supervision}: a worker that exits unexpectedly is restarted after a
    back-off (0.5 s, doubling to 30 s; back to 0.5 s once one has run for
    a minute); every exit and restart is logged.
  - B{logs}: the supervisor is the one writer of the log files (rotation,
    gzip, retention and the hash chain need one); each worker's access
    lines and log events come over pipes of its own, in whole lines.
    SIGUSR1 reopens the files.
  - B{admin}: C{/healthz}; C{/readyz} 503 while draining or while fewer
    than N workers are ready, with the reasons; C{/metrics} the workers'
    metrics asked from each at every scrape and summed
    (L{mydataproxy.ops.metrics.aggregate}), plus those of workers that
    have exited (their counters stay counted) and the supervisor's own
    (workers by state, restarts, log lines dropped).
  - B{SIGHUP}: load and validate the file with start-up's code; bind the
    listeners that are new or changed (an unchanged one keeps its socket);
    start a new generation of workers on it and wait until each is ready;
    only then SIGTERM the old generation (its requests in flight finish on
    the old settings) and close what the new one does not use.  Anything
    failing on the way (the file, a store, a port taken, a worker that does
    not get ready) leaves the old generation in force, and says why.
  - B{SIGTERM}: readiness off and the listening sockets closed at once,
    SIGTERM to every worker (they drain), up to C{daemon.shutdown_timeout}
    plus a margin, then SIGKILL; a second SIGTERM or SIGINT is passed on
    (the workers cut at once).  The admin listener stops last, the logs
    after that.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import txaio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, FirstError, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mydataproxy import config
from mydataproxy.config import ConfigError, LoggingSettings, Settings
from mydataproxy.material import loadMaterial
from mydataproxy.ops.admin import adminSite
from mydataproxy.ops.levels import applyLevels
from mydataproxy.ops.logs import ErrorLog, LogWriter
from mydataproxy.ops.metrics import aggregate, cumulative
from mydataproxy.ops.reloadstatus import reportFailure, writeStatus
from mydataproxy.ops.signals import chainSignal
from mydataproxy.ops.syslog import SyslogObserver
from mydataproxy.service import ListenerError, listenNow
from mydataproxy.workers.handoff import Acceptor, Channel, describeAddress
from mydataproxy.workers.process import ENDED, NOT_READY, READY, RETIRING, STARTING, WorkerProcess
from mydataproxy.workers.worker import configDigest

txaio.use_twisted()
log = txaio.make_logger()

RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
#: A worker up this long restarts after the first back-off again.
RESTART_RESET_SECONDS = 60.0
#: How long a new generation's workers get to become ready on SIGHUP.
READY_SECONDS = 30.0
#: Past C{shutdown_timeout}: the workers' own cut-off and log flush.
KILL_MARGIN_SECONDS = 5.0


class ReloadError(Exception):
    """A reload that cannot take (beyond the configuration's own errors)."""


class HandedOver(Factory):
    """The factory of a bound socket's port, which never accepts: its L{Acceptor} does."""

    noisy = False


class BoundSocket:
    """
    A listening socket bound once by the supervisor, through Twisted's
    endpoint (the very descriptions, binding and errors of a single
    process), and accepted on by an L{Acceptor} on a copy of it; the port
    itself is never read.

    @param receivers: The channels its connections may go to now.
    """

    def __init__(self, reactor, name: str, description: str, port: IListeningPort,
                 receivers: Callable[[BoundSocket], list[Channel]]) -> None:
        self.name = name
        self.description = description
        self.port = port
        self.address = describeAddress(port.getHost())
        listening = socket.socket(fileno=os.dup(port.fileno()))
        self.acceptor = Acceptor(reactor, name, listening, lambda: receivers(self))
        self.closing = False
        self.closed = False

    def close(self) -> None:
        """
        Stop accepting and close the socket, once, resetting no connection:
        those queued are accepted and handed over, then the socket is
        closed in the same reactor turn (L{mydataproxy.service.closeNow}'s
        reason: C{stopListening} would close it a turn later, and every
        connection queued meanwhile would be reset).
        """
        if self.closed:
            return
        self.closing = True
        self.acceptor.stop()
        self.closed = True
        self.port.connectionLost(Failure(ConnectionDone("the listener closed")))


def bindOnce(reactor, name: str, description: str, receivers: Callable[[BoundSocket], list[Channel]]) -> BoundSocket:
    """
    Bind C{description}, for its connections to be handed to the workers
    that C{receivers} gives.

    @raise OSError: If it cannot be bound.
    """
    port = listenNow(reactor, description, HandedOver())
    port.stopReading()
    log.info("{name} bound on {address}, its connections handed to the workers", name=name, address=port.getHost())
    return BoundSocket(reactor, name, description, port, receivers)


def proxyListeners(settings: Settings) -> dict[str, str]:
    """The endpoint of each proxy listener C{settings} want, by name (the admin listener is the supervisor's)."""
    wanted = {}
    if settings.forward.enabled:
        wanted["forward"] = settings.forward.listen
    if settings.reverse is not None:
        wanted["reverse"] = settings.reverse.listen
    return wanted


def loadChecked(path: str | None) -> tuple[Settings, str | None]:
    """
    Start-up's loading and validation (settings, then material), and the
    file's SHA-256, unchanged from before to after (run in a thread).

    @raise ConfigError: If the file or its material does not load, or it
        changed meanwhile.
    """
    if path is None:
        settings = Settings()
        loadMaterial(settings)
        return settings, None
    try:
        before = configDigest(path)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    settings = config.load(path)
    loadMaterial(settings)
    try:
        after = configDigest(path)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    if after != before:
        raise ConfigError(path, None, "changed while it was being loaded: send SIGHUP again")
    return settings, before


@dataclass(eq=False)
class Generation:
    """
    One configuration at work: its settings, the file's digest the workers
    must find, its listening sockets, its access log writer and its worker
    slots (the worker in each, restarted in place).
    """

    number: int
    settings: Settings
    digest: str | None
    sockets: dict[str, BoundSocket]
    accessWriter: LogWriter
    slots: list[WorkerProcess | None] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)
    delays: dict[int, float] = field(default_factory=dict)
    restarts: dict[int, IDelayedCall] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = [None] * max(1, self.settings.daemon.workers)

    @property
    def live(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers if worker.running]

    def cancelRestarts(self) -> None:
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()


@dataclass(eq=False)
class _Prepared:
    """What a reload made before the swap, to be put in force or undone."""

    generation: Generation
    bound: list[BoundSocket]
    newWriter: bool
    admin: IListeningPort | None
    adminChanged: bool
    errorLog: ErrorLog | None


class _Collected:
    """Metric families gathered at one scrape, as the exposition encoders read them."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class _SupervisorMetrics:
    """The collector of the supervisor's own state."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self):
        supervisor = self._supervisor
        current = supervisor.current
        names = {READY: "ready", STARTING: "starting", NOT_READY: "not_ready", RETIRING: "retiring"}
        states = dict.fromkeys(("ready", "starting", "not_ready", "down", "retiring"), 0)
        for generation in (current, *supervisor.older):
            for worker in generation.live:
                states[names[worker.state] if generation is current else "retiring"] += 1
        states["down"] = sum(1 for worker in current.slots if worker is None or not worker.running)
        workers = GaugeMetricFamily(
            "mydataproxy_workers",
            "Worker processes by state: ready, starting, not ready, down (waiting for a restart), retiring",
            labels=["state"],
        )
        for state, count in states.items():
            workers.add_metric([state], count)
        yield workers
        dropped = CounterMetricFamily(
            "mydataproxy_log_lines_dropped",
            "Log lines not written: the queue was full (dropped) or the write failed (lost)",
            labels=["log", "why"],
        )
        for (name, why), count in supervisor.lostLines().items():
            dropped.add_metric([name, why], count)
        yield dropped


class Supervisor(Service):
    """
    The supervisor of the module docstring.

    @param configPath: The config file (absolute), or L{None} for the
        embedded defaults.
    @param statusPath: Where each load's outcome is written for
        C{mydataproxy reload}, or L{None}.
    @ivar current: The generation in force.
    @ivar older: Generations whose workers are still finishing (retired
        by a reload, or a reload's that did not take).
    """

    name = "supervisor"

    def __init__(self, settings: Settings, configPath: str | None, statusPath: str | None, reactor) -> None:
        self.reactor = reactor
        self.configPath = configPath
        self.statusPath = statusPath
        self.draining = False
        self.older: list[Generation] = []
        self.errorLog: ErrorLog | None = None
        self.syslog: SyslogObserver | None = None
        self.runDirectory: Path | None = None
        self._logging = settings.logging
        self._writers: dict[str, LogWriter] = {}
        self._admin: IListeningPort | None = None
        self._adminDescription: str | None = None
        self._attempts = 1
        self._serial = 0
        self._reloads = DeferredLock()
        self._retired: list[Metric] = []
        self._lost = {(name, why): 0 for name in ("access", "error") for why in ("dropped", "lost", "malformed")}
        self.registry = CollectorRegistry()
        self._restartCount = Counter(
            "mydataproxy_worker_restarts", "Workers restarted after they exited unexpectedly", registry=self.registry
        )
        self.registry.register(_SupervisorMetrics(self))
        self.site = adminSite(self.notReady, self.gatherMetrics)
        try:
            digest = configDigest(configPath) if configPath is not None else None
        except OSError as e:
            raise SystemExit(f"mydataproxy: cannot read {configPath}: {e.strerror}") from None
        self.current = Generation(1, settings, digest, {}, self._writerFor(settings.logging))

    # Logs

    def _writerFor(self, logging: LoggingSettings) -> LogWriter:
        path = logging.accessPath(socket.gethostname())
        writer = self._writers.get(path)
        if writer is None:
            writer = LogWriter(path, "access log", self.reactor, logging, chained=logging.tamper_evident)
        return writer

    def writers(self) -> list[LogWriter]:
        """The access log writers open (one per path in use)."""
        return list(self._writers.values())

    def lostLines(self) -> dict[tuple[str, str], int]:
        """
        Lines not written, by log and why: dropped or lost by the
        supervisor's writers (those closed since included), and malformed
        (too long, or cut by a worker's end) on the workers' pipes.
        """
        counts = dict(self._lost)
        writers = [("access", w) for w in self.writers()]
        if self.errorLog is not None:
            writers.append(("error", self.errorLog.writer))
        for name, writer in writers:
            counts[name, "dropped"] += writer.dropped
            counts[name, "lost"] += writer.lost
        for worker in (w for g in self._generations() for w in g.live):
            for name, count in worker.malformed.items():
                counts[name, "malformed"] += count
        return counts

    def _closed(self, name: str, writer: LogWriter) -> None:
        """Keep the counts of a writer that stops."""
        self._lost[name, "dropped"] += writer.dropped
        self._lost[name, "lost"] += writer.lost

    def _startWriter(self, writer: LogWriter) -> bool:
        """Open C{writer} if it is new (C{OSError} if it cannot be); whether it was."""
        if writer.path in self._writers:
            return False
        writer.start()
        self._writers[writer.path] = writer
        return True

    def _releaseWriters(self) -> None:
        used = {g.accessWriter.path for g in self._generations()}
        for path in [p for p in self._writers if p not in used]:
            writer = self._writers.pop(path)
            writer.stop()
            self._closed("access", writer)

    def _observe(self, errorLog: ErrorLog | None, syslog: SyslogObserver | None) -> None:
        for old in (self.errorLog, self.syslog):
            if old is not None and old not in (errorLog, syslog):
                globalLogPublisher.removeObserver(old)
        if self.errorLog is not None and self.errorLog is not errorLog:
            self.errorLog.stop()
            self._closed("error", self.errorLog.writer)
        if self.syslog is not None and self.syslog is not syslog:
            self.syslog.close()
        for new in (errorLog, syslog):
            if new is not None and new not in (self.errorLog, self.syslog):
                globalLogPublisher.addObserver(new)
        self.errorLog, self.syslog = errorLog, syslog

    def reopenLogs(self) -> None:
        """Open the log files afresh (SIGUSR1)."""
        log.info("SIGUSR1: reopening the log files")
        for writer in self.writers():
            writer.reopen()
        if self.errorLog is not None:
            self.errorLog.reopen()

    # Readiness and metrics

    def _generations(self) -> list[Generation]:
        return [self.current, *self.older]

    def notReady(self) -> list[str]:
        """Why the instance should get no traffic now: draining, or fewer than N workers ready."""
        reasons = ["draining (shutting down)"] if self.draining else []
        for index, worker in enumerate(self.current.slots):
            if worker is None:
                reasons.append(f"worker {index}: not started")
            elif worker.state == ENDED:
                reasons.append(f"{worker.name}: {worker.ending}, to be restarted")
            elif worker.state != READY:
                reasons.append(f"{worker.name}: {'; '.join(worker.reasons) or worker.state}")
        return reasons

    def gatherMetrics(self) -> Deferred[_Collected]:
        """Every running worker's metrics now, with the exited workers' counts and the supervisor's own, summed."""
        running = [w for g in self._generations() for w in g.live]
        scrapes = gatherResults([worker.scrape() for worker in running])
        return scrapes.addCallback(
            lambda snapshots: _Collected(aggregate([*snapshots, self._retired, list(self.registry.collect())]))
        )

    # Workers

    def _spawn(self, generation: Generation, index: int) -> WorkerProcess:
        self._serial += 1
        worker = WorkerProcess(
            self.reactor, index, generation.number, self._serial, self.runDirectory, generation.accessWriter,
            self._workerEnded, self._resume,
        )
        worker.spawn(self.configPath, generation.digest, {name: s.address for name, s in generation.sockets.items()})
        generation.slots[index] = worker
        generation.workers.append(worker)
        log.info("{name} started", name=worker.name)
        return worker

    def _receivers(self, bound: BoundSocket) -> list[Channel]:
        """
        Where C{bound}'s connections go now: the workers of the generation
        in force that serve, if that generation listens there or C{bound}
        is closing (its last connections); none while draining, and none
        for a socket a reload bound until it is in force.
        """
        current = self.current
        if self.draining or not (bound.closing or bound in current.sockets.values()):
            return []
        return [w.channel for w in current.slots if w is not None and w.serving and w.channel is not None]

    def _resume(self) -> None:
        """A worker may take connections now: every socket hands over what waits, and accepts again."""
        for bound in {s for g in self._generations() for s in g.sockets.values() if not s.closed}:
            bound.acceptor.resume()

    def _workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        self._retired = aggregate([self._retired, cumulative(worker.snapshot)])
        for name, count in worker.malformed.items():
            self._lost[name, "malformed"] += count
        generation = next((g for g in self._generations() if worker in g.workers), None)
        unread, worker.unread = worker.unread, []
        if unread:
            log.info("{name} left {n} connections unread: handed to another worker", name=worker.name, n=len(unread))
        for name, connection in unread:
            bound = generation.sockets.get(name.decode("utf-8", "replace")) if generation is not None else None
            if bound is None or bound.closed:
                connection.close()
            else:
                bound.acceptor.takeBack(connection)
        if generation is None:
            return
        generation.workers.remove(worker)
        current = generation is self.current and generation.slots[worker.index] is worker
        if current and not self.draining and not worker.told:
            self._scheduleRestart(generation, worker)
        else:
            log.info("{name} exited ({how})", name=worker.name, how=worker.ending)
        self._finishGenerations()

    def _scheduleRestart(self, generation: Generation, worker: WorkerProcess) -> None:
        index = worker.index
        up = self.reactor.seconds() - worker.started
        previous = generation.delays.get(index)
        if previous is None or up >= RESTART_RESET_SECONDS:
            delay = RESTART_FIRST_SECONDS
        else:
            delay = min(previous * 2, RESTART_MAX_SECONDS)
        generation.delays[index] = delay
        log.warn(
            "{name} exited unexpectedly ({how}); restarting it in {delay:g} s",
            name=worker.name, how=worker.ending, delay=delay,
        )
        generation.restarts[index] = self.reactor.callLater(delay, self._restart, generation, index)

    def _restart(self, generation: Generation, index: int) -> None:
        generation.restarts.pop(index, None)
        if self.draining or generation is not self.current:
            return
        self._restartCount.inc()
        try:
            self._spawn(generation, index)
        except OSError as e:
            log.error("worker {index} could not be started: {e}", index=index, e=e)
            generation.restarts[index] = self.reactor.callLater(RESTART_MAX_SECONDS, self._restart, generation, index)

    def _finishGenerations(self) -> None:
        for generation in [g for g in self.older if not g.live]:
            generation.cancelRestarts()
            self.older.remove(generation)
        self._releaseWriters()

    def _whenAllReady(self, generation: Generation) -> Deferred:
        waits = [worker.whenReady() for worker in generation.slots if worker is not None]

        def first(failure: Failure) -> None:
            failure.trap(FirstError)
            raise ReloadError(failure.value.subFailure.getErrorMessage())

        return gatherResults(waits, consumeErrors=True).addErrback(first)

    # Start and stop

    def privilegedStartService(self) -> None:
        """Bind the listeners and the admin listener, open the logs: here, before twistd sheds privileges."""
        super().privilegedStartService()
        generation = self.current
        name = ""
        try:
            for name, description in proxyListeners(generation.settings).items():
                generation.sockets[name] = bindOnce(self.reactor, name, description, self._receivers)
            admin = generation.settings.admin
            if admin is not None:
                name = "admin"
                self._admin = listenNow(self.reactor, admin.listen, self.site)
                self._adminDescription = admin.listen
                log.info("admin listening on {address}", address=self._admin.getHost())
        except OSError as e:
            raise ListenerError(f"mydataproxy: {name}: {e}") from None
        logging = generation.settings.logging
        errorPath = logging.errorPath(socket.gethostname())
        errorLog = ErrorLog(errorPath, self.reactor, logging) if errorPath else None
        try:
            if errorLog is not None:
                errorLog.start()
            self._startWriter(generation.accessWriter)
        except OSError as e:
            raise ListenerError(f"mydataproxy: cannot open the log {e.filename or ''}: {e.strerror or e}") from None
        applyLevels(logging)
        self._observe(errorLog, SyslogObserver(logging.syslog, logging.syslog_facility) if logging.syslog else None)

    def startService(self) -> None:
        super().startService()
        self.runDirectory = Path(tempfile.mkdtemp(prefix="mydataproxy-workers-"))
        generation = self.current
        log.info(
            "supervisor: configuration from {source}, {n} workers (daemon.workers)",
            source=generation.settings.source, n=len(generation.slots),
        )
        for index in range(len(generation.slots)):
            self._spawn(generation, index)
        self._whenAllReady(generation).addCallbacks(
            lambda _: log.info("all {n} workers of generation 1 are serving", n=len(generation.slots)),
            lambda failure: None,
        )
        self.reactor.addSystemEventTrigger("after", "shutdown", self._stopLast)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))
        chainSignal(self.reactor, signal.SIGUSR1, self.reopenLogs)
        # twistd's SIGTERM handler has the process end by the signal; a
        # drained stop is a clean exit.  The reactor installs its handlers
        # as it starts running: ours replace them then.
        self.reactor.callWhenRunning(self._handleStopSignals)
        self._writeStatus(True, f"generation 1 in force from {generation.settings.source}")

    def _handleStopSignals(self) -> None:
        if self.draining:
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda signum, frame: self.reactor.callFromThread(self.reactor.stop))

    def stopService(self) -> Deferred:
        """
        Drain: readiness off and the listening sockets closed, SIGTERM to
        every worker, SIGKILL to those still running after
        C{shutdown_timeout} and a margin (a second SIGTERM or SIGINT: passed
        on, the workers cut at once); the admin listener stops last.
        """
        super().stopService()
        for bound in {s for g in self._generations() for s in g.sockets.values()}:
            bound.close()
        self.draining = True
        for generation in self._generations():
            generation.cancelRestarts()
        workers = [w for g in self._generations() for w in g.live]
        timeout = self.current.settings.daemon.shutdown_timeout
        log.info("draining: stopping {n} workers, up to {s:g} s (daemon.shutdown_timeout)", n=len(workers), s=timeout)
        for worker in workers:
            worker.retire()

        def passOn(signum, frame) -> None:
            self.reactor.callFromThread(self._signalAll, signal.SIGTERM, "cutting off what the workers have left")

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, passOn)
        deadline = self.reactor.callLater(
            timeout + KILL_MARGIN_SECONDS, self._signalAll, signal.SIGKILL, "killing the workers still running"
        )
        ended = DeferredList([worker.whenEnded() for worker in workers])

        def exited(_) -> None:
            if deadline.active():
                deadline.cancel()
            log.info("every worker has exited")

        ended.addCallback(exited)
        ended.addCallback(lambda _: self._admin.stopListening() if self._admin is not None else None)
        return ended

    def _signalAll(self, number: int, why: str) -> None:
        workers = [w for g in self._generations() for w in g.live]
        if workers:
            log.warn("{why}: signal {number} to {n} workers", why=why, number=signal.Signals(number).name,
                     n=len(workers))
        for worker in workers:
            worker.signal(number)

    def _stopLast(self) -> None:
        for writer in self.writers():
            writer.stop()
        self._writers.clear()
        self._observe(None, None)
        if self.runDirectory is not None:
            shutil.rmtree(self.runDirectory, ignore_errors=True)

    def _writeStatus(self, ok: bool, message: str) -> None:
        writeStatus(self.statusPath, generation=self.current.number, attempt=self._attempts, ok=ok, message=message)

    # Reload (SIGHUP)

    def reload(self) -> Deferred[bool]:
        """
        Load the config file again and put it in force with a new
        generation of workers (SIGHUP); reloads run one after the other.

        @return: Fires with whether the new configuration took.
        """
        return self._reloads.run(self._reload)

    def _reload(self) -> Deferred[bool]:
        self._attempts += 1
        log.info("SIGHUP: reloading the configuration from {source}", source=self.configPath or "<embedded defaults>")
        loading = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), loadChecked, self.configPath)
        loading.addCallback(self._prepare)
        loading.addCallback(self._swap)
        return loading.addErrback(self._failed)

    def _prepare(self, loaded: tuple[Settings, str | None]) -> Deferred[_Prepared]:
        if self.draining:
            raise ReloadError("shutting down")
        settings, digest = loaded
        old = self.current
        sockets: dict[str, BoundSocket] = {}
        bound: list[BoundSocket] = []
        admin = settings.admin.listen if settings.admin is not None else None
        adminPort = None
        errorLog = None
        writer = self._writerFor(settings.logging)
        newWriter = False
        try:
            for name, description in proxyListeners(settings).items():
                kept = old.sockets.get(name)
                if kept is not None and kept.description == description:
                    sockets[name] = kept
                    continue
                try:
                    sockets[name] = bindOnce(self.reactor, name, description, self._receivers)
                except OSError as e:
                    raise ConfigError(settings.source, f"{name}.listen", str(e)) from None
                bound.append(sockets[name])
            if admin is not None and admin != self._adminDescription:
                try:
                    adminPort = listenNow(self.reactor, admin, self.site)
                except OSError as e:
                    raise ConfigError(settings.source, "admin.listen", str(e)) from None
            errorPath = settings.logging.errorPath(socket.gethostname())
            if errorPath and (self.errorLog is None or self.errorLog.path != errorPath):
                errorLog = ErrorLog(errorPath, self.reactor, settings.logging)
                errorLog.start()
            newWriter = self._startWriter(writer)
        except (ConfigError, OSError):
            self._undo(bound, adminPort, errorLog)
            raise
        generation = Generation(old.number + 1, settings, digest, sockets, writer)
        prepared = _Prepared(generation, bound, newWriter, adminPort, admin != self._adminDescription, errorLog)
        self.older.append(generation)
        try:
            for index in range(len(generation.slots)):
                self._spawn(generation, index)
        except OSError as e:
            self._abandon(prepared)
            raise ReloadError(f"cannot start the workers: {e}") from None
        ready = self._whenAllReady(generation).addTimeout(READY_SECONDS, self.reactor)

        def notReady(failure: Failure) -> Failure:
            self._abandon(prepared)
            if failure.check(ReloadError):
                return failure
            return Failure(ReloadError(
                f"the workers of generation {generation.number} were not ready within {READY_SECONDS:g} s"
            ))

        return ready.addCallbacks(lambda _: prepared, notReady)

    def _undo(self, bound: list[BoundSocket], adminPort: IListeningPort | None, errorLog: ErrorLog | None) -> None:
        for each in bound:
            each.close()
        if adminPort is not None:
            adminPort.stopListening()
        if errorLog is not None:
            errorLog.stop()

    def _abandon(self, prepared: _Prepared) -> None:
        generation = prepared.generation
        for worker in generation.live:
            worker.retire()
        self._undo(prepared.bound, prepared.admin, prepared.errorLog)
        self._finishGenerations()

    def _swap(self, prepared: _Prepared) -> bool:
        new = prepared.generation
        if self.draining:
            self._abandon(prepared)
            raise ReloadError("shutting down")
        old, self.current = self.current, new
        self.older.remove(new)
        self.older.append(old)
        old.cancelRestarts()
        for worker in old.live:
            worker.retire()
        for worker in new.slots:
            if worker is not None and not worker.running:
                self._scheduleRestart(new, worker)  # ended between its ready and the swap
        kept = set(new.sockets.values())
        for each in old.sockets.values():
            if each not in kept:
                each.close()
        self._resume()
        if prepared.adminChanged:
            if self._admin is not None:
                self._admin.stopListening()
            self._admin = prepared.admin
            self._adminDescription = new.settings.admin.listen if new.settings.admin is not None else None
        logging = new.settings.logging
        if logging != self._logging:
            if not prepared.newWriter:
                new.accessWriter.reconfigure(logging, chained=logging.tamper_evident)
            errorLog = prepared.errorLog
            if errorLog is None and logging.errorPath(socket.gethostname()):
                errorLog = self.errorLog
                errorLog.reconfigure(logging)
            syslog = self.syslog
            if (logging.syslog, logging.syslog_facility) != (self._logging.syslog, self._logging.syslog_facility):
                syslog = SyslogObserver(logging.syslog, logging.syslog_facility) if logging.syslog else None
            self._observe(errorLog, syslog)
            applyLevels(logging)
            self._logging = logging
        self._finishGenerations()
        message = f"reload: generation {new.number} in force from {new.settings.source}"
        log.info("{message}", message=message)
        self._writeStatus(True, message)
        return True

    def _failed(self, failure: Failure) -> bool:
        reportFailure(
            self.statusPath, failure, generation=self.current.number, attempt=self._attempts,
            expected=(ConfigError, ReloadError, OSError),
        )
        return False


def makeSupervisor(settings: Settings, configPath: str | None, statusPath: str | None, reactor=None) -> Supervisor:
    """
    The supervisor of C{settings.daemon.workers} workers (twistd's service
    when there is more than one).

    @param configPath: The config file the settings came from (the workers
        and each reload load it again), or L{None} for the embedded
        defaults.
    @param statusPath: Where each load's outcome is written, or L{None}.
    """
    if reactor is None:
        from twisted.internet import reactor
    return Supervisor(settings, os.path.abspath(configPath) if configPath else None, statusPath, reactor)
