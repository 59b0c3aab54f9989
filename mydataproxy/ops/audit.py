"""
The tamper-evident access log (C{logging.tamper_evident}): each line ends
with C{chain=<sha256>}, the hash of the previous line's chain value and
this line's text, so that removing, editing or reordering a line breaks
every chain value after it.  The chain runs on across rotations (the first
line of a new file continues the last of the old) and across restarts (the
writer takes up the last value of the file it appends to).

Hashing is done by the writer thread on the lines it actually writes, so
lines dropped under a hung mount (counted and reported elsewhere) leave no
false gap.  L{verify} is what C{mydataproxy verify-log} runs.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path
from typing import Iterable, Iterator

GENESIS = "0" * 64
# The chain field as appended to a keyvalue or combined line, or to a JSON object.
_TAIL = re.compile(r'(?: chain=([0-9a-f]{64})|,"chain":"([0-9a-f]{64})"\})$')


def _link(previous: str, text: str) -> str:
    return hashlib.sha256(f"{previous}\n{text}".encode("utf-8")).hexdigest()


class HashChain:
    """Appends the chain field to each line (the writer thread's)."""

    def __init__(self, previous: str = GENESIS) -> None:
        self.previous = previous

    def apply(self, line: str) -> str:
        """C{line} (ending in a newline) with its chain field."""
        text = line[:-1]
        value = _link(self.previous, text)
        self.previous = value
        if text.endswith("}"):
            return f'{text[:-1]},"chain":"{value}"}}\n'
        return f"{text} chain={value}\n"


def _split(line: str) -> tuple[str, str] | None:
    """(the text the chain value covers, the value), or None without one."""
    match = _TAIL.search(line)
    if match is None:
        return None
    value = match.group(1) or match.group(2)
    text = line[: match.start()] + ("}" if match.group(2) else "")
    return text, value


def lastValue(path: Path) -> str | None:
    """The chain value of the last line of C{path}, if it has one."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read().decode("utf-8", "replace").rstrip("\n").rpartition("\n")[2]
    except OSError:
        return None
    found = _split(tail)
    return found[1] if found else None


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line.rstrip("\n")


def verify(paths: Iterable[Path]) -> tuple[int, list[str]]:
    """
    Check the chain through C{paths}, oldest first (rotated files, gzipped
    or not, then the current one).  The first line's predecessor is taken
    on trust unless it is the chain's start.

    @return: (lines checked, problems: the first break in each file, and
        files that could not be read).
    """
    problems: list[str] = []
    previous: str | None = None
    checked = 0
    for path in paths:
        try:
            for number, line in enumerate(_lines(path), 1):
                checked += 1
                found = _split(line)
                if found is None:
                    problems.append(f"{path}:{number}: no chain value (a line added or altered)")
                    previous = None
                    continue
                text, value = found
                if previous is not None and _link(previous, text) != value:
                    problems.append(
                        f"{path}:{number}: chain broken: a line before it was removed or reordered, or this one altered"
                    )
                previous = value
        except (OSError, UnicodeDecodeError, EOFError) as e:
            problems.append(f"{path}: cannot be read: {e}")
            previous = None
    return checked, problems
