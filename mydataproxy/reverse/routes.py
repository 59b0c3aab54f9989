"""
The reverse listener's routes: which C{[[reverse.routes]]} entry a request
belongs to, and the backend request target it becomes.

ProxyPass semantics, byte-exact: the prefix is replaced by the backend's
base path and the rest of the raw target (path and query) is kept as it
came, never decoded or re-encoded.  A prefix matches at a segment boundary
(C{/api} matches C{/api}, C{/api/x} and C{/api?q}, not C{/apix}); the longest
matching prefix wins, and routes whose C{hosts} match the request's C{Host}
are asked before the routes for any host (virtual hosts).

Because the target is passed on undecoded, a path that could mean another
place once decoded is refused before any route is asked: dot segments
(also percent-encoded, and with encoded slashes or backslashes), empty
segments (C{//}), encoded NUL and control bytes.  So no spelling can climb
out of a prefix at the backend.

Pure functions and values: no I/O.
"""

from __future__ import annotations

import re
from typing import Sequence
from urllib.parse import unquote_to_bytes

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.http.hosts import hostMatches, normaliseHost
from mydataproxy.http.target import PATH, Refusal, parseAuthority

# RFC 3986 3.4: the query is pchar, "/" and "?".
_QUERY = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_ENCODED_CONTROL = re.compile(rb"%[01][0-9A-Fa-f]|%7[Ff]")


def checkTarget(target: bytes) -> None:
    """
    Refuse a request target the reverse side must not pass on.

    @raise Refusal: 400 for anything but an origin-form target of RFC 3986
        characters whose path, decoded, has no dot or empty segment and no
        control byte.
    """
    if not target.startswith(b"/"):
        raise Refusal(400, "bad request: the reverse proxy takes origin-form targets (/path) only")
    path, _, query = target.partition(b"?")
    if PATH.fullmatch(path) is None or _QUERY.fullmatch(query) is None or b"#" in target:
        raise Refusal(400, "bad request: invalid characters in the request target")
    if _ENCODED_CONTROL.search(path) or _ENCODED_CONTROL.search(query):
        raise Refusal(400, "bad request: encoded control character in the request target")
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    segments = decoded.split(b"/")[1:]
    # Servlet containers drop ";params" before resolving dot segments:
    # "..;" climbs there as ".." does.
    if any(segment.partition(b";")[0] in (b".", b"..") for segment in segments):
        raise Refusal(400, "bad request: dot segment in the path")
    if b"" in segments[:-1]:
        raise Refusal(400, "bad request: empty segment (//) in the path")


def requestHost(value: bytes | None) -> str | None:
    """
    The normalised host name of a C{Host} field value (port dropped), or
    L{None} when there is none.

    @raise Refusal: 400 if it is not a valid authority.
    """
    if value is None:
        return None
    try:
        host, _ = parseAuthority(value, 80)
        return normaliseHost(host)
    except (Refusal, ValueError):
        raise Refusal(400, "bad request: invalid Host") from None


def _matches(prefix: bytes, path: bytes) -> bool:
    if not path.startswith(prefix):
        return False
    return prefix.endswith(b"/") or len(path) == len(prefix) or path[len(prefix)] in b"/?"


class RouteTable:
    """The routes of one reverse listener, asked in the order that decides."""

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        longestFirst = sorted(routes, key=lambda route: len(route.prefix), reverse=True)
        self._virtual = [route for route in longestFirst if route.hosts]
        self._anyHost = [route for route in longestFirst if not route.hosts]

    def match(self, host: str | None, target: bytes) -> tuple[RouteSettings, bytes]:
        """
        The route for C{target} (checked by L{checkTarget}) on C{host}, and
        the rest of the target after its prefix.

        @raise Refusal: 404 when no route matches.
        """
        path = target.partition(b"?")[0]
        if host is not None:
            for route in self._virtual:
                if _matches(route.prefix, path) and hostMatches(route.hosts, host):
                    return route, target[len(route.prefix):]
        for route in self._anyHost:
            if _matches(route.prefix, path):
                return route, target[len(route.prefix):]
        where = f" on {host}" if host else ""
        shown = path[:200].decode("ascii", "replace")
        raise Refusal(404, f"no route for {shown}{where}", "reverse.routes")


def backendTarget(backend: RouteBackend, prefix: bytes, rest: bytes) -> bytes:
    """
    The request target to send to C{backend}: its base path, then C{rest}
    (what followed the route's C{prefix}).  The loader made a base path end
    in C{/} exactly when the prefix does.
    """
    if prefix.endswith(b"/"):
        return backend.path + rest
    joined = backend.path + rest
    return joined if joined.startswith(b"/") else b"/" + joined


def publicPath(backend: RouteBackend, prefix: bytes, path: bytes) -> bytes | None:
    """
    The inverse of L{backendTarget}: the public path for a backend's
    absolute C{path} (with any query), or L{None} if it is not under the
    backend's base path.
    """
    base = backend.path
    if not path.startswith(base):
        return None
    rest = path[len(base):]
    if not base.endswith(b"/") and rest and rest[:1] not in b"/?":
        return None
    public = prefix + rest
    return public if public.startswith(b"/") else b"/" + public
