"""
Unit tests of L{RotatingFile} on real files: rotation by size and at local
midnight (an injected clock), gzip read back, retention by count and age,
file modes, names with the host, reopening after an outside rename, and
pipes and devices that are written but never rotated.
"""

from __future__ import annotations

import gzip
import os
import stat
import time
from pathlib import Path
from typing import Iterator

import pytest

from mydataproxy.config import LoggingSettings
from mydataproxy.ops.logfile import RotatingFile

DAY = 86400.0


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(**values) -> LoggingSettings:
    """Settings with nothing on unless asked for: no size or daily rotation, no gzip, no retention."""
    defaults = {"max_size": 0, "daily": False, "keep": 0, "max_age_days": 0, "compress": False}
    defaults.update(values)
    return LoggingSettings(**defaults)


@pytest.fixture
def seoul(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Asia/Seoul (UTC+9, no DST) for the test, and what it was after."""
    with monkeypatch.context() as m:
        m.setenv("TZ", "Asia/Seoul")
        time.tzset()
        yield
    time.tzset()


def local(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
    """Seconds since the epoch of a local wall-clock time."""
    return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))


def others(path: Path) -> list[Path]:
    """The files beside C{path} whose names start with its name and a dot (its rotated files), by name."""
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


def test_sizeRotationMovesTheFullFileAsideBeforeTheWriteThatWouldPassTheLimit(tmp_path: Path, seoul) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(local(2026, 3, 14, 10, 0, 0))
    f = RotatingFile(str(path), settings(max_size=100), clock)
    f.open()
    f.write(b"a" * 59 + b"\n")
    f.write(b"b" * 39 + b"\n")  # 100 bytes: at the limit, not past it
    assert others(path) == []
    f.write(b"c\n")
    f.write(b"d" * 97 + b"\n")  # 2 + 98 = 100
    f.write(b"e\n")
    f.close()
    assert path.read_bytes() == b"e\n"
    # Both rotations fell in one second; the names still sort in rotation order.
    first, second = others(path)
    assert first.name.startswith("access.log.20260314-100000") and second.name.startswith(first.name)
    assert first.read_bytes() == b"a" * 59 + b"\n" + b"b" * 39 + b"\n"
    assert second.read_bytes() == b"c\n" + b"d" * 97 + b"\n"


def test_aSingleLineLongerThanTheLimitIsWrittenWhole(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings(max_size=10), FakeClock(local(2026, 3, 14, 10, 0, 0)))
    f.open()
    f.write(b"x" * 50 + b"\n")
    f.close()
    assert path.read_bytes() == b"x" * 50 + b"\n"
    assert others(path) == []


def test_dailyRotationAtLocalMidnight(tmp_path: Path, seoul) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(local(2026, 3, 14, 23, 59, 50))
    f = RotatingFile(str(path), settings(daily=True), clock)
    f.open()
    f.write(b"saturday 1\n")
    clock.now = local(2026, 3, 14, 23, 59, 59)
    f.write(b"saturday 2\n")
    assert others(path) == [], "rotated before midnight"
    clock.now = local(2026, 3, 15, 0, 0, 1)
    f.write(b"sunday 1\n")
    f.write(b"sunday 2\n")
    f.close()
    [rotated] = others(path)
    assert rotated.read_bytes() == b"saturday 1\nsaturday 2\n"
    assert path.read_bytes() == b"sunday 1\nsunday 2\n"


def test_dailyRotationFollowsLocalTimeNotUTC(tmp_path: Path, seoul) -> None:
    """In Seoul, local midnight is 15:00 UTC: a UTC date change at 09:00 local is no rotation."""
    path = tmp_path / "access.log"
    clock = FakeClock(local(2026, 3, 15, 8, 59, 0))  # 23:59 UTC on the 14th
    f = RotatingFile(str(path), settings(daily=True), clock)
    f.open()
    f.write(b"before\n")
    clock.now = local(2026, 3, 15, 9, 1, 0)  # 00:01 UTC on the 15th
    f.write(b"after\n")
    f.close()
    assert others(path) == []
    assert path.read_bytes() == b"before\nafter\n"


def test_aFileLeftFromAnEarlierDayIsRotatedAtItsFirstWriteToday(tmp_path: Path, seoul) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"yesterday\n")
    now = local(2026, 3, 15, 12, 0, 0)
    yesterday = local(2026, 3, 14, 12, 0, 0)
    os.utime(path, (yesterday, yesterday))
    f = RotatingFile(str(path), settings(daily=True), FakeClock(now))
    f.open()
    f.write(b"today\n")
    f.close()
    [rotated] = others(path)
    assert rotated.read_bytes() == b"yesterday\n"
    assert path.read_bytes() == b"today\n"


def test_rotatedFilesAreGzippedAndReadBackEqual(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings(max_size=4096, compress=True), FakeClock(local(2026, 3, 14, 10, 0, 0)))
    f.open()
    lines = [f"line {n} {'x' * (n % 50)}\n".encode() for n in range(200)]
    written = bytearray()
    for line in lines:
        if written and len(written) + len(line) > 4096:
            break
        f.write(line)
        written += line
    f.write(b"n" * (4097 - len(written)) + b"\n")  # past the limit: the file is rotated first
    f.write(b"next file\n")
    f.close()
    [rotated] = others(path)
    assert rotated.name.endswith(".gz")
    assert not rotated.with_suffix("").exists(), "the uncompressed copy is left behind"
    with gzip.open(rotated, "rb") as packed:
        assert packed.read() == bytes(written)
    assert path.read_bytes() == b"n" * (4097 - len(written)) + b"\nnext file\n"


def rotatedFile(path: Path, stamp: str, age_days: float, now: float) -> Path:
    """A rotated file of C{path} named with C{stamp}, last changed C{age_days} before C{now}."""
    old = path.with_name(f"{path.name}.{stamp}.gz")
    old.write_bytes(b"old")
    mtime = now - age_days * DAY
    os.utime(old, (mtime, mtime))
    return old


def test_retentionByCountKeepsTheNewest(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    now = local(2026, 3, 14, 10, 0, 0)
    ages = {"20260301-000000": 13, "20260310-000000": 4, "20260312-000000": 2, "20260305-000000": 9}
    olds = {stamp: rotatedFile(path, stamp, age, now) for stamp, age in ages.items()}
    unrelated = [tmp_path / "access.log-notes", tmp_path / "error.log.20260301-000000.gz", tmp_path / "access.lo"]
    for other in unrelated:
        other.write_bytes(b"keep me")
        os.utime(other, (now - 100 * DAY, now - 100 * DAY))
    f = RotatingFile(str(path), settings(max_size=10, keep=3), FakeClock(now))
    f.open()
    f.write(b"0123456789\n")
    rotated = f.rotate()
    f.close()
    # The new rotated file and the two newest old ones.
    assert set(others(path)) == {rotated, olds["20260312-000000"], olds["20260310-000000"]}
    assert all(other.exists() for other in unrelated)


def test_retentionByAgeUsesTheClock(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    now = local(2026, 3, 14, 10, 0, 0)
    young = rotatedFile(path, "20260313-000000", 1, now)
    almost = rotatedFile(path, "20260308-000000", 6.9, now)
    old = rotatedFile(path, "20260306-000000", 7.1, now)
    ancient = rotatedFile(path, "20260101-000000", 72, now)
    f = RotatingFile(str(path), settings(max_age_days=7), FakeClock(now))
    assert sorted(f.prune()) == sorted([old, ancient])
    assert set(others(path)) == {young, almost}


def test_retentionByCountAndAgeTogether(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    now = local(2026, 3, 14, 10, 0, 0)
    newest = rotatedFile(path, "20260314-000000", 0.1, now)
    rotatedFile(path, "20260313-000000", 1, now)  # young, but beyond keep
    rotatedFile(path, "20260301-000000", 13, now)  # old and beyond keep
    f = RotatingFile(str(path), settings(keep=1, max_age_days=7), FakeClock(now))
    f.prune()
    assert others(path) == [newest]


def test_noRetentionKeepsEverything(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    now = local(2026, 3, 14, 10, 0, 0)
    olds = [rotatedFile(path, f"202601{d:02d}-000000", 100 - d, now) for d in range(1, 11)]
    f = RotatingFile(str(path), settings(keep=0, max_age_days=0), FakeClock(now))
    assert f.prune() == []
    assert others(path) == sorted(olds)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_filesAreMode0640WhateverTheUmask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "access.log"
    previous = os.umask(umask)
    try:
        f = RotatingFile(str(path), settings(max_size=5, compress=True), FakeClock(local(2026, 3, 14, 10, 0, 0)))
        f.open()
        f.write(b"first\n")
        f.write(b"second\n")
        f.close()
    finally:
        os.umask(previous)
    [rotated] = others(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, oct(path.stat().st_mode)
    assert stat.S_IMODE(rotated.stat().st_mode) == 0o640, oct(rotated.stat().st_mode)


def test_uncompressedRotatedFilesKeepMode0640(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings(max_size=5), FakeClock(local(2026, 3, 14, 10, 0, 0)))
    f.open()
    f.write(b"first\n")
    f.write(b"second\n")
    f.close()
    [rotated] = others(path)
    assert stat.S_IMODE(rotated.stat().st_mode) == 0o640


def test_namesCarryTheHostAndTheDirectoryIsCreatedAtStart(tmp_path: Path) -> None:
    directory = tmp_path / "mnt" / "proxy" / "log"
    logging = LoggingSettings(directory=str(directory))
    assert logging.accessPath("web-1") == f"{directory}/access.web-1.log"
    assert logging.errorPath("web-1") == f"{directory}/error.web-1.log"
    for path in (logging.accessPath("web-1"), logging.errorPath("web-1"), logging.accessPath("web-2")):
        f = RotatingFile(path, logging)
        f.open(createDirectory=True)
        f.write(path.encode() + b"\n")
        f.close()
    assert sorted(p.name for p in directory.iterdir()) == ["access.web-1.log", "access.web-2.log", "error.web-1.log"]
    for p in directory.iterdir():
        assert p.read_text() == f"{p}\n"


def test_namePatternsAndExplicitPaths(tmp_path: Path) -> None:
    custom = LoggingSettings(directory=str(tmp_path), access_name="proxy-{host}.access", error_name="{host}-daemon.log")
    assert custom.accessPath("h1") == f"{tmp_path}/proxy-h1.access"
    assert custom.errorPath("h1") == f"{tmp_path}/h1-daemon.log"
    explicit = LoggingSettings(directory=str(tmp_path), access_log="/var/log/a.log", error_log="-")
    assert explicit.accessPath("h1") == "/var/log/a.log"
    assert explicit.errorPath("h1") == "-"
    nowhere = LoggingSettings()
    assert nowhere.accessPath("h1") == "-"
    assert nowhere.errorPath("h1") == ""


def test_aVanishedDirectoryIsNotRecreatedAfterStart(tmp_path: Path) -> None:
    """Under a mount point, a new local directory would hide the mount when it returns."""
    directory = tmp_path / "log"
    path = directory / "access.log"
    f = RotatingFile(str(path), settings())
    f.open(createDirectory=True)
    f.close()
    path.unlink()
    directory.rmdir()
    with pytest.raises(FileNotFoundError):
        f.open()
    with pytest.raises(FileNotFoundError):
        f.write(b"lost\n")
    assert not directory.exists()


def test_reopenIfMovedAfterAnOutsideRename(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings())
    f.open()
    f.write(b"before\n")
    assert f.reopenIfMoved() is False
    os.rename(path, tmp_path / "access.log.1")
    f.write(b"still the old file\n")
    assert f.reopenIfMoved() is True
    f.write(b"after\n")
    assert f.reopenIfMoved() is False
    f.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"before\nstill the old file\n"
    assert path.read_bytes() == b"after\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_reopenIfMovedAfterRemoval(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings())
    f.open()
    f.write(b"before\n")
    path.unlink()
    assert f.reopenIfMoved() is True
    f.write(b"after\n")
    f.close()
    assert path.read_bytes() == b"after\n"


def test_reopenIfMovedAfterCopytruncateStyleReplacement(tmp_path: Path) -> None:
    """Another file put at the path (rename, then a new file created) is the one written."""
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings())
    f.open()
    f.write(b"before\n")
    os.rename(path, tmp_path / "access.log.1")
    path.write_bytes(b"created by logrotate\n")
    assert f.reopenIfMoved() is True
    f.write(b"after\n")
    f.close()
    assert path.read_bytes() == b"created by logrotate\nafter\n"


def test_reopenOpensThePathAfresh(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings())
    f.open()
    f.write(b"one\n")
    os.rename(path, tmp_path / "access.log.1")
    f.reopen()
    f.write(b"two\n")
    f.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"one\n"
    assert path.read_bytes() == b"two\n"


def test_aSizeRotationAfterAReopenCountsTheNewFileOnly(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    f = RotatingFile(str(path), settings(max_size=20), FakeClock(local(2026, 3, 14, 10, 0, 0)))
    f.open()
    f.write(b"x" * 15 + b"\n")
    os.rename(path, tmp_path / "moved")
    assert f.reopenIfMoved() is True
    f.write(b"y" * 15 + b"\n")  # 16 bytes in the new file: no rotation
    f.close()
    assert others(path) == []
    assert path.read_bytes() == b"y" * 15 + b"\n"


def test_aFifoIsWrittenButNeverRotated(tmp_path: Path, seoul) -> None:
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        clock = FakeClock(local(2026, 3, 14, 23, 59, 0))
        f = RotatingFile(str(fifo), settings(max_size=10, daily=True, compress=True, keep=1), clock)
        f.open()
        f.write(b"a" * 20 + b"\n")
        f.write(b"b" * 20 + b"\n")
        clock.now += DAY
        f.write(b"c\n")
        f.close()
        assert os.read(reader, 1000) == b"a" * 20 + b"\n" + b"b" * 20 + b"\n" + b"c\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert others(fifo) == []


def test_aDeviceIsWrittenButNeverRotated(tmp_path: Path) -> None:
    """C{/dev/null} through a link (were it renamed, only the link would move)."""
    link = tmp_path / "access.log"
    link.symlink_to("/dev/null")
    f = RotatingFile(str(link), settings(max_size=1, compress=True))
    f.open()
    for _ in range(3):
        f.write(b"some line\n")
    f.close()
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert others(link) == []
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
