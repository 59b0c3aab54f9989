"""
What the reverse side changes in the messages it relays.

Towards the backend: who the client is and how it reached us
(C{X-Forwarded-For}, C{-Host}, C{-Proto}, C{-Port} and RFC 7239
C{Forwarded}), believed from the front (Apache) only when its address is in
C{reverse.trusted_proxies}, else written from what we saw ourselves; any
such field from anyone else is dropped, never passed on.

Towards the client (ProxyPassReverse): C{Location}, C{Content-Location} and
C{URI} values that point at a backend of the route (an absolute URL, or an
absolute path under the backend's base path) are turned into the public
URL; C{Set-Cookie} C{Path} under the base path becomes the public prefix,
and a C{Domain} naming the backend becomes C{cookie_domain} (or is removed,
leaving a cookie for the public host only).

Pure functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.http.headers import HeaderList
from mydataproxy.http.hosts import normaliseHost
from mydataproxy.http.target import Refusal, parseAuthority
from mydataproxy.reverse.routes import publicPath

#: Request fields about the client's way in: only ours reach a backend.
FORWARDING_FIELDS = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"x-real-ip"}
)
_LOCATION_FIELDS = frozenset({b"location", b"content-location", b"uri"})
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]+")


@dataclass(frozen=True, slots=True)
class ClientSide:
    """
    How the client reached us, as we believe it.

    @ivar client: The client's address.
    @ivar host: The public host (and port, if any) it asked for.
    @ivar proto: C{http} or C{https}.
    @ivar port: The public port.
    """

    client: str
    host: bytes
    proto: bytes
    port: bytes

    @property
    def origin(self) -> bytes:
        """The public C{scheme://authority} that rewritten URLs start with."""
        return self.proto + b"://" + self.host


def _nearest(values: list[bytes] | None) -> bytes | None:
    """
    The last element of a front's field, stripped: the one the trusted
    front itself wrote (Apache appends to a client's X-Forwarded-Host).
    """
    if not values:
        return None
    return values[-1].rpartition(b",")[2].strip() or None


def clientSide(
    client: str,
    trusted: bool,
    host: bytes | None,
    forwardedHost: list[bytes] | None,
    forwardedProto: list[bytes] | None,
    forwardedPort: list[bytes] | None,
    ownProto: bytes,
    ownPort: int,
) -> ClientSide:
    """
    The L{ClientSide} of a request: the front's X-Forwarded-Host, -Proto and
    -Port values when it is C{trusted} (and they are well formed), else the
    request's own C{host} and our C{ownProto} and C{ownPort}.
    """
    publicHost = host or b""
    proto = ownProto
    port: bytes | None = None
    if trusted:
        frontHost = _nearest(forwardedHost)
        if frontHost is not None and _AUTHORITY.fullmatch(frontHost):
            publicHost = frontHost
        frontProto = _nearest(forwardedProto)
        if frontProto is not None and frontProto.lower() in (b"http", b"https"):
            proto = frontProto.lower()
        frontPort = _nearest(forwardedPort)
        if frontPort is not None and frontPort.isdigit() and len(frontPort) <= 5 and 0 < int(frontPort) < 65536:
            port = frontPort
        if port is None:
            try:
                _, hostPort = parseAuthority(publicHost, 443 if proto == b"https" else 80)
                port = b"%d" % hostPort
            except Refusal:
                port = None
    return ClientSide(client, publicHost, proto, port or b"%d" % ownPort)


def forwardingFields(side: ClientSide) -> HeaderList:
    """The fields that tell a backend about the client's way in."""
    client = side.client.encode("ascii")
    node = b'"[%s]"' % client if b":" in client else client
    forwarded = b"for=%s;proto=%s" % (node, side.proto)
    if side.host and b'"' not in side.host:
        forwarded += b';host="%s"' % side.host
    fields = [(b"X-Forwarded-For", client)]
    if side.host:
        fields.append((b"X-Forwarded-Host", side.host))
    fields += [(b"X-Forwarded-Proto", side.proto), (b"X-Forwarded-Port", side.port), (b"Forwarded", forwarded)]
    return fields


def _backendOf(route: RouteSettings, scheme: bytes, authority: bytes) -> RouteBackend | None:
    try:
        host, port = parseAuthority(authority, 443 if scheme == b"https" else 80)
        host = normaliseHost(host)
    except (Refusal, ValueError):
        return None
    for backend in route.backends:
        if backend.scheme.encode() == scheme and backend.host == host and backend.port == port:
            return backend
    return None


def publicURL(value: bytes, route: RouteSettings, side: ClientSide) -> bytes:
    """
    ProxyPassReverse for one C{Location}, C{Content-Location} or C{URI}
    value; anything that does not point at one of C{route}'s backends is
    returned unchanged.
    """
    if value.startswith(b"/") and not value.startswith(b"//"):
        for backend in route.backends:
            public = publicPath(backend, route.prefix, value)
            if public is not None:
                return public
        return value
    scheme, sep, rest = value.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"https"):
        return value
    cut = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if 0 <= index < cut:
            cut = index
    backend = _backendOf(route, scheme, rest[:cut])
    if backend is None:
        return value
    path = rest[cut:] or b"/"
    if path.startswith((b"?", b"#")):
        path = b"/" + path
    public = publicPath(backend, route.prefix, path)
    return value if public is None else side.origin + public


def _publicCookiePath(path: bytes, route: RouteSettings) -> bytes | None:
    """
    The public cookie path for a backend's, or L{None}: a path under a base
    path, or the base path without its slash (Tomcat's default
    C{Path=/context} for a base of C{/context/}).
    """
    for backend in route.backends:
        if backend.path.endswith(b"/") and path + b"/" == backend.path:
            return route.prefix.rstrip(b"/") or b"/"
        public = publicPath(backend, route.prefix, path)
        if public is not None:
            return public
    return None


def publicCookie(value: bytes, route: RouteSettings) -> bytes:
    """
    ProxyPassReverseCookiePath and ...CookieDomain for one C{Set-Cookie}
    value: attributes are rewritten in place, the rest kept byte for byte.
    """
    parts = value.split(b";")
    out = [parts[0]]
    hosts = {backend.host.encode("ascii", "replace") for backend in route.backends}
    for attribute in parts[1:]:
        name, eq, attributeValue = attribute.partition(b"=")
        key = name.strip().lower()
        if eq and key == b"path":
            public = _publicCookiePath(attributeValue.strip(), route)
            if public is not None:
                attribute = b" Path=" + public
        elif eq and key == b"domain" and attributeValue.strip().lstrip(b".").lower() in hosts:
            if not route.cookie_domain:
                continue
            attribute = b" Domain=" + route.cookie_domain
        out.append(attribute)
    return b";".join(out)


def publicResponseFields(fields: HeaderList, route: RouteSettings, side: ClientSide) -> HeaderList:
    """A backend's response fields with every backend reference made public."""
    out: HeaderList = []
    for name, value in fields:
        lower = name.lower()
        if lower in _LOCATION_FIELDS:
            value = publicURL(value, route, side)
        elif lower == b"set-cookie":
            value = publicCookie(value, route)
        out.append((name, value))
    return out
