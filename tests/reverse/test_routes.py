"""
Unit tests of L{mydataproxy.reverse.routes}: the target checks, the route
table (segment boundaries, longest prefix, virtual hosts) and the ProxyPass
mapping both ways (L{backendTarget}, L{publicPath}).  Pure functions, no I/O.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, strategies as st

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.http.target import Refusal
from mydataproxy.reverse.routes import RouteTable, backendTarget, checkTarget, publicPath, requestHost


def backend(path: bytes, host: str = "10.0.1.10", port: int = 8080, scheme: str = "http") -> RouteBackend:
    """A backend as the loader makes it from C{scheme://host:port<path>}."""
    return RouteBackend(scheme, host, port, path)


def route(prefix: bytes, *hosts: str, name: str | None = None, path: bytes | None = None) -> RouteSettings:
    """A route for C{prefix} (on C{hosts}, if any) to one backend, whose base path ends like the prefix."""
    if path is None:
        path = b"/" if prefix.endswith(b"/") else b""
    return RouteSettings(name or prefix.decode(), prefix, (backend(path),), hosts=tuple(hosts))


def refusal(target: bytes) -> Refusal:
    with pytest.raises(Refusal) as info:
        checkTarget(target)
    return info.value


# ---------------------------------------------------------------------------
# checkTarget
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/api/%2e%2e/x",
        b"/api/%2E%2E/x",
        b"/api/%2E./x",
        b"/api/.%2e/x",
        b"/api/%2e/x",
        b"/api/..",
        b"/api/.",
        b"/api/../x",
        b"/api/./x",
        b"/api/..%2fx",
        b"/api/..%2Fx",
        b"/api/..%5cx",
        b"/api/..%5Cx",
        b"/api/x%2f..%2fy",
        b"/api/x%5c..",
        b"/..",
        b"/../etc/passwd",
        b"/api/..?q=1",
    ],
)
def test_dotSegmentsAreRefusedInEverySpelling(target: bytes) -> None:
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: dot segment in the path")


@pytest.mark.parametrize(
    "target",
    [
        b"/api/..;/x",
        b"/api/..;jsessionid=1/x",
        b"/api/%2e%2e;/x",
        b"/api/.;x/y",
        b"/api/..;",
    ],
)
def test_dotSegmentsWithPathParametersAreRefused(target: bytes) -> None:
    """
    Tomcat and Jetty drop C{;params} from each segment before they resolve
    dot segments: C{/api/..;/x} is C{/x} there, out of the prefix.
    """
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: dot segment in the path")


@pytest.mark.parametrize(
    "target",
    [b"//", b"//api/x", b"/api//x", b"/api/x//", b"/api/%2f/x", b"/api/x%2F%2Fy", b"/api/%5c%5cx", b"/api/%2f", b"//?q"],
)
def test_emptySegmentsAreRefused(target: bytes) -> None:
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: empty segment (//) in the path")


@pytest.mark.parametrize(
    "target",
    [b"/api/%00", b"/api/a%00b", b"/api/%1f", b"/api/%1F", b"/api/%0a", b"/api/%0D%0A", b"/api/%7f", b"/api/%7F",
     b"/api/x?q=%00", b"/api/x?q=%1b", b"/api/x?q=%7f"],
)
def test_encodedControlBytesAreRefused(target: bytes) -> None:
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: encoded control character in the request target")


@pytest.mark.parametrize(
    "target",
    [b"/api/x#frag", b"/api/x?q#", b"/api/x#", b"/api/caf\xc3\xa9", b"/api/\xff", b"/api/a b", b"/api/a\tb",
     b"/api/a\\b", b"/api/a\"b", b"/api/<x>", b"/api/a|b", b"/api/a^b", b"/api/{x}", b"/api/%zz", b"/api/%2",
     b"/api/%", b"/api/x?q=caf\xc3\xa9", b"/api/x?q=a b", b"/api/x?q=\\"],
)
def test_nonRFC3986TargetsAreRefused(target: bytes) -> None:
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: invalid characters in the request target")


@pytest.mark.parametrize("target", [b"/api/x?q=%zz", b"/api/x?q=%", b"/api/x?q=%2", b"/api/x?q=%%30%30"])
def test_malformedPercentEncodingIsRefusedInTheQueryToo(target: bytes) -> None:
    """
    RFC 3986 2.1: C{%} is always followed by two hex digits, in the query as
    in the path; C{%%30%30} decoded once is C{%00}, which a backend that
    decodes again would read as NUL.
    """
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: invalid characters in the request target")


@pytest.mark.parametrize(
    "target",
    [b"http://10.0.1.10/api/x", b"https://public.example/api/", b"*", b"public.example:443", b"api/x", b"", b"?q"],
)
def test_nonOriginFormTargetsAreRefused(target: bytes) -> None:
    error = refusal(target)
    assert (error.status, error.reason) == (400, "bad request: the reverse proxy takes origin-form targets (/path) only")


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/api",
        b"/api/",
        b"/api/a%2Fb",
        b"/api/a%2fb/c",
        b"/api/a;p=1/b;q",
        b"/api/;jsessionid=ABC",
        b"/api/x/",
        b"/api/x?q=/?y",
        b"/api/x?a=1&b=%2F&c=?/",
        b"/api/x?",
        b"/api?q",
        b"/api/.well-known/x",
        b"/api/...",
        b"/api/..x",
        b"/api/x..",
        b"/api/%2e%2e%2e",
        b"/api/%20%7E~-._!$&'()*+,;=:@",
        b"/api/%C3%A9",
        b"/api/x?q=%C3%A9&r=%20",
    ],
)
def test_validTargetsPass(target: bytes) -> None:
    checkTarget(target)


