"""
Loader for the Java product's C{application.properties}.

The keys are mapped onto the same L{Settings} model as the TOML loader.  Keys
of capabilities we do not have yet become L{Settings.notices}; keys asking for
TLS we cannot provide are errors (refusing to start is safer than serving
plaintext where TLS is expected); any other key is an error, so that a typo
never silently falls back to a default.  Values of keys whose name contains
C{password} never appear in a notice or an error.  The stores the keys name
are read by L{mydataproxy.material}, which names the key of the one that fails
thanks to L{Settings.locations}.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mydataproxy.config.model import (
    LOG_LEVELS,
    CLIENT_AUTH,
    TLS_VERSIONS,
    ConfigError,
    ForwardSettings,
    IPNetwork,
    ServerTLSSettings,
    Settings,
    StoreRef,
    UpstreamSettings,
)
from mydataproxy.config.toml import (
    headerFilterName,
    isOpenProxy,
    logDirectoryProblem,
    parseListen,
    parseNetwork,
    resolvePath,
)

# --- The .properties syntax (the subset of java.util.Properties.load used by
# --- Spring Boot): comments, separators, continuations, escapes.

_BLANK = " \t\f"
_ENTRY = re.compile(r"((?:\\.|[^\\=: \t\f])*)[ \t\f]*[=:]?[ \t\f]*(.*)", re.DOTALL)
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if len(code) == 5:
            return chr(int(code[1:], 16))
        if code == "u":
            raise ValueError("malformed \\uXXXX escape")
        return _ESCAPES.get(code, code)

    return _ESCAPE.sub(one, text)


def parseProperties(text: str, source: str) -> list[tuple[str, str, int]]:
    """
    Parse C{.properties} text into C{(key, value, line)} in file order, where
    C{line} is the line number on which the key's logical line starts.

    @raise ConfigError: On a malformed C{\\uXXXX} escape.
    """
    entries: list[tuple[str, str, int]] = []
    pending: str | None = None
    start = 0
    lines = re.split(r"\r\n|\r|\n", text)
    for number, line in enumerate(lines, start=1):
        stripped = line.lstrip(_BLANK)
        if pending is None:
            if not stripped or stripped[0] in "#!":
                continue
            pending, start = "", number
        pending += stripped
        odd = (len(pending) - len(pending.rstrip("\\"))) % 2
        if odd:
            pending = pending[:-1]  # Drop the continuation backslash.
            if number < len(lines):
                continue
        key, value = _ENTRY.fullmatch(pending).groups()  # type: ignore[union-attr]
        try:
            key = _unescape(key)
        except ValueError as e:
            raise ConfigError(source, None, f"in a key: {e}", start) from None
        try:
            entries.append((key, _unescape(value), start))
        except ValueError as e:
            raise ConfigError(source, key, str(e), start) from None
        pending = None
    return entries


# --- Values.

_ALWAYS_FILTERED = frozenset({b"x-target-host"})
_DEFAULT_PORT = 9000
# A timeout of this many seconds or more (over 16 minutes) is most likely
# meant in milliseconds, the unit of the HTTP client the Java product used.
_LIKELY_MILLISECONDS = 1000


def _integer(text: str, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError("must be an integer")
    number = int(text)
    if number < minimum:
        raise ValueError(f"must be at least {minimum}")
    return number


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return int(text)


def _address(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be an IP address (host names are not resolved)") from None


def _seconds(text: str) -> float:
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text) or not float(text) > 0:
        raise ValueError("must be a number of seconds greater than 0")
    return float(text)


def _headers(text: str) -> frozenset[bytes]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    # The Java default lists host: we set Host from the target anyway, so it
    # is dropped, not refused (as in TOML).
    return frozenset(
        headerFilterName(name) for name in names if name.lower() != "host"
    ) | _ALWAYS_FILTERED


def _networks(text: str) -> tuple[IPNetwork, ...]:
    return tuple(parseNetwork(p) for p in re.split(r"[;,]", text) if p.strip())


def _flag(text: str) -> bool:
    # Spring's String-to-Boolean conversion.
    if text.lower() in ("true", "on", "yes", "1"):
        return True
    if text.lower() in ("false", "off", "no", "0"):
        return False
    raise ValueError("must be true or false")


def _path(text: str) -> str:
    if not text:
        raise ValueError("must be a file name")
    return text


_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB|TB)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _dataSize(text: str) -> int:
    # Spring's DataSize: digits with an optional B, KB, MB, GB or TB (powers of 1024).
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError("must be a size such as 10MB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


# key -> (section, field, converter); "listen" is assembled afterwards.
_MAPPED: dict[str, tuple[str, str, Callable[[str], object]]] = {
    "server.port": ("listen", "port", _port),
    "server.address": ("listen", "address", _address),
    "proxy.header.filter": ("forward", "header_filter", _headers),
    "proxy.ip.allow": ("forward", "client_allow", _networks),
    "proxy.ssl.client.connectTimeout": ("upstream", "connect_timeout", _seconds),
    "proxy.ssl.client.socketTimeout": ("upstream", "read_timeout", _seconds),
    "proxy.ssl.client.connectionRequestTimeout": (
        "upstream", "pool_wait_timeout", _seconds),
    "proxy.httpclient.maxConnPerRoute": (
        "upstream", "max_connections_per_destination", lambda t: _integer(t, 1)),
    "proxy.httpclient.maxConnTotal": (
        "upstream", "max_connections_total", lambda t: _integer(t, 1)),
    "logging.file.name": ("logging", "access_log", _path),
    # Spring Boot before 2.4, and since: the rolling policy of the log file.
    "logging.file.max-size": ("logging", "max_size", _dataSize),
    "logging.logback.rollingpolicy.max-file-size": ("logging", "max_size", _dataSize),
    "logging.file.max-history": ("logging", "keep", lambda t: _integer(t, 0)),
    "logging.logback.rollingpolicy.max-history": ("logging", "keep", lambda t: _integer(t, 0)),
}

# TLS keys, gathered and mapped together once the whole file is read.
_TLS = {
    "server.ssl.enabled", "server.ssl.key-store", "server.ssl.key-store-password",
    "server.ssl.key-password", "server.ssl.trust-store", "server.ssl.trust-store-password",
    "server.ssl.client-auth", "proxy.ssl.client.enabled", "proxy.ssl.client.validateCertificate",
    "proxy.ssl.client.tls-version",
}

_NOT_YET = "is not supported yet and is ignored"
_NOTICED = {
    key: _NOT_YET
    for key in (
        "proxy.httpclient.disableContentCompression", "debug",
        "logging.file.total-size-cap", "logging.logback.rollingpolicy.total-size-cap",
    )
}
_NOTICED["spring.application.name"] = "has no meaning here and is ignored"
_NOTICED["server.ssl.reloadShell"] = (
    "is not run: send SIGHUP to re-read the key and trust stores instead"
)

_KNOWN = [*_MAPPED, *_TLS, *_NOTICED, "logging.level.root"]

# Spring loggers of the Java product -> our components: its HTTP client's
# request logging is the upstream client's.
_LOGGERS = {
    "root": "",
    "org.apache.http": "mydataproxy.upstream",
    "org.apache.hc": "mydataproxy.upstream",
    "org.springframework.web.client": "mydataproxy.upstream",
    "org.springframework.web.client.RestTemplate": "mydataproxy.upstream",
    # Wire logging: the heads exchanged with origins, credentials redacted.
    "org.apache.http.wire": "mydataproxy.http.wire",
    "org.apache.hc.client5.http.wire": "mydataproxy.http.wire",
    "httpclient.wire": "mydataproxy.http.wire",
}


def _shown(key: str, value: str) -> str:
    return "(value hidden)" if "password" in key.lower() else repr(value)


def loadProperties(path: Path, content: bytes | None = None) -> Settings:
    """
    Load the Java product's C{application.properties} (or its C{content},
    already read) into L{Settings}.

    @raise ConfigError: If the file cannot be read, has a key we do not know or
        a bad value, or asks for TLS that we cannot provide.
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes() if content is None else content
    except OSError as e:
        raise ConfigError(source, None, f"cannot read: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-1")  # What Spring Boot 2 reads it as.

    values: dict[str, dict[str, object]] = {
        "listen": {}, "forward": {}, "upstream": {}, "logging": {}}
    lines: dict[str, int] = {}  # The line of each key's last (winning) entry.
    notices: list[str] = []
    tls: dict[str, str] = {}
    for key, value, line in parseProperties(text, source):
        if key in lines:
            notices.append(f"{source}:{line}: {key} is set again (also at line "
                           f"{lines[key]}); the last value wins")
        lines[key] = line
        value = value.strip()
        try:
            if key in _MAPPED:
                section, name, convert = _MAPPED[key]
                values[section][name] = convert(value)
                if convert is _seconds and values[section][name] >= _LIKELY_MILLISECONDS:
                    notices.append(
                        f"{source}:{line}: {key}={value}: {value} seconds: did you mean milliseconds?"
                        " (MyData Proxy reads this key in seconds)"
                    )
            elif key in _TLS:
                tls[key] = value
            elif key.startswith("logging.level.") and key[len("logging.level."):] in _LOGGERS:
                component = _LOGGERS[key[len("logging.level."):]]
                level = value.lower()
                if level == "off":
                    level = "critical"
                if level not in LOG_LEVELS:
                    raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} or OFF")
                if component:
                    values["logging"].setdefault("levels", []).append((component, level))
                else:
                    values["logging"]["level"] = level
            elif key in _NOTICED or key.startswith("logging.level."):
                reason = _NOTICED.get(key, _NOT_YET)
                notices.append(f"{source}:{line}: {key} {reason}")
            else:
                close = difflib.get_close_matches(key, _KNOWN, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(source, key, f"unknown key{hint}", line)
        except ValueError as e:
            problem = f"{e}, not {_shown(key, value)}"
            raise ConfigError(source, key, problem, line) from None

    defaults = Settings()
    forward = replace(defaults.forward, **values["forward"])
    listen = values["listen"]
    if listen:
        # Like Spring: all interfaces unless server.address narrows it.
        description = f"tcp:{listen.get('port', _DEFAULT_PORT)}"
        if "address" in listen:
            escaped = str(listen["address"]).replace(":", "\\:")
            description += f":interface={escaped}"
        _checkEndpoint(source, description, lines)
        forward = replace(forward, listen=description)
    logging = dict(values["logging"])
    if "levels" in logging:
        logging["levels"] = tuple(logging["levels"])
    if "access_log" in logging:
        logging["access_log"] = resolvePath(str(logging["access_log"]), path.parent)
        problem = logDirectoryProblem(logging["access_log"])
        if problem:
            raise ConfigError(source, "logging.file.name", problem, lines["logging.file.name"])
    upstream = replace(defaults.upstream, **values["upstream"])
    forward, upstream, locations = _mapTLS(source, path.parent, tls, lines, notices, forward, upstream)
    if isOpenProxy(forward):
        notices.append(_openProxyNotice(source, forward, lines))
    return replace(
        defaults,
        source=source,
        forward=forward,
        upstream=upstream,
        logging=replace(defaults.logging, **logging),
        notices=tuple(notices),
        locations=locations,
    )


def _storePath(source: str, key: str, value: str, base: Path, lines: dict[str, int]) -> str:
    """A Spring resource location (C{file:...} or a plain path) as a file path."""
    if value.startswith("classpath:"):
        raise ConfigError(source, key, "classpath: resources do not exist here; give a file path", lines[key])
    return resolvePath(value.removeprefix("file:"), base)


def _mapTLS(
    source: str,
    base: Path,
    tls: dict[str, str],
    lines: dict[str, int],
    notices: list[str],
    forward: ForwardSettings,
    upstream: UpstreamSettings,
) -> tuple[ForwardSettings, UpstreamSettings, tuple[tuple[str, str, int | None], ...]]:
    """
    The Java product's TLS keys on our model, and where they are (see
    L{Settings.locations}).  Its one key store was both the
    listener's certificate and the client certificate for outbound mutual
    TLS; its trust store both checked clients and verified origins.  Unlike
    it, we keep sending the client certificate with validateCertificate=false.
    """

    def flag(key: str, default: bool) -> bool:
        try:
            return _flag(tls[key]) if key in tls else default
        except ValueError as e:
            raise ConfigError(source, key, f"{e}, not {tls[key]!r}", lines[key]) from None

    def password(key: str) -> str:
        # Java passwords are literal text, whatever they look like.
        return "pass:" + tls[key] if tls.get(key) else ""

    for store, dependants in (
        ("server.ssl.key-store", ("server.ssl.key-store-password", "server.ssl.key-password")),
        ("server.ssl.trust-store", ("server.ssl.trust-store-password",)),
    ):
        for key in dependants:
            if key in tls and not tls.get(store):
                notices.append(f"{source}:{lines[key]}: {key} is given without {store} and is ignored")
    keyStore = trustStore = None
    if tls.get("server.ssl.key-store"):
        keyStore = StoreRef(
            _storePath(source, "server.ssl.key-store", tls["server.ssl.key-store"], base, lines),
            password("server.ssl.key-store-password"),
            password("server.ssl.key-password"),
        )
    if tls.get("server.ssl.trust-store"):
        trustStore = StoreRef(
            _storePath(source, "server.ssl.trust-store", tls["server.ssl.trust-store"], base, lines),
            password("server.ssl.trust-store-password"),
        )
    clientAuth = tls.get("server.ssl.client-auth", "none").strip().lower() or "none"
    if clientAuth not in CLIENT_AUTH:
        raise ConfigError(
            source, "server.ssl.client-auth", f"must be need, want or none, not {clientAuth!r}",
            lines["server.ssl.client-auth"],
        )
    if flag("server.ssl.enabled", False):
        if keyStore is None:
            raise ConfigError(source, "server.ssl.enabled", "needs server.ssl.key-store", lines["server.ssl.enabled"])
        if clientAuth != "none" and trustStore is None:
            raise ConfigError(
                source, "server.ssl.client-auth", "needs server.ssl.trust-store", lines["server.ssl.client-auth"]
            )
        forward = replace(
            forward,
            tls=ServerTLSSettings(keyStore, trustStore if clientAuth != "none" else None, clientAuth),
        )
    profile = upstream.tls
    if trustStore is not None:
        profile = replace(profile, trust_store=trustStore)
    if flag("proxy.ssl.client.enabled", False):
        if keyStore is None:
            raise ConfigError(
                source, "proxy.ssl.client.enabled", "needs server.ssl.key-store (the client certificate)",
                lines["proxy.ssl.client.enabled"],
            )
        profile = replace(profile, key_store=keyStore)
    if not flag("proxy.ssl.client.validateCertificate", True):
        profile = replace(profile, verify=False)
        notices.append(
            f"{source}:{lines['proxy.ssl.client.validateCertificate']}: proxy.ssl.client.validateCertificate=false:"
            " origin certificates are NOT verified (the client certificate is still sent)"
        )
    if "proxy.ssl.client.tls-version" in tls:
        key = "proxy.ssl.client.tls-version"
        asked = [v.strip() for v in tls[key].split(",") if v.strip()]
        versions = [v for v in TLS_VERSIONS if v in asked]
        if not versions:
            raise ConfigError(source, key, f"needs TLSv1.2 or TLSv1.3, not {tls[key]!r}", lines[key])
        dropped = [v for v in asked if v not in TLS_VERSIONS]
        if dropped:
            notices.append(f"{source}:{lines[key]}: {key}: {', '.join(dropped)} not offered (too weak)")
        profile = replace(profile, min_version=versions[0], max_version=versions[-1])
    upstream = replace(upstream, tls=profile)
    return forward, upstream, _locations(forward, upstream, lines)


def _locations(
    forward: ForwardSettings, upstream: UpstreamSettings, lines: dict[str, int]
) -> tuple[tuple[str, str, int | None], ...]:
    """
    The keys that name the material of C{forward} and C{upstream} (see
    L{Settings.locations}).  Each store has its own entry, so that
    L{mydataproxy.material} loads it on its own and a failure names the key
    of the store that failed, not the other one; what fails in building a
    whole context is the key store's.
    """
    found: list[tuple[str, str, int | None]] = []
    keyStore = ("server.ssl.key-store", lines.get("server.ssl.key-store"))
    trustStore = ("server.ssl.trust-store", lines.get("server.ssl.trust-store"))
    if upstream.tls != UpstreamSettings().tls:
        found.append(("upstream.tls", *keyStore))
    for prefix, holder in (("upstream.tls", upstream.tls), ("forward.tls", forward.tls)):
        if holder is not None and holder.key_store is not None:
            found.append((f"{prefix}.key_store", *keyStore))
        if holder is not None and holder.trust_store is not None:
            found.append((f"{prefix}.trust_store", *trustStore))
    if forward.tls is not None:
        found.append(("forward.tls", *keyStore))
    return tuple(found)


def _checkEndpoint(source: str, description: str, lines: dict[str, int]) -> None:
    """Defence in depth: the assembled listener must parse as Twisted's would."""
    try:
        parseListen(description)
    except ValueError as e:
        key = "server.address" if "server.address" in lines else "server.port"
        raise ConfigError(
            source, key, f"gives an invalid listener {description!r}: {e}", lines[key]
        ) from None


def _openProxyNotice(source: str, forward: ForwardSettings, lines: dict[str, int]) -> str:
    """The loud warning for a listener anyone who reaches it may use."""
    if "server.address" in lines:
        where, bound = lines["server.address"], "server.address is not a loopback address"
    else:
        # Like the Java product: every interface (server.port is set, or the
        # listener would be the loopback default).
        where, bound = lines["server.port"], "server.address is not set, so every interface is listened on"
    return (
        f"{source}:{where}: OPEN PROXY: {bound} ({forward.listen}), proxy.ip.allow admits every client"
        " and no client certificate is required: anyone who can reach the port can use this proxy;"
        " set proxy.ip.allow or server.address"
    )
