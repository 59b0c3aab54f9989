"""
Where a forward-proxy request goes: the three request forms, parsed into a
L{Target} or refused with a L{Refusal} (status and short reason).

  - absolute-form  C{GET http://host:port/path?q HTTP/1.1}  (RFC 9112 3.2.2)
  - header-routed  C{GET /path?q} with C{x-target-host: https://host[:port][/base]},
    the Java product's mode: target = header value + raw path + raw query
  - authority-form C{CONNECT host:port}                       (RFC 9112 3.2.3)
"""

from __future__ import annotations

import enum
import re
from typing import Sequence
from dataclasses import dataclass, field

from mydataproxy.http.hosts import normaliseHost

@dataclass(frozen=True, slots=True)
class Destination:
    """
    Where a request goes: the pool key.

    @ivar addresses: The resolved addresses the policy allowed; connections
        are made to these and nothing else.
    @ivar rule: The rule that allowed it, for the access log (not part of
        the pool key).
    """

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()
    rule: str = field(default="", compare=False)
    #: The C{Host} field value for this destination (worked out once).
    authority: bytes = field(init=False, compare=False, repr=False)
    #: C{scheme://authority}, as logs show it.
    origin: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        if self.port != default:
            host = f"{host}:{self.port}"
        authority = host.encode("idna") if not host.isascii() else host.encode("ascii")
        # Frozen: the derived fields are set the way dataclasses set fields.
        object.__setattr__(self, "authority", authority)
        object.__setattr__(self, "origin", f"{self.scheme}://{authority.decode('ascii')}")

    def __str__(self) -> str:
        return self.origin


MISSING_TARGET_HOST = "you have to include x-target-host header"

# RFC 3986 3.3: a path is pchar and "/"; pchar is unreserved, pct-encoded,
# sub-delims, ":" and "@".  Nothing else may reach an origin's request line.
PATH = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


class Mode(enum.Enum):
    ABSOLUTE = "absolute"
    HEADER = "header"
    CONNECT = "connect"


class Refusal(Exception):
    """
    A request the proxy answers itself, with C{status} and C{reason}; C{rule}
    names the setting that decided it, for the log; C{fields} are extra
    response fields (C{Retry-After}, C{Proxy-Authenticate}).
    """

    def __init__(
        self, status: int, reason: str, rule: str = "", fields: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.rule = rule
        self.fields = list(fields)


@dataclass(frozen=True, slots=True)
class Target:
    """
    A parsed request target.

    @ivar path: The origin-form request target to send (raw path and query),
        or C{b""} for CONNECT.
    """

    mode: Mode
    destination: Destination
    path: bytes

    @property
    def display(self) -> str:
        """How the access log shows this target."""
        if self.mode is Mode.CONNECT:
            host = self.destination.host
            return f"[{host}]:{self.destination.port}" if ":" in host else f"{host}:{self.destination.port}"
        return self.destination.origin + self.path.decode("ascii", "replace")


def parseAuthority(authority: bytes, defaultPort: int | None, userinfo: bool = False) -> tuple[str, int]:
    """
    Split C{[userinfo@]host[:port]} into the normalised host and the port.

    @param defaultPort: Used when no port is given; L{None} makes the port
        mandatory.
    @param userinfo: Whether a userinfo part may be present; it is dropped.
    @raise Refusal: 400 if malformed.
    """
    if b"@" in authority:
        if not userinfo:
            raise Refusal(400, "userinfo is not allowed in the request target")
        authority = authority.rpartition(b"@")[2]
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            raise Refusal(400, "unterminated IPv6 literal")
        hostBytes, rest = authority[: end + 1], authority[end + 1 :]
        if b":" not in hostBytes:
            raise Refusal(400, "invalid IPv6 literal")
        if rest and not rest.startswith(b":"):
            raise Refusal(400, "malformed authority")
        portBytes = rest[1:] if rest else None
    else:
        hostBytes, colon, portBytes = authority.partition(b":")
        if not colon:
            portBytes = None
        if b"[" in hostBytes or b"]" in hostBytes:
            raise Refusal(400, "malformed authority")
    try:
        host = normaliseHost(hostBytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Refusal(400, f"invalid host: {e}") from None
    if portBytes is None or portBytes == b"":
        if defaultPort is None:
            raise Refusal(400, "a port is required")
        return host, defaultPort
    if not portBytes.isdigit() or len(portBytes) > 5 or not 0 < int(portBytes) < 65536:
        raise Refusal(400, "invalid port")
    return host, int(portBytes)


# The same few origins are asked for over and over: each authority is parsed
# (and its host normalised) once, and the same Destination, with its
# authority worked out, serves every request to it.  Bounded: a flood of
# distinct names only empties it.
MAX_CACHED_DESTINATIONS = 4096
_DESTINATIONS: dict[tuple[bytes, bytes], Destination] = {}


def parseURL(url: bytes) -> tuple[Destination, bytes]:
    """
    Split an absolute C{http(s)://} URL into its destination and the rest
    (path and query, raw).

    @raise Refusal: 400 if malformed or not http/https.
    """
    scheme, sep, rest = url.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"https"):
        raise Refusal(400, "only http:// and https:// targets are supported")
    cut = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if 0 <= index < cut:
            cut = index
    authority, remainder = rest[:cut], rest[cut:]
    if b"#" in remainder:
        raise Refusal(400, "a fragment is not allowed in the request target")
    key = (scheme, authority)
    destination = _DESTINATIONS.get(key)
    if destination is None:
        host, port = parseAuthority(authority, 443 if scheme == b"https" else 80, userinfo=True)
        destination = Destination(scheme.decode("ascii"), host, port)
        # Credentials in a userinfo part are never kept.
        if b"@" not in authority:
            if len(_DESTINATIONS) >= MAX_CACHED_DESTINATIONS:
                _DESTINATIONS.clear()
            _DESTINATIONS[key] = destination
    return destination, remainder


def parseTarget(method: bytes, uri: bytes, targetHosts: list[bytes] | None) -> Target:
    """
    Decide where a request goes.

    @param targetHosts: The values of the request's C{x-target-host} fields
        (L{None} if absent).
    @raise Refusal: 400 for malformed targets, 403 for an origin-form request
        without C{x-target-host}.
    """
    if method == b"CONNECT":
        host, port = parseAuthority(uri, None)
        return Target(Mode.CONNECT, Destination("tcp", host, port), b"")
    if b"#" in uri:
        raise Refusal(400, "a fragment is not allowed in the request target")
    if uri[:1] == b"/":
        if not targetHosts:
            raise Refusal(403, MISSING_TARGET_HOST)
        if len(targetHosts) > 1:
            raise Refusal(400, "more than one x-target-host header")
        destination, base = parseURL(targetHosts[0].strip())
        if b"?" in base or b"#" in base:
            raise Refusal(400, "x-target-host must not carry a query or fragment")
        if PATH.fullmatch(base) is None:
            raise Refusal(400, "x-target-host base path has characters a path may not carry")
        if base.endswith(b"/"):
            base = base[:-1]
        return Target(Mode.HEADER, destination, base + uri)
    if b"://" in uri:
        destination, remainder = parseURL(uri)
        if not remainder.startswith(b"/"):
            remainder = b"/" + remainder
        return Target(Mode.ABSOLUTE, destination, remainder)
    raise Refusal(400, "unsupported request target form")
