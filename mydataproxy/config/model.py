"""
The settings model: frozen values describing everything the daemon needs.

Plain data.  Reading a config file into it is the loaders' business
(L{mydataproxy.config.toml}, L{mydataproxy.config.legacy}); reading the
material it names (key stores, the htpasswd file) is
L{mydataproxy.material}'s.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

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


TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
CLIENT_AUTH = ("none", "want", "need")
PRESETS = ("mydata",)


@dataclass(frozen=True)
class StoreRef:
    """
    A key or trust store in any format (JKS, JCEKS, PKCS#12, PEM).

    @ivar password: As configured: literal, C{env:NAME} or C{file:PATH};
        resolved whenever the store is (re)loaded.
    """

    path: str
    password: str = ""
    key_password: str = ""
    alias: str = ""


@dataclass(frozen=True)
class ServerTLSSettings:
    """TLS on a listener: our certificate, and how clients must prove theirs."""

    key_store: StoreRef
    trust_store: StoreRef | None = None
    client_auth: str = "none"
    min_version: str = "TLSv1.2"
    ciphers: str = ""


@dataclass(frozen=True)
class OriginTLSProfile:
    """
    How to speak TLS to origins: the default (C{upstream.tls}), or a profile
    for the destinations its C{hosts} patterns match.

    @ivar trust_store: L{None}: the system trust store.
    @ivar pins: SHA-256 certificate fingerprints (upper-case hex with
        colons); when given, the origin's certificate must be one of them.
    @ivar serial_number: When given, the origin certificate's subject
        serialNumber (the MyData business registration number) must match.
    """

    name: str = "upstream.tls"
    hosts: tuple[str, ...] = ()
    key_store: StoreRef | None = None
    trust_store: StoreRef | None = None
    verify: bool = True
    min_version: str = "TLSv1.2"
    max_version: str = "TLSv1.3"
    ciphers: str = ""
    pins: tuple[str, ...] = ()
    serial_number: str = ""


#: Ports absolute-form and header-routed requests may reach by default: the
#: HTTP and HTTPS ports and their usual alternatives.  Squid's Safe_ports
#: also has 1025-65535, which would open Redis (6379), Elasticsearch (9200)
#: and the like to cross-protocol requests.
DEFAULT_HTTP_PORTS: tuple[tuple[int, int], ...] = ((80, 80), (443, 443), (8080, 8080), (8443, 8443))


@dataclass(frozen=True)
class ForwardSettings:
    """
    The forward-proxy listener (absolute-form, x-target-host and CONNECT).

    @ivar http_ports: Ports absolute-form and header-routed requests may
        reach, as inclusive C{(low, high)} ranges, sorted and merged.
    @ivar header_filter: Lower-cased request field names never forwarded;
        never C{content-length}, C{transfer-encoding} or C{host}, which the
        proxy writes itself.
    """

    enabled: bool = True
    listen: str = "tcp:9000:interface=127.0.0.1"
    client_allow: tuple[IPNetwork, ...] = ()
    connect_ports: frozenset[int] = frozenset({443})
    http_ports: tuple[tuple[int, int], ...] = DEFAULT_HTTP_PORTS
    header_filter: frozenset[bytes] = frozenset({b"x-target-host"})
    client_idle_timeout: float = 60.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    auth_file: str = ""
    auth_realm: str = "MyData Proxy"
    tls: ServerTLSSettings | None = None


BALANCE = ("round_robin", "least_connections")


@dataclass(frozen=True)
class RouteBackend:
    """
    One backend of a reverse route, from its URL.

    @ivar path: The base path the route's prefix is replaced with (raw
        bytes, as configured).
    """

    scheme: str
    host: str
    port: int
    path: bytes

    @property
    def url(self) -> str:
        """The backend as configured, for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path.decode('ascii')}"


@dataclass(frozen=True)
class RouteSettings:
    """
    One C{[[reverse.routes]]} entry: requests whose path starts with
    C{prefix} (at a segment boundary), on one of C{hosts} if given, go to
    one of C{backends} with the prefix replaced by the backend's base path.

    Timeouts and the body limit default to C{upstream.*} and C{limits.*}.
    C{max_concurrent} (0: no cap) bounds the requests in flight; past it up
    to C{queue_size} wait, in arrival order, at most C{queue_timeout}
    seconds each.
    """

    name: str
    prefix: bytes
    backends: tuple[RouteBackend, ...]
    hosts: tuple[str, ...] = ()
    balance: str = "round_robin"
    preserve_host: bool = False
    websocket: bool = True
    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    max_body_bytes: int = 0
    max_concurrent: int = 0
    queue_size: int = 100
    queue_timeout: float = 10.0
    health_check: bytes = b""
    health_interval: float = 10.0
    eject_seconds: float = 10.0
    cookie_domain: bytes = b""