# ---------------------------------------------------------------------------
# requestHost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, host",
    [
        (None, None),
        (b"www.example.com", "www.example.com"),
        (b"www.example.com:8443", "www.example.com"),
        (b"WWW.Example.COM.", "www.example.com"),
        (b"[::1]:8080", "::1"),
        (b"127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_requestHostIsNormalisedWithoutItsPort(value: bytes | None, host: str | None) -> None:
    assert requestHost(value) == host


@pytest.mark.parametrize("value", [b"a b", b"a\"b", b"[::1", b"host:port:1", b"user@host", b"[nothex]"])
def test_invalidHostIs400(value: bytes) -> None:
    with pytest.raises(Refusal) as info:
        requestHost(value)
    assert (info.value.status, info.value.reason) == (400, "bad request: invalid Host")


# ---------------------------------------------------------------------------
# RouteTable.match
# ---------------------------------------------------------------------------


def matched(table: RouteTable, host: str | None, target: bytes) -> tuple[str, bytes]:
    found, rest = table.match(host, target)
    return found.name, rest


@pytest.mark.parametrize(
    "target, rest",
    [(b"/api", b""), (b"/api/", b"/"), (b"/api/x/y", b"/x/y"), (b"/api?q=1", b"?q=1"), (b"/api/?q", b"/?q")],
)
def test_prefixWithoutSlashMatchesAtASegmentBoundary(target: bytes, rest: bytes) -> None:
    table = RouteTable([route(b"/api")])
    assert matched(table, None, target) == ("/api", rest)


@pytest.mark.parametrize("target", [b"/apix", b"/apix/y", b"/api.v2", b"/api%2F", b"/ap", b"/", b"/API"])
def test_prefixDoesNotMatchInsideASegment(target: bytes) -> None:
    table = RouteTable([route(b"/api")])
    with pytest.raises(Refusal) as info:
        table.match(None, target)
    assert info.value.status == 404


def test_prefixWithSlashNeedsTheSlash() -> None:
    table = RouteTable([route(b"/api/")])
    assert matched(table, None, b"/api/x?q") == ("/api/", b"x?q")
    assert matched(table, None, b"/api/") == ("/api/", b"")
    for target in (b"/api", b"/api?q", b"/apix/"):
        with pytest.raises(Refusal):
            table.match(None, target)


def test_longestPrefixWins() -> None:
    table = RouteTable([route(b"/", name="root"), route(b"/api/", name="api"), route(b"/api/v2/", name="v2")])
    assert matched(table, None, b"/api/v2/x") == ("v2", b"x")
    assert matched(table, None, b"/api/v2") == ("api", b"v2")
    assert matched(table, None, b"/api/v3/x") == ("api", b"v3/x")
    assert matched(table, None, b"/other") == ("root", b"other")
    assert matched(table, None, b"/") == ("root", b"")


def test_longestPrefixWinsWhateverTheOrderOfTheConfig() -> None:
    table = RouteTable([route(b"/api/v2/", name="v2"), route(b"/", name="root"), route(b"/api/", name="api")])
    assert matched(table, None, b"/api/v2/x") == ("v2", b"x")
    assert matched(table, None, b"/api/x") == ("api", b"x")


def test_queryDoesNotTakePartInMatching() -> None:
    table = RouteTable([route(b"/api/", name="api"), route(b"/", name="root")])
    assert matched(table, None, b"/x?next=/api/y") == ("root", b"x?next=/api/y")


def test_virtualHostRoutesComeBeforeAnyHostRoutes() -> None:
    table = RouteTable(
        [route(b"/api/v2/", name="any v2"), route(b"/", "www.example.com", name="www"), route(b"/api/", name="any api")]
    )
    assert matched(table, "www.example.com", b"/api/v2/x") == ("www", b"api/v2/x")
    assert matched(table, "other.example.com", b"/api/v2/x") == ("any v2", b"x")
    assert matched(table, None, b"/api/x") == ("any api", b"x")


def test_longestPrefixWinsAmongVirtualHostRoutes() -> None:
    table = RouteTable([route(b"/", "www.example.com", name="www"), route(b"/app/", "www.example.com", name="app")])
    assert matched(table, "www.example.com", b"/app/x") == ("app", b"x")
    assert matched(table, "www.example.com", b"/x") == ("www", b"x")


def test_virtualHostRouteFallsBackToAnyHostWhenItsPrefixDoesNotMatch() -> None:
    table = RouteTable([route(b"/app/", "www.example.com", name="app"), route(b"/", name="root")])
    assert matched(table, "www.example.com", b"/other") == ("root", b"other")


@pytest.mark.parametrize(
    "host, name",
    [
        ("a.example.org", "wild"),
        ("a.b.example.org", "wild"),
        ("example.org", "root"),
        ("badexample.org", "root"),
        ("a.example.org.evil", "root"),
        ("www.example.com", "www"),
        ("x.www.example.com", "root"),
    ],
)
def test_hostPatterns(host: str, name: str) -> None:
    table = RouteTable(
        [route(b"/", "*.example.org", name="wild"), route(b"/", "www.example.com", name="www"), route(b"/", name="root")]
    )
    assert matched(table, host, b"/x")[0] == name


def test_hostWithPortMatchesItsVirtualHost() -> None:
    table = RouteTable([route(b"/", "www.example.com", name="www"), route(b"/", name="root")])
    assert matched(table, requestHost(b"WWW.example.com:8443"), b"/x") == ("www", b"x")


def test_noHostSkipsVirtualHostRoutes() -> None:
    table = RouteTable([route(b"/", "www.example.com", name="www")])
    with pytest.raises(Refusal) as info:
        table.match(None, b"/x")
    assert (info.value.status, info.value.reason, info.value.rule) == (404, "no route for /x", "reverse.routes")


def test_404NamesThePathAndTheHostButNotTheQuery() -> None:
    table = RouteTable([route(b"/api/")])
    with pytest.raises(Refusal) as info:
        table.match("www.example.com", b"/nope/x?secret=1")
    error = info.value
    assert (error.status, error.reason, error.rule) == (404, "no route for /nope/x on www.example.com", "reverse.routes")


def test_404ReasonIsBounded() -> None:
    table = RouteTable([route(b"/api/")])
    with pytest.raises(Refusal) as info:
        table.match(None, b"/" + b"a" * 5000)
    assert info.value.reason == "no route for /" + "a" * 199


def test_emptyTableIs404() -> None:
    with pytest.raises(Refusal) as info:
        RouteTable([]).match("h", b"/")
    assert info.value.status == 404


# ---------------------------------------------------------------------------
# backendTarget and publicPath
# ---------------------------------------------------------------------------

# (prefix, base path, rest after the prefix, backend target)
MAPPINGS = [
    (b"/api/", b"/base/", b"x?q=1", b"/base/x?q=1"),
    (b"/api/", b"/base/", b"", b"/base/"),
    (b"/api/", b"/base/", b"a/b/", b"/base/a/b/"),
    (b"/api/", b"/", b"x?q=1", b"/x?q=1"),
    (b"/api/", b"/", b"", b"/"),
    (b"/api", b"/base", b"", b"/base"),
    (b"/api", b"/base", b"/x?q=1", b"/base/x?q=1"),
    (b"/api", b"/base", b"?q=1", b"/base?q=1"),
    (b"/api", b"/base", b"/", b"/base/"),
    (b"/api", b"", b"/x?q=1", b"/x?q=1"),
    (b"/api", b"", b"/", b"/"),
    (b"/api", b"", b"", b"/"),
    (b"/api", b"", b"?q=1", b"/?q=1"),
    (b"/", b"/base/", b"x", b"/base/x"),
    (b"/", b"/base/", b"", b"/base/"),
    (b"/", b"/", b"x?q", b"/x?q"),
    (b"/", b"/", b"", b"/"),
    (b"/a/b/", b"/c/d/", b"e%2Ff;g?h=/i", b"/c/d/e%2Ff;g?h=/i"),
]


@pytest.mark.parametrize("prefix, base, rest, target", MAPPINGS)
def test_backendTarget(prefix: bytes, base: bytes, rest: bytes, target: bytes) -> None:
    assert backendTarget(backend(base), prefix, rest) == target


def test_backendTargetComesFromTheMatchedRest() -> None:
    """The whole way: a public target, its route, the backend's target."""
    api = route(b"/api/", path=b"/gateway/")
    table = RouteTable([api])
    found, rest = table.match(None, b"/api/accounts?x=1&y=%2F")
    assert backendTarget(found.backends[0], found.prefix, rest) == b"/gateway/accounts?x=1&y=%2F"


# (prefix, base path, backend path, public path or None)
REVERSE_MAPPINGS = [
    (b"/api/", b"/base/", b"/base/x?q=1", b"/api/x?q=1"),
    (b"/api/", b"/base/", b"/base/", b"/api/"),
    (b"/api/", b"/base/", b"/base/?q", b"/api/?q"),
    (b"/api/", b"/base/", b"/basex/y", None),
    (b"/api/", b"/base/", b"/other/x", None),
    (b"/api/", b"/base/", b"/", None),
    (b"/api/", b"/", b"/x", b"/api/x"),
    (b"/api/", b"/", b"/", b"/api/"),
    (b"/api", b"/base", b"/base", b"/api"),
    (b"/api", b"/base", b"/base/x", b"/api/x"),
    (b"/api", b"/base", b"/base?q", b"/api?q"),
    (b"/api", b"/base", b"/basex", None),
    (b"/api", b"/base", b"/other", None),
    (b"/api", b"", b"/x?q", b"/api/x?q"),
    (b"/api", b"", b"/", b"/api/"),
    (b"/", b"/base/", b"/base/x", b"/x"),
    (b"/", b"/base/", b"/base/", b"/"),
    (b"/", b"/base/", b"/elsewhere", None),
    (b"/", b"/", b"/x?q", b"/x?q"),
]


@pytest.mark.parametrize("prefix, base, path, public", REVERSE_MAPPINGS)
def test_publicPath(prefix: bytes, base: bytes, path: bytes, public: bytes | None) -> None:
    assert publicPath(backend(base), prefix, path) == public


_PCHAR = st.sampled_from([*"abcXYZ019-._~!$&'()*+,;=:@", "%2F", "%2f", "%20", "%C3%A9", "%25", "%3F"])
_SEGMENT = st.lists(_PCHAR, min_size=1, max_size=6).map("".join)
_QUERY = st.lists(st.sampled_from([*"abc019-._~!$&'()*+,;=:@/?", "%2F", "%41"]), max_size=8).map("".join)


def passes(target: bytes) -> bool:
    """Does L{checkTarget} let C{target} through?"""
    try:
        checkTarget(target)
    except Refusal:
        return False
    return True


@st.composite
def _rests(draw, prefix: bytes) -> bytes:
    """What may follow C{prefix} in a target that L{checkTarget} passes."""
    segments = draw(st.lists(_SEGMENT, max_size=4))
    path = "/".join(segments)
    if draw(st.booleans()) and segments:
        path += "/"
    if not prefix.endswith(b"/") and path:
        path = "/" + path
    if draw(st.booleans()):
        path += "?" + draw(_QUERY)
    rest = path.encode("ascii")
    assume(passes(prefix + rest))
    return rest


_PREFIX_BASES = st.sampled_from(
    [(b"/api/", b"/base/"), (b"/api/", b"/"), (b"/", b"/"), (b"/", b"/base/"), (b"/api", b"/base"), (b"/a/b", b"/c/d")]
)


@given(data=st.data())
def test_publicPathUndoesBackendTarget(data: st.DataObject) -> None:
    prefix, base = data.draw(_PREFIX_BASES)
    rest = data.draw(_rests(prefix))
    target = backendTarget(backend(base), prefix, rest)
    checkTarget(target)
    assert publicPath(backend(base), prefix, target) == prefix + rest


@given(rest=_rests(b"/api").filter(lambda r: r.startswith(b"/")))
def test_publicPathUndoesBackendTargetForAnEmptyBase(rest: bytes) -> None:
    assert publicPath(backend(b""), b"/api", backendTarget(backend(b""), b"/api", rest)) == b"/api" + rest


@pytest.mark.parametrize("rest, public", [(b"", b"/api/"), (b"?q=1", b"/api/?q=1")])
def test_anEmptyBaseMakesPrefixAndPrefixSlashOne(rest: bytes, public: bytes) -> None:
    """
    With an empty base path C{/api} and C{/api/} both reach the backend as
    C{/}: going back, C{/} is C{/api/} (as Apache's ProxyPassReverse does).
    """
    target = backendTarget(backend(b""), b"/api", rest)
    assert target == b"/" + rest
    assert publicPath(backend(b""), b"/api", target) == public
