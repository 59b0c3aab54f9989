"""
The settings model and its TOML loader.

Settings are frozen values, validated once at load.  Every problem is a
L{ConfigError} that names the file, the key (dotted, as the user wrote it),
the line where it could be found, and what is wrong.  Unknown keys are errors:
a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

STDOUT = "-"


class ConfigError(Exception):
    """
    A configuration problem, located as precisely as we can.
    """

    def __init__(
        self, source: str, key: str | None, problem: str, line: int | None = None
    ) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.problem}"
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class ForwardSettings:
    """The forward-proxy listener (absolute-form, x-target-host and CONNECT)."""

    listen: str = "tcp:9000:interface=127.0.0.1"
    client_allow: tuple[IPNetwork, ...] = ()
    connect_ports: frozenset[int] = frozenset({443})
    header_filter: frozenset[bytes] = frozenset({b"host", b"x-target-host"})
    client_idle_timeout: float = 60.0


@dataclass(frozen=True)
class UpstreamSettings:
    """Outbound connections to origins: pool bounds and timeouts (seconds)."""

    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    pool_wait_timeout: float = 60.0
    idle_timeout: float = 30.0
    max_connections_per_destination: int = 200
    max_connections_total: int = 500


@dataclass(frozen=True)
class LoggingSettings:
    """Where the access log goes (a path, or C{"-"} for standard output)."""

    access_log: str = STDOUT
    level: str = "info"


@dataclass(frozen=True)
class Settings:
    """
    Everything the daemon needs to start.

    @ivar source: Where these settings came from (a path, or C{<embedded
        defaults>}).
    @ivar notices: Human-readable remarks about the source that the daemon
        logs at start and C{check-config} prints (e.g. legacy keys that are
        not honoured yet).
    """

    source: str = "<embedded defaults>"
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    notices: tuple[str, ...] = ()


LOG_LEVELS = ("critical", "error", "warn", "info", "debug", "trace")


class _Checker:
    """Validation helpers bound to one source, so every error is located."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = text.splitlines()

    def lineOf(self, dotted: str) -> int | None:
        """Best-effort line number of C{dotted}'s last component."""
        leaf = re.escape(dotted.rsplit(".", 1)[-1])
        pattern = re.compile(rf'^\s*("?){leaf}\1\s*=|^\s*\[{re.escape(dotted)}\]\s*$')
        for number, line in enumerate(self._lines, start=1):
            if pattern.match(line):
                return number
        return None

    def error(self, dotted: str | None, problem: str) -> ConfigError:
        return ConfigError(
            self.source, dotted, problem, self.lineOf(dotted) if dotted else None
        )

    def number(self, dotted: str, value: Any, minimum: float, integer: bool) -> Any:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if integer else "a number"
            raise self.error(dotted, f"must be {kind}, not {value!r}")
        if value < minimum:
            raise self.error(dotted, f"must be at least {minimum}, not {value!r}")
        return value if integer else float(value)

    def string(self, dotted: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(dotted, f"must be a non-empty string, not {value!r}")
        return value

    def stringList(self, dotted: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(dotted, f"must be a list of strings, not {value!r}")
        return value


def parseNetwork(text: str) -> IPNetwork:
    """
    Parse a client address pattern: a CIDR (C{10.1.0.0/16}, C{::1/128}), a
    bare address, or the legacy wildcard form C{10.1.*.*}.

    @raise ValueError: If C{text} is none of these.
    """
    text = text.strip()
    if "*" in text:
        parts = text.split(".")
        if len(parts) != 4:
            raise ValueError(f"{text!r} is not a valid IPv4 wildcard pattern")
        fixed = 0
        while fixed < 4 and parts[fixed] != "*":
            fixed += 1
        if any(p != "*" for p in parts[fixed:]):
            raise ValueError(f"{text!r}: '*' may only stand for trailing octets")
        address = ".".join(parts[:fixed] + ["0"] * (4 - fixed))
        return ipaddress.ip_network(f"{address}/{fixed * 8}")
    return ipaddress.ip_network(text, strict=True)


def _forward(check: _Checker, table: Mapping[str, Any]) -> ForwardSettings:
    defaults = ForwardSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"forward.{key}"
        if key == "listen":
            values[key] = check.string(dotted, value)
        elif key == "client_allow":
            networks = []
            for item in check.stringList(dotted, value):
                try:
                    networks.append(parseNetwork(item))
                except ValueError as e:
                    raise check.error(dotted, str(e)) from None
            values[key] = tuple(networks)
        elif key == "connect_ports":
            if not isinstance(value, list) or not value:
                raise check.error(dotted, "must be a non-empty list of port numbers")
            ports = [check.number(dotted, p, 1, integer=True) for p in value]
            if any(p > 65535 for p in ports):
                raise check.error(dotted, f"port out of range in {value!r}")
            values[key] = frozenset(ports)
        elif key == "header_filter":
            names = check.stringList(dotted, value)
            values[key] = frozenset(n.strip().lower().encode("ascii") for n in names)
        elif key == "client_idle_timeout":
            values[key] = check.number(dotted, value, 0.001, integer=False)
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


def _upstream(check: _Checker, table: Mapping[str, Any]) -> UpstreamSettings:
    defaults = UpstreamSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"upstream.{key}"
        if key in ("connect_timeout", "read_timeout", "pool_wait_timeout", "idle_timeout"):
            values[key] = check.number(dotted, value, 0.001, integer=False)
        elif key in ("max_connections_per_destination", "max_connections_total"):
            values[key] = check.number(dotted, value, 1, integer=True)
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


def _logging(check: _Checker, table: Mapping[str, Any], base: Path) -> LoggingSettings:
    defaults = LoggingSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"logging.{key}"
        if key == "access_log":
            values[key] = resolvePath(check.string(dotted, value), base)
        elif key == "level":
            level = check.string(dotted, value).lower()
            if level not in LOG_LEVELS:
                raise check.error(dotted, f"must be one of {', '.join(LOG_LEVELS)}")
            values[key] = level
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


def resolvePath(path: str, base: Path) -> str:
    """Resolve a configured path against the config file's directory."""
    if path == STDOUT:
        return path
    return str((base / path).resolve())


def settingsFromMapping(
    document: Mapping[str, Any], source: str, text: str, base: Path
) -> Settings:
    """
    Validate a parsed TOML document into L{Settings}.

    @param base: Directory that relative paths are resolved against.
    @raise ConfigError: On the first problem found.
    """
    check = _Checker(source, text)
    sections: dict[str, Any] = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise check.error(name, "must be a table ([section])")
        if name == "forward":
            sections[name] = _forward(check, table)
        elif name == "upstream":
            sections[name] = _upstream(check, table)
        elif name == "logging":
            sections[name] = _logging(check, table, base)
        else:
            raise check.error(name, "unknown section")
    settings = Settings(source=source, **sections)
    validate(settings, check)
    return settings


def validate(settings: Settings, check: _Checker) -> None:
    """Checks that need more than one key's value, or the reactor's help."""
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, settings.forward.listen)
    except (ValueError, TypeError, KeyError) as e:
        raise check.error(
            "forward.listen", f"not a valid endpoint description: {e}"
        ) from None


def loadToml(path: Path) -> Settings:
    """Load and validate a native TOML config file."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, None, f"cannot read: {e}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"not valid TOML: {e}") from None
    return settingsFromMapping(document, source, text, path.parent)


def load(path: str | Path) -> Settings:
    """
    Load a config file: the Java product's C{application.properties} (by
    C{.properties} suffix) or native TOML (anything else).

    @raise ConfigError: If the file cannot be read or is not valid.
    """
    path = Path(path)
    if path.suffix == ".properties":
        from mydataproxy.legacy import loadProperties

        return loadProperties(path)
    return loadToml(path)