@dataclass(frozen=True)
class ReverseSettings:
    """
    The reverse listener: traffic an Apache httpd in front hands in, routed
    to internal backends.

    @ivar trusted_proxies: Peers (the front) whose C{X-Forwarded-*} and
        C{Forwarded} fields are believed.
    """

    listen: str = "tcp:8080:interface=127.0.0.1"
    client_allow: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    client_idle_timeout: float = 60.0
    tls: ServerTLSSettings | None = None
    routes: tuple[RouteSettings, ...] = ()


MODES = ("absolute", "header", "connect")
ACTIONS = ("allow", "deny")


@dataclass(frozen=True)
class EgressRule:
    """
    One destination rule.  Every condition given must hold for the rule to
    match; an empty condition matches anything.

    @ivar hosts: Normalised host names; C{*.suffix} matches names below
        C{suffix}.
    @ivar networks: Networks the resolved address must be in.
    """

    name: str
    action: str
    hosts: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()
    modes: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    client_certificates: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EgressSettings:
    """Where the forward proxy may connect: ordered rules, then C{default}."""

    rules: tuple[EgressRule, ...] = ()
    default: str = "allow"
    guard: bool = True


@dataclass(frozen=True)
class ResolverSettings:
    """
    Name resolution for origins (asynchronous DNS, never the thread pool).

    @ivar servers: (address, port) of DNS servers; empty means those of
        C{/etc/resolv.conf}.
    """

    servers: tuple[tuple[str, int], ...] = ()
    hosts_file: str = "/etc/hosts"
    timeout: float = 5.0
    max_ttl: float = 300.0


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on what one client may send or hold (0 means no limit)."""

    max_header_bytes: int = 16384
    max_headers: int = 100
    max_uri_bytes: int = 8192
    max_body_bytes: int = 0
    header_timeout: float = 10.0
    tunnel_idle_timeout: float = 300.0
    max_connections: int = 10000
    max_connections_per_client: int = 256
    requests_per_second: float = 0.0
    burst: int = 0


@dataclass(frozen=True)
class UpstreamSettings:
    """Outbound connections to origins: pool bounds and timeouts (seconds)."""

    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    pool_wait_timeout: float = 60.0
    idle_timeout: float = 30.0
    max_connections_per_destination: int = 200
    max_connections_total: int = 500
    queue_per_destination: int = 1000
    tls: OriginTLSProfile = field(default_factory=OriginTLSProfile)
    tls_profiles: tuple[OriginTLSProfile, ...] = ()


LOG_FORMATS = ("keyvalue", "combined", "json")
SYSLOG_FACILITIES = ("kern", "user", "daemon", "auth", *(f"local{n}" for n in range(8)))
LOG_TIMES = ("utc", "local")


@dataclass(frozen=True)
class LoggingSettings:
    """
    Where the logs go and how they are kept.

    @ivar directory: When set, the access and error logs are files there,
        named by C{access_name} and C{error_name} (C{{host}} is this host's
        name, so that instances sharing one EFS directory never write the
        same file); created at start if missing.
    @ivar access_log: The access log: a path, or C{"-"} for standard output;
        L{None} means C{directory}/C{access_name} with a directory, else
        C{"-"}.
    @ivar error_log: The daemon's own log, likewise; C{""} leaves it to
        twistd (its standard output, or C{--logfile}).
    @ivar max_size: Rotate a file past this many bytes (0: never by size).
    @ivar daily: Rotate at local midnight too.
    @ivar keep: Rotated files kept per log (0: all).
    @ivar max_age_days: Rotated files older than this are deleted (0: never).
    @ivar queue_lines: Lines held for a log that cannot keep up (a hung
        mount); beyond, lines are dropped and counted.
    @ivar levels: C{(component, level)}: a level of its own for a component
        (a module or package, C{mydataproxy.upstream}), the most specific
        winning; C{level} for the rest.
    @ivar syslog: The local syslog socket (C{/dev/log}) the daemon's events
        also go to, as RFC 5424 messages; C{""}: none.
    @ivar tamper_evident: Chain each access line to the previous one with a
        hash (see L{mydataproxy.ops.audit}).
    """

    access_log: str | None = None
    error_log: str | None = None
    directory: str = ""
    access_name: str = "access.{host}.log"
    error_name: str = "error.{host}.log"
    max_size: int = 100 * 1024 * 1024
    daily: bool = True
    keep: int = 30
    max_age_days: float = 30.0
    compress: bool = True
    format: str = "keyvalue"
    time: str = "utc"
    level: str = "info"
    levels: tuple[tuple[str, str], ...] = ()
    queue_lines: int = 65536
    tamper_evident: bool = False
    syslog: str = ""
    syslog_facility: str = "daemon"

    def accessPath(self, host: str) -> str:
        """The access log's path (or C{"-"}) on host C{host}."""
        if self.access_log is not None:
            return self.access_log
        if self.directory:
            return f"{self.directory}/{self.access_name.format(host=host)}"
        return STDOUT

    def errorPath(self, host: str) -> str:
        """The error log's path, C{"-"}, or C{""} (twistd's own) on host C{host}."""
        if self.error_log is not None:
            return self.error_log
        if self.directory:
            return f"{self.directory}/{self.error_name.format(host=host)}"
        return ""


