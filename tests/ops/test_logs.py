"""Unit tests of the access log writer: order, hand-over, drops, escaping, failures, stop."""

from __future__ import annotations

import datetime
import json
import os
import queue
import re
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from conftest import parse_access_line
from mydataproxy.config import LoggingSettings
from mydataproxy.ops import logs


def record(log: logs.AccessLog, target: str = "http://h/x") -> None:
    log.record(
        client="127.0.0.1:5555", method="GET", target=target, status=200,
        bytesIn=1, bytesOut=2, seconds=0.0015, upstream="10.0.0.1:80",
    )


def test_linesReachTheFileInOrderWithTheirFields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), Clock())
    log.start()
    record(log, "http://h/one")
    record(log, "http://h/two words")
    log.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert "client=127.0.0.1:5555 method=GET target=http://h/one status=200 in=1 out=2 ms=1.5 upstream=10.0.0.1:80" in lines[0]
    assert 'target="http://h/two words"' in lines[1]


def test_aFullQueueDropsAndCountsInsteadOfBlocking(tmp_path: Path) -> None:
    # The writer is not started: nothing drains the one line the queue holds.
    log = logs.AccessLog(str(tmp_path / "access.log"), Clock(), LoggingSettings(queue_lines=1))
    record(log)
    log.flush()
    assert log.dropped == 0
    record(log)
    record(log)
    log.flush()
    assert log.dropped == 2


def test_queueLinesCountsLinesNotBatches(tmp_path: Path) -> None:
    """A quiet proxy hands over small batches: they must not fill logging.queue_lines sooner."""
    log = logs.AccessLog(str(tmp_path / "access.log"), Clock(), LoggingSettings(queue_lines=512))
    for _ in range(50):  # writer not started: nothing drains; 500 lines in batches of 10
        for _ in range(10):
            record(log)
        log.flush()
    assert log.dropped == 0, f"{log.dropped} of 500 lines dropped with queue_lines = 512"
    for _ in range(3):
        for _ in range(10):
            record(log)
        log.flush()
    assert 0 < log.dropped <= 30


