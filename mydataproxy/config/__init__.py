"""
Configuration as data: the frozen settings model (L{model}), the native TOML
loader (L{toml}) and the Java product's C{application.properties}
(L{legacy}), both loading into the same model.

Owns: describing settings and checking what a config file says.  Imports
nothing of ours but L{mydataproxy.http.hosts}; reading the material a config
names (key stores, the htpasswd file) is L{mydataproxy.material}'s.
"""

from __future__ import annotations

from pathlib import Path

from mydataproxy.config.legacy import loadProperties
from mydataproxy.config.model import (
    ACTIONS,
    AdminSettings,
    BALANCE,
    DaemonSettings,
    CLIENT_AUTH,
    ConfigError,
    DEFAULT_HTTP_PORTS,
    EgressRule,
    EgressSettings,
    ForwardSettings,
    IPNetwork,
    LOG_FORMATS,
    LOG_LEVELS,
    LOG_SEVERITIES,
    LOG_TIMES,
    LimitSettings,
    LoggingSettings,
    MODES,
    OriginTLSProfile,
    PRESETS,
    PROXY_WRITTEN_FIELDS,
    ResolverSettings,
    ReverseSettings,
    RouteBackend,
    RouteSettings,
    STDOUT,
    ServerTLSSettings,
    Settings,
    StoreRef,
    TLS_VERSIONS,
    UpstreamSettings,
)
from mydataproxy.config.toml import (
    ListenAddress,
    headerFilterName,
    isOpenProxy,
    loadToml,
    logDirectoryProblem,
    parseListen,
    parseNetwork,
    parsePortRange,
    resolvePath,
    settingsFromMapping,
    validate,
)


def load(path: str | Path, content: bytes | None = None) -> Settings:
    """
    Load a config file: the Java product's C{application.properties} (by
    C{.properties} suffix) or native TOML (anything else).

    @param content: The file's bytes, already read (a supervisor hands its
        workers the bytes it validated); read from C{path} when not given.
        Relative paths in them are taken from C{path}'s folder either way.
    @raise ConfigError: If the file cannot be read or is not valid.
    """
    path = Path(path)
    if path.suffix == ".properties":
        return loadProperties(path, content)
    return loadToml(path, content)
