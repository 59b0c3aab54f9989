"""
The tamper-evident access log: a hash chain through every line, across
rotations and restarts, and its verification (one line removed, one edited,
two swapped, one rotated file missing).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mydataproxy.config import LoggingSettings
from mydataproxy.ops import audit, logs


def write(path: Path, count: int, fmt: str = "keyvalue", **settings) -> None:
    """C{count} lines, each handed to the writer on its own (rotation is checked per hand-over)."""
    log = logs.AccessLog(str(path), Clock(), LoggingSettings(tamper_evident=True, format=fmt, **settings))
    log.start()
    for i in range(count):
        log.record(client="10.0.0.1:4000", method="GET", target=f"http://h/{i}", status=200,
                   bytesIn=0, bytesOut=i, seconds=0.001, upstream="10.0.0.2:80")
        log.flush()
    log.stop()


def chained(path: Path) -> list[Path]:
    """The log's files, oldest first: rotated ones by name (time stamps), then the current one."""
    return sorted(path.parent.glob(path.name + ".*")) + [path]


@pytest.mark.parametrize("fmt", ["keyvalue", "combined", "json"])
def test_anIntactChainVerifiesAcrossRestarts(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "access.log"
    write(path, 5, fmt)
    write(path, 5, fmt)  # a restart takes the chain up where the file left it
    assert audit.verify([path]) == (10, [])


def test_theChainRunsOnAcrossRotations(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 40, max_size=1500, compress=True, keep=0, max_age_days=0)
    files = chained(path)
    assert len(files) > 2 and all(p.suffix == ".gz" for p in files[:-1]), files
    assert audit.verify(files) == (40, [])


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def rewrite(path: Path, text: list[str]) -> None:
    path.write_text("\n".join(text) + "\n")


def test_aRemovedLineIsFound(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 6)
    text = lines(path)
    del text[2]
    rewrite(path, text)
    checked, problems = audit.verify([path])
    assert checked == 5 and problems == [f"{path}:3: chain broken: a line before it was removed or reordered, or this one altered"]


def test_anEditedLineIsFound(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 6)
    text = lines(path)
    text[4] = text[4].replace("status=200", "status=403")
    rewrite(path, text)
    _, problems = audit.verify([path])
    assert problems and problems[0].startswith(f"{path}:5: chain broken"), problems


def test_swappedLinesAreFound(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 6)
    text = lines(path)
    text[1], text[2] = text[2], text[1]
    rewrite(path, text)
    _, problems = audit.verify([path])
    assert problems and problems[0].startswith(f"{path}:2: chain broken"), problems


def test_aLineWithoutItsChainValueIsFound(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 3)
    text = lines(path)
    text.insert(1, "2026-12-02T00:00:00.000Z client=6.6.6.6:1 method=GET target=/forged status=200")
    rewrite(path, text)
    _, problems = audit.verify([path])
    assert problems == [f"{path}:2: no chain value (a line added or altered)"]


def test_aMissingRotatedFileIsFound(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    write(path, 40, max_size=1500, compress=True, keep=0, max_age_days=0)
    files = chained(path)
    gone = files[1]
    gone.unlink()
    _, problems = audit.verify(files)
    assert any(p.startswith(f"{gone}: cannot be read") for p in problems), problems
    # Without the missing file in the list, the gap shows where the next file starts.
    _, problems = audit.verify([f for f in files if f != gone])
    assert problems == [f"{files[2]}:1: chain broken: a line before it was removed or reordered, or this one altered"]


def test_aDamagedGzipIsAProblemNotACrash(tmp_path: Path) -> None:
    broken = tmp_path / "access.log.1.gz"
    broken.write_bytes(gzip.compress(b"x" * 100)[:20])
    _, problems = audit.verify([broken])
    assert len(problems) == 1 and "cannot be read" in problems[0], problems
