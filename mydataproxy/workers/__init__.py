"""
Workers: C{[daemon] workers = N} (N > 1; C{"auto"}: one per CPU) runs N
processes that serve the proxy listeners, under a supervisor (the twistd
process) that binds each listening socket once, accepts on it and hands
each connection to one worker, round robin, restarts a worker that dies,
runs the admin listener (readiness over all workers, their metrics summed),
writes the log files for all of them, and reloads (SIGHUP) by starting a
new generation of workers before retiring the old one.  See
L{mydataproxy.workers.handoff} for why connections are handed over rather
than accepted by each worker from a shared socket or C{SO_REUSEPORT}, and
L{mydataproxy.workers.worker} for what a worker is handed.

With C{workers = 1} (the default) none of this runs: the daemon is one
process, as L{mydataproxy.service} builds it.
"""

from mydataproxy.workers.supervisor import Supervisor, makeSupervisor

__all__ = ["Supervisor", "makeSupervisor"]
