"""
Log levels: one for the daemon (C{logging.level}) and one per component
(C{logging.levels}: a package or module of ours, the most specific winning),
in syslog's severities as well as ours (L{LOG_SEVERITIES}).

Every module of ours logs through its own module-level txaio logger
(C{log = txaio.make_logger()}); a component's level is set on the loggers of
the modules it names, with txaio's public C{set_log_level}.
"""

from __future__ import annotations

import sys

import txaio

from mydataproxy.config import LOG_SEVERITIES, LoggingSettings

txaio.use_twisted()


def applyLevels(settings: LoggingSettings) -> list[str]:
    """
    Set the levels C{settings} give.

    @return: The modules that got a level of their own.
    """
    txaio.set_global_log_level(LOG_SEVERITIES[settings.level])
    tuned = []
    # Shortest component first: a module's own entry overrides its package's.
    for component, level in sorted(settings.levels, key=lambda entry: len(entry[0])):
        for name, module in list(sys.modules.items()):
            if name != component and not name.startswith(component + "."):
                continue
            setLevel = getattr(getattr(module, "log", None), "set_log_level", None)
            if callable(setLevel):
                setLevel(LOG_SEVERITIES[level])
                tuned.append(name)
    return tuned