@dataclass(frozen=True)
class DaemonSettings:
    """
    The process as a whole.

    @ivar shutdown_timeout: Seconds that requests and tunnels in flight get
        to finish after SIGTERM (a second SIGTERM or SIGINT cuts them at
        once).
    @ivar workers: Processes that serve the proxy listeners (C{"auto"} in
        the file: one per CPU); past one, a supervisor binds the listeners
        and runs them (L{mydataproxy.workers}).
    """

    shutdown_timeout: float = 30.0
    workers: int = 1


@dataclass(frozen=True)
class AdminSettings:
    """The admin listener: health, readiness and metrics (loopback by default)."""

    listen: str = "tcp:9100:interface=127.0.0.1"


@dataclass(frozen=True)
class Settings:
    """
    Everything the daemon needs to start.

    @ivar source: Where these settings came from (a path, or C{<embedded
        defaults>}).
    @ivar notices: Human-readable remarks about the source that the daemon
        logs at start and C{check-config} prints (e.g. legacy keys that are
        not honoured yet).
    @ivar locations: For the settings that name material (key stores, the
        htpasswd file) and that the source wrote, C{(setting, key, line)}:
        the setting in this model's dotted names (C{forward.auth_file},
        C{forward.tls}, C{forward.tls.key_store}, C{upstream.tls},
        C{upstream.tls.trust_store}, ...), the key the user wrote for it
        (C{server.ssl.key-store} in C{application.properties}) and its
        line.  Filled by the loaders, read by L{mydataproxy.material} to
        locate what fails to load; see L{locate}.
    """

    source: str = "<embedded defaults>"
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    reverse: ReverseSettings | None = None
    egress: EgressSettings = field(default_factory=EgressSettings)
    resolver: ResolverSettings = field(default_factory=ResolverSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    admin: AdminSettings | None = None
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    notices: tuple[str, ...] = ()
    locations: tuple[tuple[str, str, int | None], ...] = ()

    def locate(self, setting: str) -> tuple[str, int | None]:
        """
        The key the user wrote for C{setting} and its line: its own entry in
        L{locations}, else that of the nearest enclosing setting
        (C{upstream.tls.profiles[0].key_store} falls back to
        C{upstream.tls}), else C{setting} itself, with no line.
        """
        name = setting
        while True:
            for located, key, line in self.locations:
                if located == name:
                    return key, line
            if "." not in name:
                return setting, None
            name = name.rpartition(".")[0]


#: Severities a level may be given in (syslog's, ours and trace), and the
#: level each means to the logging system.
LOG_SEVERITIES = {
    "emerg": "critical", "alert": "critical", "crit": "critical", "critical": "critical",
    "err": "error", "error": "error", "warning": "warn", "warn": "warn",
    "notice": "info", "info": "info", "debug": "debug", "trace": "trace",
}
LOG_LEVELS = tuple(LOG_SEVERITIES)


#: Fields the proxy writes itself, from what it parsed (framing) and from the
#: target (Host): a filter that removed them would let a client's bytes be
#: read as another request.
PROXY_WRITTEN_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"host"})
