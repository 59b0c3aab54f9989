"""
Property-based fuzzing (hypothesis) of what parses untrusted input: the
request-line and header-field checks (L{mydataproxy.http.framing}), the host
normaliser (L{mydataproxy.http.hosts}) and request-target parsing
(L{mydataproxy.http.target}).  No crash, no hang (each example has a deadline),
and only well-formed output.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mydataproxy.http.framing import VERSIONS, BodyDecoder, headerProblem, parseRequestHead, requestLineProblem
from mydataproxy.http.hosts import normaliseHost
from mydataproxy.egress.policy import guardedRange
from mydataproxy.http.target import Mode, Refusal, Target, parseTarget

FUZZ = settings(
    max_examples=600,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow],
)

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKEN = frozenset(TOKEN_CHARS)

# Bytes that matter to HTTP framing, plus everything else now and then.
INTERESTING_BYTES = b" \t\r\n\x00\x7f\x80\xff:/?#@[]%,;\"\\" + TOKEN_CHARS[:20]
http_bytes = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from(list(INTERESTING_BYTES)), max_size=60).map(bytes),
)
tokens = st.lists(st.sampled_from(list(TOKEN_CHARS)), min_size=1, max_size=12).map(bytes)
printable_targets = st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=60).map(bytes)


# ---------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------


@st.composite
def request_lines(draw) -> bytes:
    """Mostly almost-valid request lines, with mutations; sometimes noise."""
    if draw(st.integers(0, 4)) == 0:
        return draw(http_bytes)
    method = draw(st.one_of(tokens, st.sampled_from([b"GET", b"CONNECT", b"", b"G T", b"GE\x00T"])))
    target = draw(st.one_of(printable_targets, http_bytes, st.sampled_from([b"/", b"http://a/", b"a:1"])))
    version = draw(
        st.one_of(
            st.sampled_from(list(VERSIONS) + [b"HTTP/2.0", b"http/1.1", b"HTTP/1.1\r", b"HTTP/1.10", b""]),
            http_bytes,
        )
    )
    separators = draw(st.lists(st.sampled_from([b" ", b"  ", b"\t", b"", b" \r"]), min_size=2, max_size=2))
    return method + separators[0] + target + separators[1] + version + draw(st.sampled_from([b"", b" ", b"\r"]))


@FUZZ
@given(request_lines())
@example(b"GET / HTTP/1.1")
@example(b"GET  / HTTP/1.1")
@example(b"GET /\x00 HTTP/1.1")
@example(b"GET / HTTP/1.1 ")
@example(b"G\xc9T / HTTP/1.1")
def test_requestLineProblemAcceptsOnlyWellFormedLines(line: bytes) -> None:
    problem = requestLineProblem(line)
    assert problem is None or (isinstance(problem, str) and problem)
    if problem is None:
        parts = line.split(b" ")
        assert len(parts) == 3, line
        method, target, version = parts
        assert method and set(method) <= TOKEN, line
        assert target and all(0x21 <= c <= 0x7E for c in target), line
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), line


@FUZZ
@given(tokens, printable_targets, st.sampled_from(VERSIONS))
def test_requestLineProblemAcceptsEveryWellFormedLine(method: bytes, target: bytes, version: bytes) -> None:
    assert requestLineProblem(method + b" " + target + b" " + version) is None


@st.composite
def header_lines(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(http_bytes)
    name = draw(st.one_of(tokens, st.sampled_from([b"", b" Host", b"Host ", b"Ho\x00st", b"X\xffY"])))
    colon = draw(st.sampled_from([b":", b":", b"", b"::"]))
    value = draw(st.one_of(http_bytes, st.binary(max_size=40)))
    return name + colon + value


@FUZZ
@given(header_lines())
@example(b"Host: example.com")
@example(b"Host: a\r\nX-Injected: 1")
@example(b"X: a\x00b")
@example(b"X: \x7f")
@example(b"X:\ta\tb")
@example(b" X: folded")
@example(b"X : spaced")
def test_headerProblemAcceptsOnlyWellFormedFields(line: bytes) -> None:
    problem = headerProblem(line)
    assert problem is None or (isinstance(problem, str) and problem)
    if problem is None:
        name, colon, value = line.partition(b":")
        assert colon and name and set(name) <= TOKEN, line
        assert not any(c < 0x20 and c != 0x09 or c == 0x7F for c in value), line
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line


@FUZZ
@given(tokens, st.lists(st.one_of(st.integers(0x20, 0x7E), st.integers(0x80, 0xFF), st.just(9)), max_size=40).map(bytes))
def test_headerProblemAcceptsEveryWellFormedField(name: bytes, value: bytes) -> None:
    assert headerProblem(name + b":" + value) is None


framing_fields = st.lists(
    st.tuples(
        st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding", b"TRANSFER-ENCODING", b"X"]),
        st.one_of(st.sampled_from([b"5", b" 5 ", b"chunked", b"Chunked", b"gzip, chunked", b"identity", b"-1", b""]), st.binary(max_size=8)),
    ),
    max_size=6,
)


@FUZZ
@given(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), framing_fields)
def test_requestHeadNeverAcceptsAmbiguousFraming(version: bytes, fields) -> None:
    raw = b"\r\n".join([b"POST / " + version] + [name + b": " + value for name, value in fields])
    try:
        head = parseRequestHead(raw, 8192, 100)
    except Refusal as refusal:
        assert refusal.status in (400, 414, 431) and refusal.reason
        return
    lengths = [v.strip(b" \t") for n, v in fields if n.lower() == b"content-length"]
    codings = [v.strip(b" \t") for n, v in fields if n.lower() == b"transfer-encoding"]
    assert len(lengths) + len(codings) <= 1
    if lengths:
        assert lengths[0].isdigit() and head.contentLength == int(lengths[0]) and not head.chunked
    elif codings:
        assert version == b"HTTP/1.1" and codings[0].lower() == b"chunked" and head.chunked
        assert head.contentLength is None
    else:
        assert head.contentLength is None and not head.chunked


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def decodeInSplits(data: bytes, cuts: list[int], limit: int = 0) -> tuple[bytes, bytes]:
    """Feed C{data} to a chunked decoder in pieces cut at C{cuts}: (body, rest)."""
    decoder = BodyDecoder(None, True, limit)
    body, buffer, rest = [], b"", b""
    bounds = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    start = 0
    for end in bounds:
        if decoder.done:
            rest += data[start:end]
        else:
            buffer += data[start:end]
            pieces, used = decoder.feed(buffer)
            body.extend(pieces)
            buffer = buffer[used:]
            if decoder.done:
                rest, buffer = buffer, b""
        start = end
    assert decoder.done
    return b"".join(body), rest


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=8), st.lists(st.integers(0, 10_000), max_size=10), st.binary(max_size=20))
def test_chunkedDecoderIsSplitIndependent(pieces: list[bytes], cuts: list[int], after: bytes) -> None:
    body, rest = decodeInSplits(chunked(pieces) + after, cuts)
    assert body == b"".join(pieces)
    assert rest == after, "bytes after the body belong to the next request"


@FUZZ
@given(http_bytes)
def test_chunkedDecoderRefusesOrDecodesGarbage(data: bytes) -> None:
    decoder = BodyDecoder(None, True, 1000)
    try:
        pieces, used = decoder.feed(data)
    except Refusal as refusal:
        assert refusal.status in (400, 413, 431)
        return
    assert 0 <= used <= len(data)
    assert sum(map(len, pieces)) <= min(len(data), 1000)


@FUZZ
@given(st.integers(17, 40), st.sampled_from([b"0", b"f", b"1"]))
def test_chunkSizesOfMoreThan16DigitsAreRefused(digits: int, digit: bytes) -> None:
    decoder = BodyDecoder(None, True, 0)
    try:
        decoder.feed(digit * digits + b"\r\nx")
    except Refusal as refusal:
        assert refusal.status == 400
    else:
        raise AssertionError("an over-long chunk size was accepted")


# ---------------------------------------------------------------------------
# normaliseHost
# ---------------------------------------------------------------------------

HOST_ALPHABET = (
    "abcxyzABCXYZ0123456789789-_.:[]%@ "
    "\u3002\uff0e\uff61"  # ideographic / fullwidth / halfwidth full stops
    "\uff10\uff11\uff17\uff58"  # fullwidth digits 0 1 7 and x
    "\u00df\u00fc\u0130\u03c3\u0440\u200d\u00ad"  # sharp s, u-umlaut, dotted I, sigma, Cyrillic, ZWJ, soft hyphen
    "\U0001f600\x00\t"
)
host_texts = st.one_of(
    st.text(alphabet=HOST_ALPHABET, max_size=40),
    st.text(max_size=30),
    st.lists(
        st.one_of(
            st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,10}", fullmatch=True),
            st.from_regex(r"0[xX][0-9a-fA-F]{1,8}|0[0-7]{1,11}|[0-9]{1,10}", fullmatch=True),
            st.sampled_from(["bücher", "ＡＢＣ", "１２７", "xn--bcher-kva", "-a", "a-", ""]),
        ),
        min_size=1,
        max_size=5,
    ).map(".".join).flatmap(lambda h: st.sampled_from([h, h + ".", "[" + h + "]", h.upper()])),
    st.ip_addresses().map(str).flatmap(lambda a: st.sampled_from([a, a.upper(), f"[{a}]", f"[{a}].", a + "%eth0"])),
)


def is_host_canonical(host: str) -> None:
    assert host, "empty result"
    assert host.isascii(), host
    assert host == host.lower(), host
    assert not host.endswith("."), host
    assert not host.startswith("[") and "%" not in host, host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        assert len(host) <= 253 and all(host.split(".")), host
    else:
        assert str(address) == host, host
        assert not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped), host


@FUZZ
@given(host_texts)
@example("API.Bank.Test.")
@example("[::FFFF:127.0.0.1]")
@example("0x7f.1")
@example("a.\uff11")  # "a.１": IDNA maps the fullwidth digit after the numeric check
@example("127\u30021")  # "127。1": an ideographic full stop
def test_normaliseHostOutputIsCanonicalFixedPoint(host: str) -> None:
    try:
        result = normaliseHost(host)
    except ValueError:
        return
    is_host_canonical(result)
    try:
        again = normaliseHost(result)
    except ValueError as e:
        raise AssertionError(f"{host!r} normalised to {result!r}, which is itself refused: {e}") from None
    assert again == result, f"{host!r} -> {result!r} -> {again!r}"


@st.composite
def ipv4_notations(draw) -> tuple[ipaddress.IPv4Address, str]:
    """An IPv4 address and one of the spellings inet_aton accepts."""
    address = draw(st.ip_addresses(v=4))
    value = int(address)
    count = draw(st.integers(1, 4))
    octets = list(value.to_bytes(4, "big"))
    numbers = octets[: count - 1] + [int.from_bytes(bytes(octets[count - 1 :]), "big")]
    parts = []
    for number in numbers:
        style = draw(st.sampled_from(["dec", "oct", "hex", "HEX"]))
        if style == "dec":
            parts.append(str(number))
        elif style == "oct":
            parts.append("0" + format(number, "o") if number else "0" * draw(st.integers(1, 3)))
        elif style == "hex":
            parts.append("0x" + "0" * draw(st.integers(0, 2)) + format(number, "x"))
        else:
            parts.append("0X" + format(number, "X"))
    text = ".".join(parts)
    return address, draw(st.sampled_from([text, text + "."]))


@FUZZ
@given(ipv4_notations())
@example((ipaddress.IPv4Address("127.0.0.1"), "2130706433"))
@example((ipaddress.IPv4Address("127.0.0.1"), "0177.0.0.1"))
@example((ipaddress.IPv4Address("127.0.0.1"), "0x7f.1"))
@example((ipaddress.IPv4Address("169.254.169.254"), "0xa9fea9fe"))
@example((ipaddress.IPv4Address("169.254.169.254"), "169.254.43518"))
def test_everyIPv4NotationNormalisesToDottedQuad(case) -> None:
    address, text = case
    assert normaliseHost(text) == str(address), text
    assert guardedRange(ipaddress.ip_address(normaliseHost(text))) == guardedRange(address)


@FUZZ
@given(st.ip_addresses(v=6))
def test_ipv6LiteralsNormalise(address: ipaddress.IPv6Address) -> None:
    expected = str(address.ipv4_mapped or address)
    for text in (address.exploded, address.exploded.upper(), f"[{address}]", str(address)):
        assert normaliseHost(text) == expected, text


# ---------------------------------------------------------------------------
# parseTarget
# ---------------------------------------------------------------------------

authorities = st.one_of(
    st.binary(max_size=30),
    st.tuples(
        st.sampled_from([b"", b"user@", b"u:p@", b"@", b"a@b@"]),
        st.one_of(
            host_texts.map(lambda h: h.encode("utf-8", "surrogatepass")),
            st.sampled_from([b"[::1]", b"[::1", b"::1]", b"[a]", b"[]", b"127.1", b"\xff"]),
        ),
        st.sampled_from([b"", b":", b":80", b":0", b":65535", b":65536", b":99999", b":-1", b":\xd9\xa3", b":+80", b":8 0"]),
    ).map(b"".join),
)
urls = st.tuples(
    st.sampled_from([b"http://", b"https://", b"HTTP://", b"ftp://", b"http:/", b"", b"http://http://"]),
    authorities,
    st.sampled_from([b"", b"/", b"/a?b", b"?q", b"#f", b"/p#f", b"/%00", b"/\xff"]),
).map(b"".join)


@FUZZ
@given(
    st.sampled_from([b"GET", b"CONNECT", b"POST", b"OPTIONS", b"connect"]),
    st.one_of(urls, authorities, st.sampled_from([b"/", b"/x?y", b"*", b""]).map(lambda p: p), http_bytes),
    st.one_of(st.none(), st.lists(st.one_of(urls, http_bytes), max_size=2)),
)
@example(b"GET", b"http://API.Bank.Test.:8080/x", None)
@example(b"CONNECT", b"[::ffff:7f00:1]:443", None)
# x-target-host values may carry UTF-8 (obs-text): the host must still come out canonical.
@example(b"GET", b"/x", ["http://127\u30021:8080".encode()])
@example(b"GET", b"/x", ["http://0x7f.\uff10.\uff10.\uff11:8080".encode()])
def test_parseTargetRaisesOnlyRefusalAndReturnsSaneTargets(method: bytes, uri: bytes, targetHosts) -> None:
    try:
        target = parseTarget(method, uri, targetHosts)
    except Refusal as refusal:
        assert refusal.status in (400, 403), refusal.status
        assert isinstance(refusal.reason, str) and refusal.reason
        return
    assert isinstance(target, Target)
    destination = target.destination
    assert 0 < destination.port < 65536
    is_host_canonical(destination.host)
    assert normaliseHost(destination.host) == destination.host
    if target.mode is Mode.CONNECT:
        assert method == b"CONNECT" and target.path == b"" and destination.scheme == "tcp"
    else:
        assert destination.scheme in ("http", "https")
        assert target.path.startswith(b"/"), target.path
        assert b"#" not in target.path
    assert isinstance(target.display, str)
    assert destination.authority.isascii()