def test_gatheredLinesAreHandedOverOnTheClock(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = Clock()
    log = logs.AccessLog(str(path), clock)
    log.start()
    record(log)
    clock.advance(logs.FLUSH_SECONDS)
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    written = path.read_text()
    log.stop()
    assert len(written.splitlines()) == 1, "the periodic flush did not hand the line over"


class ThreadedClock(Clock):
    """A clock that queues C{callFromThread} calls for the test to run, noting the calling thread."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.fromThreads.put((threading.current_thread().name, f, args, kwargs))

    def runFromThreads(self, timeout: float = 5.0) -> list[str]:
        """Run the calls handed over so far (waiting up to C{timeout} for the first); their threads."""
        threads = []
        try:
            item = self.fromThreads.get(timeout=timeout)
            while True:
                name, f, args, kwargs = item
                threads.append(name)
                f(*args, **kwargs)
                item = self.fromThreads.get_nowait()
        except queue.Empty:
            return threads


@pytest.fixture
def events():
    """twisted.logger events as (thread name, formatted text)."""
    seen: list[tuple[str, str]] = []

    def observer(event) -> None:
        seen.append((threading.current_thread().name, formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("value", [
    "http://h/x\n2026-01-01T00:00:00.000Z client=1.2.3.4:1 method=GET target=/forged status=200",
    "http://h/x\r\nstatus=200",
    'http://h/"quoted" status=999',
    "http://h/back\\slash",
    "http://h/\x00nul\x1bescape\x7fdel\x85nel\u2028ls\u2029ps\ttab",
    "",
])
def test_valuesCannotForgeALine(tmp_path: Path, value: str) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), ThreadedClock())
    log.start()
    log.record(client="127.0.0.1:5555", method="GE\nT status=1", target=value, status=400,
               bytesIn=0, bytesOut=0, seconds=0, upstream="", certificate='CN=a"b\nc')
    log.stop()
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), text
    fields = parse_access_line(text.splitlines()[0])
    assert fields["target"] == value
    assert fields["method"] == "GE\nT status=1"
    assert fields["cert"] == 'CN=a"b\nc'
    assert fields["status"] == "400"


def test_plainValuesStayUnquoted(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = logs.AccessLog(str(path), ThreadedClock())
    log.start()
    record(log, "http://h/ünï?q=1")
    log.stop()
    assert " target=http://h/ünï?q=1 " in path.read_text(encoding="utf-8")


def test_writeFailuresAreReportedThroughTheReactorOnce(events) -> None:
    """The writer thread never logs itself; a run of failures is one message, and the loss is counted."""
    clock = ThreadedClock()
    log = logs.AccessLog("/dev/full", clock)  # every flush fails with ENOSPC
    log.start()
    for _ in range(3):
        record(log)
        log.flush()
    threads = clock.runFromThreads()
    log.stop()
    assert [name for name, _ in events if "access log" in _] and threads == ["access-log"]
    written = [text for name, text in events if "access log /dev/full" in text]
    assert all(name == threading.current_thread().name for name, _ in events), events
    assert len([t for t in written if "write failed" in t]) == 1, written
    assert log.lost == 3
    assert any("3 lines could not be written" in t for t in written), written


def test_stopGivesUpOnAStuckWriter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events) -> None:
    """A writer blocked in write (a hung mount; here a pipe nobody reads) cannot hang stop()."""
    monkeypatch.setattr(logs, "STOP_SECONDS", 0.5, raising=False)
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = logs.AccessLog(str(fifo), ThreadedClock(), LoggingSettings(queue_lines=2 * logs.BATCH_LINES))
    try:
        log.start()
        for _ in range(4):  # more than the pipe holds, then a full queue
            for _ in range(logs.BATCH_LINES):
                record(log, "http://h/" + "x" * 200)
        log.flush()
        stopper = threading.Thread(target=log.stop, daemon=True)
        started = time.monotonic()
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "AccessLog.stop hangs on a stuck writer"
        assert time.monotonic() - started < 2
    finally:
        os.close(reader)  # the writer gets EPIPE and ends
    stuck = [text for _, text in events if "the writer is stuck" in text]
    assert len(stuck) == 1, events
    lost = int(re.search(r"(\d+) lines not written", stuck[0]).group(1))
    assert 0 < lost <= 4 * logs.BATCH_LINES, stuck[0]


# Formats, timestamps and escaping of the access line.

# Apache's combined format: host ident user [time] "request" status bytes "referer" "agent".
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
COMBINED = re.compile(
    r"^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] " + _QUOTED.replace("(", "(?P<request>", 1)
    + r" (?P<status>\d{3}) (?P<bytes>\d+|-) " + _QUOTED.replace("(", "(?P<referer>", 1)
    + " " + _QUOTED.replace("(", "(?P<agent>", 1) + "$"
)
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$")
# What no written line may hold raw: C0 but LF, DEL, C1, the Unicode line and paragraph separators.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def unescape(quoted: str) -> str:
    """The value inside the quotes of a combined field (escaped as in JSON)."""
    return json.loads(f'"{quoted}"')


def parse_combined(line: str) -> dict:
    match = COMBINED.match(line)
    assert match, f"not Apache's combined format: {line!r}"
    fields = match.groupdict()
    for key in ("request", "referer", "agent"):
        fields[key] = unescape(fields[key])
    return fields


def written(tmp_path: Path, records: list[dict], **settings) -> list[str]:
    """The lines an access log with C{settings} writes for C{records} (keyword arguments of C{record})."""
    path = tmp_path / f"access-{len(list(tmp_path.iterdir()))}.log"
    log = logs.AccessLog(str(path), ThreadedClock(), LoggingSettings(**settings))
    log.start()
    for fields in records:
        values = {"client": "127.0.0.1:5555", "method": "GET", "target": "http://h/x", "status": 200,
                  "bytesIn": 10, "bytesOut": 20, "seconds": 0.0125, "upstream": "10.0.0.1:80"}
        values.update(fields)
        log.record(**values)
    log.stop()
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and not RAW_CONTROL.search(text), repr(text)
    return text.splitlines()


def test_combinedLinesParseAsApacheCombined(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    lines = written(tmp_path, [
        {"userAgent": "curl/8.5.0", "transaction": "A1B2C3"},
        {"client": "::1:40000", "method": "POST", "target": "/v1/accounts?x=1", "status": 502, "bytesOut": 0},
    ], format="combined")
    after = datetime.datetime.now(datetime.timezone.utc)
    first, second = (parse_combined(line) for line in lines)
    assert (first["host"], first["ident"], first["user"]) == ("127.0.0.1", "-", "-")
    assert first["request"] == "GET http://h/x HTTP/1.1"
    assert (first["status"], first["bytes"], first["referer"], first["agent"]) == ("200", "20", "-", "curl/8.5.0")
    stamp = datetime.datetime.strptime(first["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert first["time"].endswith(" +0000")
    assert before <= stamp <= after
    assert second["host"] == "::1"
    assert second["request"] == "POST /v1/accounts?x=1 HTTP/1.1"
    # Apache's %b: "-" for no body bytes; no user agent: "-".
    assert (second["status"], second["bytes"], second["agent"]) == ("502", "-", "-")


def test_jsonLinesAreOneObjectEach(tmp_path: Path) -> None:
    lines = written(tmp_path, [
        {"userAgent": "okhttp/4.12", "transaction": "T-0001", "certificate": "CN=client,O=bank"},
        {"upstream": "", "status": 403},
    ], format="json")
    first, second = (json.loads(line) for line in lines)
    assert first == {
        "time": first["time"], "client": "127.0.0.1:5555", "method": "GET", "target": "http://h/x", "status": 200,
        "in": 10, "out": 20, "ms": 12.5, "upstream": "10.0.0.1:80",
        "cert": "CN=client,O=bank", "tran_id": "T-0001", "ua": "okhttp/4.12",
    }
    assert ISO_TIME.match(first["time"]) and first["time"].endswith("Z")
    assert second["upstream"] is None and second["status"] == 403
    assert not {"cert", "tran_id", "ua"} & set(second)


def test_keyValueLinesCarryTheTransactionAndTheUserAgent(tmp_path: Path) -> None:
    with_both, without = written(tmp_path, [
        {"transaction": "20260314TX0001", "userAgent": "Mozilla/5.0 (X11; Linux)"},
        {},
    ])
    fields = parse_access_line(with_both)
    assert fields["tran_id"] == "20260314TX0001"
    assert fields["ua"] == "Mozilla/5.0 (X11; Linux)"
    assert ' ua="Mozilla/5.0 (X11; Linux)"' in with_both
    assert "tran_id=" not in without and "ua=" not in without


def test_utcTimestampsInEveryFormat(tmp_path: Path, seoul) -> None:
    """With time = "utc" (the default) the local zone does not matter."""
    before = time.time()
    keyvalue = parse_access_line(written(tmp_path, [{}])[0])["_timestamp"]
    as_json = json.loads(written(tmp_path, [{}], format="json")[0])["time"]
    combined = parse_combined(written(tmp_path, [{}], format="combined")[0])["time"]
    after = time.time()
    for stamp in (keyvalue, as_json):
        assert ISO_TIME.match(stamp) and stamp.endswith("Z"), stamp
        assert before - 1 <= datetime.datetime.fromisoformat(stamp).timestamp() <= after + 1
    assert combined.endswith(" +0000")
    assert before - 1 <= datetime.datetime.strptime(combined, "%d/%b/%Y:%H:%M:%S %z").timestamp() <= after + 1


def test_localTimestampsCarryTheOffsetInEveryFormat(tmp_path: Path, seoul) -> None:
    before = time.time()
    keyvalue = parse_access_line(written(tmp_path, [{}], time="local")[0])["_timestamp"]
    as_json = json.loads(written(tmp_path, [{}], format="json", time="local")[0])["time"]
    combined = parse_combined(written(tmp_path, [{}], format="combined", time="local")[0])["time"]
    after = time.time()
    for stamp in (keyvalue, as_json):
        assert ISO_TIME.match(stamp) and stamp.endswith("+09:00"), stamp
        # The wall clock is Seoul's: UTC's with "+09:00" glued on would be 9 hours off.
        assert before - 1 <= datetime.datetime.fromisoformat(stamp).timestamp() <= after + 1
    assert combined.endswith(" +0900")
    assert before - 1 <= datetime.datetime.strptime(combined, "%d/%b/%Y:%H:%M:%S %z").timestamp() <= after + 1


@pytest.mark.parametrize("local", [False, True])
def test_theErrorLogUsesTheAccessLogsTimestamps(tmp_path: Path, seoul, local: bool) -> None:
    path = tmp_path / "error.log"
    errors = logs.ErrorLog(str(path), ThreadedClock(), LoggingSettings(time="local" if local else "utc"))
    errors.start()
    errors({"log_format": "configuration from {source}", "source": "/etc/mydataproxy.toml",
            "log_time": time.time(), "log_level": LogLevel.info, "log_namespace": "test", "log_system": "-"})
    errors.stop()
    [line] = path.read_text().splitlines()
    stamp, _, rest = line.partition(" ")
    assert ISO_TIME.match(stamp) and stamp.endswith("+09:00" if local else "Z"), line
    assert rest.endswith("configuration from /etc/mydataproxy.toml")
    access = parse_access_line(written(tmp_path, [{}], time="local" if local else "utc")[0])["_timestamp"]
    assert ISO_TIME.match(access).group(1) == ISO_TIME.match(stamp).group(1)


HOSTILE = {
    "method": 'GE\r\nT "x"\x00',
    "target": 'http://h/x\r\n2026-01-01T00:00:00.000Z client=1.2.3.4:1 method=GET target=/forged status=200 "q"\u2028\x00',
    "userAgent": 'curl\n127.0.0.1 - - [01/Jan/2026:00:00:00 +0000] "GET / HTTP/1.1" 200 1 "-" "x"\u2028\x00\u2029',
    "transaction": 'tx\r\n1"\x00\u2028{"status":200}',
    "certificate": 'CN=a"b\nc\x00',
}


def test_injectionIsEscapedInKeyValue(tmp_path: Path) -> None:
    [line] = written(tmp_path, [HOSTILE])
    fields = parse_access_line(line)
    assert (fields["method"], fields["target"], fields["ua"], fields["tran_id"], fields["cert"]) == (
        HOSTILE["method"], HOSTILE["target"], HOSTILE["userAgent"], HOSTILE["transaction"], HOSTILE["certificate"])
    assert fields["status"] == "200"


def test_injectionIsEscapedInCombined(tmp_path: Path) -> None:
    [line] = written(tmp_path, [HOSTILE], format="combined")
    fields = parse_combined(line)
    assert fields["request"] == f"{HOSTILE['method']} {HOSTILE['target']} HTTP/1.1"
    assert fields["agent"] == HOSTILE["userAgent"]
    assert fields["status"] == "200" and fields["host"] == "127.0.0.1"


def test_injectionIsEscapedInJson(tmp_path: Path) -> None:
    [line] = written(tmp_path, [HOSTILE], format="json")
    fields = json.loads(line)
    assert (fields["method"], fields["target"], fields["ua"], fields["tran_id"], fields["cert"]) == (
        HOSTILE["method"], HOSTILE["target"], HOSTILE["userAgent"], HOSTILE["transaction"], HOSTILE["certificate"])
    assert fields["status"] == 200


def test_theErrorLogCannotBeForgedByAValue(tmp_path: Path) -> None:
    """A logged value (a refused target) cannot start a line of its own in the error log."""
    path = tmp_path / "error.log"
    errors = logs.ErrorLog(str(path), ThreadedClock(), LoggingSettings())
    errors.start()
    errors({"log_format": "403 {target} refused", "target": HOSTILE["target"], "log_time": time.time(),
            "log_level": LogLevel.warn, "log_namespace": "test", "log_system": "-"})
    errors.stop()
    text = path.read_text(encoding="utf-8")
    starts = [line for line in text.split("\n") if line and not line.startswith("\t")]
    assert len(starts) == 1 and ISO_TIME.match(starts[0].split(" ")[0]), text
    assert not RAW_CONTROL.search(text.replace("\t", "")), repr(text)
