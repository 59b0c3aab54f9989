"""
The TOML loader: a native config file into L{Settings}.

Every problem is a L{ConfigError} that names the file, the key (dotted, as
the user wrote it), the line where it could be found, and what is wrong.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import endpoints
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from mydataproxy.http.hosts import normaliseHost
from mydataproxy.http.target import PATH, Refusal, parseURL
from mydataproxy.config.model import (
    ACTIONS,
    AdminSettings,
    BALANCE,
    DaemonSettings,
    CLIENT_AUTH,
    ConfigError,
    EgressRule,
    EgressSettings,
    ForwardSettings,
    IPNetwork,
    LOG_FORMATS,
    LOG_LEVELS,
    LOG_TIMES,
    SYSLOG_FACILITIES,
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


class _Checker:
    """Validation helpers bound to one source, so every error is located."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = text.splitlines()

    def lineOf(self, dotted: str) -> int | None:
        """
        Best-effort line number of a dotted key such as C{forward.listen} or
        C{egress.rules[2].hosts}: the key's line inside its table, else the
        table's header line.
        """
        table = re.compile(rf"^\s*\[\s*{re.escape(dotted)}\s*\]")
        for number, line in enumerate(self._lines):
            if table.match(line):  # a table of its own, e.g. [forward.tls]
                return number + 1
        indexed = re.fullmatch(r"(.+)\[(\d+)\](?:\.([^.]+))?", dotted)
        if indexed:
            section, index, leaf = indexed.group(1), int(indexed.group(2)), indexed.group(3)
            header = re.compile(rf"^\s*\[\[\s*{re.escape(section)}\s*\]\]")
        else:
            section, _, leaf = dotted.rpartition(".")
            if not section:
                section, leaf = dotted, None
            index = 0
            header = re.compile(rf"^\s*\[\s*{re.escape(section)}\s*\]")
        start = None
        for number, line in enumerate(self._lines):
            if header.match(line):
                if index == 0:
                    start = number
                    break
                index -= 1
        if start is None:
            # Not a table after all (e.g. "forward = 3"): look for the key.
            name = re.sub(r"\[\d+\]$", "", (indexed.group(1) if indexed else dotted).rsplit(".", 1)[-1])
            bare = re.compile(rf'^\s*("?){re.escape(name)}\1\s*=')
            return next((n + 1 for n, line in enumerate(self._lines) if bare.match(line)), None)
        if leaf is None:
            return start + 1
        key = re.compile(rf'^\s*("?){re.escape(leaf)}\1\s*=')
        for number in range(start + 1, len(self._lines)):
            if self._lines[number].lstrip().startswith("["):
                break
            if key.match(self._lines[number]):
                return number + 1
        return start + 1

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

    def networks(self, dotted: str, value: Any) -> tuple[IPNetwork, ...]:
        networks = []
        for item in self.stringList(dotted, value):
            try:
                networks.append(parseNetwork(item))
            except ValueError as e:
                raise self.error(dotted, str(e)) from None
        return tuple(networks)

    def ports(self, dotted: str, value: Any) -> frozenset[int]:
        if not isinstance(value, list) or not value:
            raise self.error(dotted, "must be a non-empty list of port numbers")
        ports = [self.number(dotted, p, 1, integer=True) for p in value]
        if any(p > 65535 for p in ports):
            raise self.error(dotted, f"port out of range in {value!r}")
        return frozenset(ports)

    def portRanges(self, dotted: str, value: Any) -> tuple[tuple[int, int], ...]:
        """Port numbers and C{"low-high"} strings as sorted, merged ranges."""
        if not isinstance(value, list) or not value:
            raise self.error(dotted, 'must be a non-empty list of ports and "low-high" ranges')
        ranges = []
        for item in value:
            try:
                ranges.append(parsePortRange(item))
            except ValueError as e:
                raise self.error(dotted, str(e)) from None
        merged: list[tuple[int, int]] = []
        for low, high in sorted(ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        return tuple(merged)

    def hostPatterns(self, dotted: str, value: Any) -> tuple[str, ...]:
        """Normalised host names and C{*.suffix} patterns."""
        hosts = []
        for host in self.stringList(dotted, value):
            wildcard = host.startswith("*.")
            try:
                name = normaliseHost(host[2:] if wildcard else host)
            except ValueError as e:
                raise self.error(dotted, f"{host!r}: {e}") from None
            hosts.append("*." + name if wildcard else name)
        return tuple(hosts)

    def boolean(self, dotted: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(dotted, f"must be true or false, not {value!r}")
        return value

    def choice(self, dotted: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(dotted, f"must be one of {', '.join(choices)}, not {value!r}")
        return value


def parsePortRange(item: Any) -> tuple[int, int]:
    """
    A port (C{443}) or an inclusive range (C{"8000-8099"}) as C{(low, high)}.

    @raise ValueError: If C{item} is neither, or is outside 1-65535.
    """
    if isinstance(item, int) and not isinstance(item, bool):
        low = high = item
    elif isinstance(item, str) and re.fullmatch(r"[0-9]{1,5}-[0-9]{1,5}", item.strip()):
        low, high = map(int, item.strip().split("-"))
    else:
        raise ValueError(f'{item!r} is neither a port number nor a "low-high" range')
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{item!r}: ports run from 1 to 65535, low to high")
    return low, high



# RFC 9110 section 5.6.2: field names are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def headerFilterName(name: str) -> bytes:
    """
    The lower-cased field name a C{header_filter} entry stands for
    (surrounding blanks ignored).

    @raise ValueError: If C{name} is not a field name (an RFC 9110 token),
        or is one of L{PROXY_WRITTEN_FIELDS}.
    """
    token = name.strip()
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{name!r} is not a valid header field name (RFC 9110 token)")
    lower = token.lower().encode("ascii")
    if lower in PROXY_WRITTEN_FIELDS:
        raise ValueError(
            f"{token!r} cannot be filtered: the proxy writes Content-Length, Transfer-Encoding and Host itself"
        )
    return lower


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


def _forward(check: _Checker, table: Mapping[str, Any], base: Path) -> ForwardSettings:
    defaults = ForwardSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"forward.{key}"
        if key == "enabled":
            values[key] = check.boolean(dotted, value)
        elif key == "listen":
            values[key] = check.string(dotted, value)
        elif key in ("client_allow", "trusted_proxies"):
            values[key] = check.networks(dotted, value)
        elif key == "connect_ports":
            values[key] = check.ports(dotted, value)
        elif key == "http_ports":
            values[key] = check.portRanges(dotted, value)
        elif key == "header_filter":
            names = []
            for name in check.stringList(dotted, value):
                try:
                    names.append(headerFilterName(name))
                except ValueError as e:
                    raise check.error(dotted, str(e)) from None
            values[key] = frozenset(names)
        elif key == "client_idle_timeout":
            values[key] = check.number(dotted, value, 0.001, integer=False)
        elif key == "auth_file":
            values[key] = resolvePath(check.string(dotted, value), base)
        elif key == "tls":
            values[key] = _serverTLS(check, "forward.tls", value, base)
        elif key == "auth_realm":
            realm = check.string(dotted, value)
            if not realm.isprintable():
                raise check.error(dotted, "must be printable text")
            values[key] = realm
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


def _reverse(check: _Checker, table: Mapping[str, Any], base: Path, upstream: UpstreamSettings, limits: LimitSettings) -> ReverseSettings:
    defaults = ReverseSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"reverse.{key}"
        if key == "listen":
            values[key] = check.string(dotted, value)
        elif key in ("client_allow", "trusted_proxies"):
            values[key] = check.networks(dotted, value)
        elif key == "client_idle_timeout":
            values[key] = check.number(dotted, value, 0.001, integer=False)
        elif key == "tls":
            values[key] = _serverTLS(check, "reverse.tls", value, base)
        elif key == "routes":
            if not isinstance(value, list):
                raise check.error(dotted, "must be an array of tables ([[reverse.routes]])")
            values[key] = tuple(_route(check, i, route, upstream, limits) for i, route in enumerate(value))
        else:
            raise check.error(dotted, "unknown key")
    routes = values.get("routes", ())
    if not routes:
        raise check.error("reverse.routes", "the reverse listener needs at least one [[reverse.routes]] entry")
    seen: dict[tuple[bytes, tuple[str, ...]], int] = {}
    names: dict[str, int] = {}
    for index, route in enumerate(routes):
        key = (route.prefix, tuple(sorted(route.hosts)))
        if key in seen:
            raise check.error(
                f"reverse.routes[{index}].prefix",
                f"{route.prefix.decode()!r} is already routed by reverse.routes[{seen[key]}] for the same hosts",
            )
        if route.name in names:
            raise check.error(
                f"reverse.routes[{index}].name",
                f"{route.name!r} is already the name of reverse.routes[{names[route.name]}]",
            )
        seen[key] = index
        names[route.name] = index
    return replace(defaults, **values)


def _backend(check: _Checker, dotted: str, url: Any, prefix: bytes) -> RouteBackend:
    text = check.string(dotted, url)
    try:
        destination, path = parseURL(text.encode("ascii"))
    except (Refusal, UnicodeEncodeError) as e:
        raise check.error(dotted, f"{text!r} is not an http:// or https:// URL ({e})") from None
    if b"?" in path or PATH.fullmatch(path) is None:
        raise check.error(dotted, f"{text!r}: the base path may hold only RFC 3986 path characters, no query")
    if not path:
        path = b"/" if prefix.endswith(b"/") else b""
    elif path.endswith(b"/") != prefix.endswith(b"/"):
        # ProxyPass's own rule: otherwise the joined path loses or doubles a slash.
        raise check.error(dotted, f"{text!r}: end the base path with '/' exactly when the prefix does")
    if "@" in text.partition("://")[2].partition("/")[0]:
        raise check.error(dotted, f"{text!r}: credentials in a backend URL are not supported")
    return RouteBackend(destination.scheme, destination.host, destination.port, path)


_ROUTE_NUMBERS = {
    # key: (minimum, integer)
    "connect_timeout": (0.001, False),
    "read_timeout": (0.001, False),
    "max_body_bytes": (0, True),
    "max_concurrent": (0, True),
    "queue_size": (0, True),
    "queue_timeout": (0.001, False),
    "health_interval": (0.1, False),
    "eject_seconds": (0.1, False),
}


def _route(check: _Checker, index: int, table: Any, upstream: UpstreamSettings, limits: LimitSettings) -> RouteSettings:
    prefix_ = f"reverse.routes[{index}]"
    if not isinstance(table, dict):
        raise check.error(prefix_, "must be a table")
    values: dict[str, Any] = {
        "connect_timeout": upstream.connect_timeout,
        "read_timeout": upstream.read_timeout,
        "max_body_bytes": limits.max_body_bytes,
    }
    if "prefix" not in table:
        raise check.error(prefix_, "needs prefix (the public path, e.g. \"/api/\")")
    prefix = check.string(f"{prefix_}.prefix", table["prefix"])
    if not prefix.startswith("/") or not prefix.isascii() or PATH.fullmatch(prefix.encode()) is None:
        raise check.error(f"{prefix_}.prefix", f"{prefix!r} must be a path starting with '/'")
    if "//" in prefix or any(segment in (".", "..") for segment in prefix.split("/")):
        raise check.error(f"{prefix_}.prefix", f"{prefix!r} must not hold '//' or dot segments")
    values["prefix"] = prefix.encode("ascii")
    if "backends" not in table:
        raise check.error(prefix_, "needs backends (one or more http:// or https:// URLs)")
    for key, value in table.items():
        dotted = f"{prefix_}.{key}"
        if key == "prefix":
            continue
        if key == "backends":
            urls = check.stringList(dotted, value)
            if not urls:
                raise check.error(dotted, "needs at least one backend URL")
            values[key] = tuple(_backend(check, dotted, url, values["prefix"]) for url in urls)
        elif key == "name":
            values[key] = check.string(dotted, value)
        elif key == "hosts":
            values[key] = check.hostPatterns(dotted, value)
        elif key == "balance":
            values[key] = check.choice(dotted, value, BALANCE)
        elif key in ("preserve_host", "websocket"):
            values[key] = check.boolean(dotted, value)
        elif key in _ROUTE_NUMBERS:
            minimum, integer = _ROUTE_NUMBERS[key]
            values[key] = check.number(dotted, value, minimum, integer)
        elif key == "health_check":
            path = check.string(dotted, value) if value != "" else ""
            if path and (not path.startswith("/") or not path.isascii() or " " in path):
                raise check.error(dotted, f"{path!r} must be a path starting with '/'")
            values[key] = path.encode("ascii")
        elif key == "cookie_domain":
            domain = value if value == "" else check.string(dotted, value)
            try:
                values[key] = normaliseHost(domain.lstrip(".")).encode("ascii") if domain else b""
            except ValueError as e:
                raise check.error(dotted, f"{domain!r}: {e}") from None
        else:
            raise check.error(dotted, "unknown key")
    if "name" not in values:
        values["name"] = values["hosts"][0] + prefix if values.get("hosts") else prefix
    return RouteSettings(**values)


def _store(check: _Checker, prefix: str, table: Mapping[str, Any], kind: str, base: Path) -> StoreRef | None:
    """The C{key_store}/C{trust_store} reference in C{table}, if any."""
    path = table.get(kind)
    if path is None:
        for suffix in ("_password",) + (("key_password", "key_alias") if kind == "key_store" else ()):
            key = suffix if suffix.startswith("key_") else kind + suffix
            if key in table:
                raise check.error(f"{prefix}.{key}", f"given without {prefix}.{kind}")
        return None
    path = resolvePath(check.string(f"{prefix}.{kind}", path), base)
    ref = StoreRef(path, password=table.get(f"{kind}_password", ""))
    if kind == "key_store":
        ref = replace(ref, key_password=table.get("key_password", ""), alias=table.get("key_alias", ""))
    for key in ("password", "key_password", "alias"):
        if not isinstance(getattr(ref, key), str):
            raise check.error(f"{prefix}.{kind}_{key}", "must be a string")
    return ref


_STORE_KEYS = {
    "key_store", "key_store_password", "key_password", "key_alias", "trust_store", "trust_store_password"
}


def _serverTLS(check: _Checker, prefix: str, table: Any, base: Path) -> ServerTLSSettings:
    if not isinstance(table, dict):
        raise check.error(prefix, f"must be a table ([{prefix}])")
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key == "client_auth":
            values[key] = check.choice(dotted, value, CLIENT_AUTH)
        elif key == "min_version":
            values[key] = check.choice(dotted, value, TLS_VERSIONS)
        elif key == "ciphers":
            values[key] = check.string(dotted, value)
        elif key not in _STORE_KEYS:
            raise check.error(dotted, "unknown key")
    keyStore = _store(check, prefix, table, "key_store", base)
    if keyStore is None:
        raise check.error(prefix, "needs key_store (our certificate and key)")
    trustStore = _store(check, prefix, table, "trust_store", base)
    if values.get("client_auth", "none") != "none" and trustStore is None:
        raise check.error(f"{prefix}.client_auth", "needs trust_store (the CAs client certificates must come from)")
    return ServerTLSSettings(keyStore, trustStore, **values)


def _originTLS(check: _Checker, prefix: str, table: Any, base: Path, default: OriginTLSProfile) -> OriginTLSProfile:
    if not isinstance(table, dict):
        raise check.error(prefix, "must be a table")
    values: dict[str, Any] = {}
    preset = None
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key == "name" and prefix != "upstream.tls":
            values[key] = f"{prefix} {check.string(dotted, value)}"
        elif key == "hosts" and prefix != "upstream.tls":
            values[key] = check.hostPatterns(dotted, value)
        elif key == "preset":
            preset = check.choice(dotted, value, PRESETS)
        elif key == "verify":
            if not isinstance(value, bool):
                raise check.error(dotted, f"must be true or false, not {value!r}")
            values[key] = value
        elif key in ("min_version", "max_version"):
            values[key] = check.choice(dotted, value, TLS_VERSIONS)
        elif key in ("ciphers", "serial_number"):
            values[key] = check.string(dotted, value)
        elif key == "pins":
            pins = []
            for pin in check.stringList(dotted, value):
                hexDigits = pin.replace(":", "").upper()
                if len(hexDigits) != 64 or any(c not in "0123456789ABCDEF" for c in hexDigits):
                    raise check.error(dotted, f"{pin!r} is not a SHA-256 fingerprint")
                pins.append(":".join(hexDigits[i : i + 2] for i in range(0, 64, 2)))
            values[key] = tuple(pins)
        elif key not in _STORE_KEYS:
            raise check.error(dotted, "unknown key")
    for kind in ("key_store", "trust_store"):
        ref = _store(check, prefix, table, kind, base)
        if ref is not None:
            values[kind] = ref
    if prefix != "upstream.tls":
        values.setdefault("name", prefix)
        if not values.get("hosts"):
            raise check.error(f"{prefix}.hosts", "a profile needs the host patterns it applies to")
    profile = replace(default, **values)
    if preset == "mydata":
        # The MyData standard: TLS 1.3 only, and mutual TLS on every connection.
        profile = replace(profile, min_version="TLSv1.3", max_version="TLSv1.3")
        if profile.key_store is None:
            raise check.error(f"{prefix}.preset", "mydata needs key_store (the client certificate)")
    if TLS_VERSIONS.index(profile.min_version) > TLS_VERSIONS.index(profile.max_version):
        raise check.error(f"{prefix}.min_version", "is above max_version")
    return profile


def _rule(check: _Checker, index: int, table: Any) -> EgressRule:
    prefix = f"egress.rules[{index}]"
    if not isinstance(table, dict):
        raise check.error("egress.rules", f"entry {index} must be a table ([[egress.rules]])")
    values: dict[str, Any] = {"name": prefix}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key == "name":
            values[key] = f"{prefix} {check.string(dotted, value)}"
        elif key == "action":
            values[key] = check.choice(dotted, value, ACTIONS)
        elif key == "hosts":
            values[key] = check.hostPatterns(dotted, value)
        elif key == "networks":
            values[key] = check.networks(dotted, value)
        elif key == "ports":
            values[key] = check.ports(dotted, value)
        elif key == "modes":
            values[key] = frozenset(check.choice(dotted, m, MODES) for m in check.stringList(dotted, value))
        elif key == "users":
            values[key] = frozenset(check.stringList(dotted, value))
        elif key == "client_certificates":
            # Subjects as RFC 4514 text, e.g. "CN=gateway,O=Example Bank".
            values[key] = frozenset(check.stringList(dotted, value))
        else:
            raise check.error(dotted, "unknown key")
    if "action" not in values:
        raise check.error(prefix, "needs an action (allow or deny)")
    return EgressRule(**values)


def _egress(check: _Checker, table: Mapping[str, Any]) -> EgressSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"egress.{key}"
        if key == "rules":
            if not isinstance(value, list):
                raise check.error(dotted, "must be an array of tables ([[egress.rules]])")
            values[key] = tuple(_rule(check, i, rule) for i, rule in enumerate(value))
        elif key == "default":
            values[key] = check.choice(dotted, value, ACTIONS)
        elif key == "guard":
            if not isinstance(value, bool):
                raise check.error(dotted, f"must be true or false, not {value!r}")
            values[key] = value
        else:
            raise check.error(dotted, "unknown key")
    return replace(EgressSettings(), **values)


def _resolver(check: _Checker, table: Mapping[str, Any], base: Path) -> ResolverSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"resolver.{key}"
        if key == "servers":
            servers = []
            for item in check.stringList(dotted, value):
                host, port = item, 53
                if item.count(":") == 1 or item.startswith("["):
                    host, _, portText = item.rpartition(":")
                    if not portText.isdigit() or not 0 < int(portText) < 65536:
                        raise check.error(dotted, f"{item!r}: invalid port")
                    port = int(portText)
                try:
                    host = str(ipaddress.ip_address(host.strip("[]")))
                except ValueError:
                    raise check.error(dotted, f"{item!r}: must be an IP address[:port]") from None
                servers.append((host, port))
            values[key] = tuple(servers)
        elif key == "hosts_file":
            values[key] = resolvePath(check.string(dotted, value), base)
        elif key in ("timeout", "max_ttl"):
            values[key] = check.number(dotted, value, 0.001 if key == "timeout" else 0, integer=False)
        else:
            raise check.error(dotted, "unknown key")
    return replace(ResolverSettings(), **values)


_LIMIT_INTEGERS = {
    "max_header_bytes": 1024,
    "max_headers": 1,
    "max_uri_bytes": 64,
    "max_body_bytes": 0,
    "max_connections": 1,
    "max_connections_per_client": 1,
    "burst": 0,
}
_LIMIT_SECONDS = {"header_timeout": 0.001, "tunnel_idle_timeout": 0.001, "requests_per_second": 0}


def _limits(check: _Checker, table: Mapping[str, Any]) -> LimitSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"limits.{key}"
        if key in _LIMIT_INTEGERS:
            values[key] = check.number(dotted, value, _LIMIT_INTEGERS[key], integer=True)
        elif key in _LIMIT_SECONDS:
            values[key] = check.number(dotted, value, _LIMIT_SECONDS[key], integer=False)
        else:
            raise check.error(dotted, "unknown key")
    return replace(LimitSettings(), **values)


def _upstream(check: _Checker, table: Mapping[str, Any], base: Path) -> UpstreamSettings:
    defaults = UpstreamSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"upstream.{key}"
        if key in ("connect_timeout", "read_timeout", "pool_wait_timeout", "idle_timeout"):
            values[key] = check.number(dotted, value, 0.001, integer=False)
        elif key in ("max_connections_per_destination", "max_connections_total", "queue_per_destination"):
            values[key] = check.number(dotted, value, 1, integer=True)
        elif key == "tls":
            if not isinstance(value, dict):
                raise check.error(dotted, "must be a table ([upstream.tls])")
            profiles = value.get("profiles", [])
            if not isinstance(profiles, list):
                raise check.error(f"{dotted}.profiles", "must be an array of tables ([[upstream.tls.profiles]])")
            default = _originTLS(
                check, dotted, {k: v for k, v in value.items() if k != "profiles"}, base, OriginTLSProfile()
            )
            values["tls"] = default
            # Profiles start from the default's settings (trust store, versions).
            values["tls_profiles"] = tuple(
                _originTLS(check, f"{dotted}.profiles[{i}]", p, base, replace(default, name="", pins=(), serial_number=""))
                for i, p in enumerate(profiles)
            )
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


_LOG_NAME = re.compile(r"[A-Za-z0-9._{}-]+")


def _logging(check: _Checker, table: Mapping[str, Any], base: Path) -> LoggingSettings:
    defaults = LoggingSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"logging.{key}"
        if key in ("access_log", "error_log"):
            values[key] = "" if value == "" and key == "error_log" else resolvePath(check.string(dotted, value), base)
            problem = logDirectoryProblem(values[key]) if values[key] else None
            if problem:
                raise check.error(dotted, problem)
        elif key == "directory":
            values[key] = resolvePath(check.string(dotted, value), base)
            if Path(values[key]).exists() and not Path(values[key]).is_dir():
                raise check.error(dotted, f"{values[key]} is not a directory")
        elif key in ("access_name", "error_name"):
            name = check.string(dotted, value)
            try:
                formatted = name.format(host="h")
            except (KeyError, IndexError, ValueError):
                raise check.error(dotted, f"{name!r}: only {{host}} may be substituted") from None
            if not _LOG_NAME.fullmatch(name) or formatted in (".", ".."):
                raise check.error(dotted, f"{name!r} must be a file name (letters, digits, . _ - and {{host}})")
            values[key] = name
        elif key in ("max_size", "keep", "queue_lines"):
            values[key] = check.number(dotted, value, 1 if key == "queue_lines" else 0, integer=True)
        elif key == "max_age_days":
            values[key] = check.number(dotted, value, 0, integer=False)
        elif key in ("daily", "compress", "tamper_evident"):
            values[key] = check.boolean(dotted, value)
        elif key == "format":
            values[key] = check.choice(dotted, value, LOG_FORMATS)
        elif key == "syslog":
            values[key] = "" if value == "" else check.string(dotted, value)
        elif key == "syslog_facility":
            values[key] = check.choice(dotted, value, SYSLOG_FACILITIES)
        elif key == "time":
            values[key] = check.choice(dotted, value, LOG_TIMES)
        elif key == "level":
            values[key] = _level(check, dotted, value)
        elif key == "levels":
            if not isinstance(value, dict):
                raise check.error(dotted, 'must be a table of components and levels, e.g. { "mydataproxy.upstream" = "debug" }')
            levels = []
            for component, level in _flattened(value):
                if not re.fullmatch(r"mydataproxy(\.[a-z_]+)*", component):
                    raise check.error(f"{dotted}.{component}", "must name a component: mydataproxy or a module in it")
                levels.append((component, _level(check, f"{dotted}.{component}", level)))
            values[key] = tuple(levels)
        else:
            raise check.error(dotted, "unknown key")
    return replace(defaults, **values)


def _flattened(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A table's entries with dotted keys (TOML reads C{a.b = 1} as a table in a table) joined again."""
    entries: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            entries += _flattened(value, f"{prefix}{key}.")
        else:
            entries.append((prefix + key, value))
    return entries


def _level(check: _Checker, dotted: str, value: Any) -> str:
    level = check.string(dotted, value).lower()
    if level not in LOG_LEVELS:
        raise check.error(dotted, f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _daemon(check: _Checker, table: Mapping[str, Any]) -> DaemonSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"daemon.{key}"
        if key == "shutdown_timeout":
            values[key] = check.number(dotted, value, 0, integer=False)
        elif key == "workers":
            if value == "auto":
                values[key] = os.cpu_count() or 1
            elif isinstance(value, str):
                raise check.error(dotted, f'must be a whole number of processes or "auto", not {value!r}')
            else:
                values[key] = check.number(dotted, value, 1, integer=True)
        else:
            raise check.error(dotted, "unknown key")
    return DaemonSettings(**values)


def _admin(check: _Checker, table: Mapping[str, Any]) -> AdminSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"admin.{key}"
        if key == "listen":
            values[key] = check.string(dotted, value)
        else:
            raise check.error(dotted, "unknown key")
    return AdminSettings(**values)


def logDirectoryProblem(path: str) -> str | None:
    """
    Why the log file C{path} (absolute, or C{"-"}) could not be opened for
    lack of its directory, or L{None}.
    """
    if path == STDOUT:
        return None
    directory = Path(path).parent
    if not directory.exists():
        return f"the directory {directory} does not exist"
    if not directory.is_dir():
        return f"{directory} is not a directory"
    return None


@dataclass(frozen=True)
class ListenAddress:
    """
    The TCP address a listener binds.

    @ivar interface: An IP address; C{""} means every IPv4 interface.
    """

    interface: str
    port: int


def parseListen(description: str) -> ListenAddress | None:
    """
    Parse a listener's endpoint description as twistd will, and listen on a
    memory reactor only: the port must be in 0-65535 and the interface an
    IP address, else the real listen would fail at start.

    @return: The TCP address it binds, or L{None} for a listener without
        one (e.g. a UNIX socket).
    @raise ValueError: Saying what is wrong.
    """
    reactor = MemoryReactor()
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception as e:
        # Each endpoint type's parser raises what its argument handling
        # does: ValueError, TypeError, IndexError, OSError for a missing
        # certificate file, OpenSSL errors...
        raise ValueError(f"not a valid endpoint description: {e}") from None
    outcome: list[Any] = []
    endpoint.listen(Factory()).addBoth(outcome.append)
    if outcome and isinstance(outcome[0], Failure):
        raise ValueError(f"cannot listen: {outcome[0].getErrorMessage()}")
    # Both record (port, ..., interface).
    servers = [(server[0], server[-1]) for server in reactor.tcpServers + reactor.sslServers]
    if not servers:
        return None
    port, interface = servers[0]
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface {interface!r} is not an IP address") from None
    return ListenAddress(interface, port)


def isOpenProxy(forward: ForwardSettings) -> bool:
    """
    Does the forward listener serve anyone who can reach it: bound beyond
    loopback, with no client allow-list (or one admitting every address),
    no proxy authentication and no required client certificate?

    @raise ValueError: If C{forward.listen} is not valid (see L{parseListen}).
    """
    address = parseListen(forward.listen)
    if address is None:
        return False
    if address.interface and ipaddress.ip_address(address.interface).is_loopback:
        return False
    everyone = not forward.client_allow or any(n.prefixlen == 0 for n in forward.client_allow)
    certificates = forward.tls is not None and forward.tls.client_auth == "need"
    return everyone and not forward.auth_file and not certificates


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
            sections[name] = _forward(check, table, base)
        elif name == "egress":
            sections[name] = _egress(check, table)
        elif name == "resolver":
            sections[name] = _resolver(check, table, base)
        elif name == "limits":
            sections[name] = _limits(check, table)
        elif name == "upstream":
            sections[name] = _upstream(check, table, base)
        elif name == "logging":
            sections[name] = _logging(check, table, base)
        elif name == "admin":
            sections[name] = _admin(check, table)
        elif name == "daemon":
            sections[name] = _daemon(check, table)
        elif name != "reverse":
            raise check.error(name, "unknown section")
    if "reverse" in document:
        # Routes take their defaults from [upstream] and [limits].
        sections["reverse"] = _reverse(
            check,
            document["reverse"],
            base,
            sections.get("upstream", UpstreamSettings()),
            sections.get("limits", LimitSettings()),
        )
    settings = Settings(source=source, locations=_locations(document, check), **sections)
    validate(settings, check)
    if settings.forward.enabled and isOpenProxy(settings.forward):
        line = check.lineOf("forward.listen")
        where = f"{source}:{line}" if line is not None else source
        notice = (
            f"{where}: OPEN PROXY: forward.listen {settings.forward.listen!r} is reachable beyond loopback,"
            " forward.client_allow admits every client and forward.auth_file is not set: anyone who can"
            " reach the port can use this proxy; set forward.client_allow or forward.auth_file"
        )
        settings = replace(settings, notices=(notice,))
    return settings


def validate(settings: Settings, check: _Checker) -> None:
    """
    Checks that need more than one key's value, or the reactor.  Checks that
    need material (the htpasswd file, key stores) are
    L{mydataproxy.material.loadMaterial}'s.
    """
    try:
        parseListen(settings.forward.listen)
    except ValueError as e:
        raise check.error("forward.listen", str(e)) from None
    if settings.reverse is not None:
        try:
            parseListen(settings.reverse.listen)
        except ValueError as e:
            raise check.error("reverse.listen", str(e)) from None
    elif not settings.forward.enabled:
        raise check.error("forward.enabled", "is false and there is no [reverse] section: nothing to serve")
    if settings.admin is not None:
        try:
            parseListen(settings.admin.listen)
        except ValueError as e:
            raise check.error("admin.listen", str(e)) from None
    users = {user for rule in settings.egress.rules for user in rule.users}
    if users and not settings.forward.auth_file:
        raise check.error("egress.rules", "rules name users, but forward.auth_file is not set")


#: The settings naming material, by the dotted key that names them in TOML
#: (the same as the setting's name in the model).
_MATERIAL_KEYS = ("forward.auth_file", "forward.tls", "reverse.tls", "upstream.tls")


def _locations(document: Mapping[str, Any], check: _Checker) -> tuple[tuple[str, str, int | None], ...]:
    """Where the document names material: see L{Settings.locations}."""
    found = []
    for dotted in _MATERIAL_KEYS:
        section, _, key = dotted.partition(".")
        if key in document.get(section, {}):
            found.append((dotted, dotted, check.lineOf(dotted)))
    return tuple(found)


def loadToml(path: Path, content: bytes | None = None) -> Settings:
    """Load and validate a native TOML config file (or its C{content}, already read)."""
    source = str(path)
    try:
        text = (path.read_bytes() if content is None else content).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, None, f"cannot read: {e}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"not valid TOML: {e}") from None
    return settingsFromMapping(document, source, text, path.parent)
