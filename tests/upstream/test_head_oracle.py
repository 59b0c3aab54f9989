"""
The response head parser against the one it replaced (two regex passes:
validate the header section, then split it), kept here as the oracle: on
heads built from a grammar full of the bytes framing must refuse (bare CR
and LF, NUL and other controls, obs-fold, spaces and colons in names,
obs-text), the two accept the same heads with the same result and refuse
the same heads with the same message.
"""

from __future__ import annotations

import re
from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mydataproxy.upstream.client import InvalidResponse, parseResponseHead

_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
_FIELD_LINE = (
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*"
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?[ \t]*"
)
_FIELDS = re.compile(rb"(?:" + _FIELD_LINE + rb"\r\n)*")
_FIELD_PARTS = re.compile(rb"([^:]+):[ \t]*(.*?)[ \t]*\r\n", re.DOTALL)


def oracle(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """C{parseResponseHead} as it was before its single-pass rewrite."""
    status = _STATUS_LINE.match(head)
    if status is None:
        firstLine = head.split(b"\n", 1)[0]
        raise InvalidResponse(f"bad status line {firstLine[:80]!r}")
    code = int(status.group(2))
    if not 100 <= code <= 599:
        raise InvalidResponse(f"status code {code} out of range")
    start = status.end()
    if _FIELDS.fullmatch(head, start) is None:
        raise InvalidResponse("malformed header section")
    return (status.group(1), code, status.group(3) or b"", _FIELD_PARTS.findall(head, start))


def outcome(parse, head: bytes) -> tuple:
    try:
        return ("accepted", parse(head))
    except InvalidResponse as e:
        return ("refused", str(e))


NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b"\t", b" ", b":", b"\x7f", b"\x80", b"\xff", b"\x01", b"\x1f", b",", b"\r\r\n"]
TOKEN = [bytes([c]) for c in b"!#$%&'*+-.^_`|~09azAZ"]
VISIBLE = [bytes([c]) for c in b"az09\"(),/;=?@[]{}\x80\xff"]


def pieces(alphabet: list[bytes], minSize: int, maxSize: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=minSize, max_size=maxSize).map(b"".join)


def mostly(clean: st.SearchStrategy[bytes], odd: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """C{clean} nine times in ten, else C{odd}."""
    return st.integers(0, 9).flatmap(lambda n: odd if n == 0 else clean)


versions = mostly(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b""]))
codes = mostly(
    st.integers(100, 599).map(lambda n: b"%03d" % n),
    st.one_of(st.integers(0, 999).map(lambda n: b"%03d" % n), st.sampled_from([b"20", b"2000", b"2x0", b" 200", b""])),
)
reasons = st.one_of(st.none(), mostly(pieces(VISIBLE + TOKEN + [b" ", b"\t"], 0, 8), pieces(VISIBLE + NASTY, 1, 8)))
ends = mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r", b""]))
names = mostly(pieces(TOKEN, 1, 6), pieces(TOKEN + NASTY, 0, 6))
values = mostly(pieces(VISIBLE + TOKEN + [b" ", b"\t"], 0, 10), pieces(VISIBLE + NASTY, 1, 10))
ows = pieces([b" ", b"\t"], 0, 3)


@st.composite
def fieldLines(draw) -> bytes:
    if draw(st.integers(0, 19)) == 0:  # obs-fold: a continuation line
        return draw(st.sampled_from([b" ", b"\t"])) + draw(values) + draw(ends)
    colon = draw(mostly(st.just(b":"), st.sampled_from([b"", b" :", b"::"])))
    return draw(names) + colon + draw(ows) + draw(values) + draw(ows) + draw(ends)


@st.composite
def heads(draw) -> bytes:
    reason = draw(reasons)
    status = draw(versions) + b" " + draw(codes) + (b"" if reason is None else b" " + reason) + draw(ends)
    head = status + b"".join(draw(st.lists(fieldLines(), max_size=8)))
    # A nasty byte or two anywhere, the status line and line ends included.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(head)))
        head = head[:at] + draw(st.sampled_from(NASTY)) + head[at + draw(st.integers(0, 1)) :]
    return head


@settings(max_examples=1000, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(heads(), st.binary(max_size=64), st.binary(max_size=40).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b)))
@example(b"HTTP/1.1 200 OK\r\n")
@example(b"HTTP/1.1 200\r\nEmpty:\r\nSpaces: \t \r\n X: folded\r\n")
@example(b"HTTP/1.1 200 OK\r\nA: b\r\nX Y: z\r\nC: d\r\n")
@example(b"HTTP/1.1 200 OK\r\nA: b\r\nC: d")
def test_parseResponseHeadMatchesTheOracle(head: bytes) -> None:
    assert outcome(parseResponseHead, head) == outcome(oracle, head)


def test_theGrammarReachesEveryOutcome() -> None:
    """The strategy is not vacuous: it builds accepted heads and each kind of refusal."""
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(heads())
    def collect(head: bytes) -> None:
        kind, detail = outcome(oracle, head)
        seen.add("accepted" if kind == "accepted" else str(detail).split(" ")[0])

    collect()
    assert {"accepted", "bad", "status", "malformed"} <= seen
