"""
A log file that rotates itself: by size, and at local midnight; rotated
files are gzipped and kept by count and by age.  Used by one writer thread
only (L{mydataproxy.ops.logs}), never on the reactor: every call here may
block on a hung mount.

Why not C{twisted.python.logfile.LogFile}: it is written on the reactor
thread (one stalled EFS write freezes the proxy), rotates by size only,
keeps unlimited old files and creates them with the process's umask.

A file renamed or removed by an outside tool (C{logrotate}) is noticed:
L{RotatingFile.reopenIfMoved} compares the open file with what the path
names now, and L{RotatingFile.reopen} opens the path afresh (SIGUSR1).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

from mydataproxy.config import LoggingSettings

MODE = 0o640


class RotatingFile:
    """
    Appends to C{path}, rotating as C{settings} says.

    @param now: The clock (seconds since the epoch); injected by tests to
        force a date change.
    """

    def __init__(self, path: str, settings: LoggingSettings, now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.settings = settings
        self.now = now
        self._fd: int | None = None
        self._size = 0
        self._day = ""
        self._regular = True

    @property
    def isOpen(self) -> bool:
        return self._fd is not None

    def _today(self) -> str:
        return time.strftime("%Y%m%d", time.localtime(self.now()))

    def open(self, createDirectory: bool = False) -> None:
        """
        Open, creating the file (mode 0640) if missing, and its directory
        too if C{createDirectory} (at start only: a vanished mount must not
        be replaced by a local directory under its mount point).

        @raise OSError: If it cannot be.
        """
        if createDirectory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, MODE)
        except FileExistsError:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        else:
            os.fchmod(fd, MODE)  # 0640 whatever the umask
        self._fd = fd
        status = os.fstat(fd)
        # A pipe or a device (a FIFO, /dev/stdout) is written, never rotated.
        self._regular = stat.S_ISREG(status.st_mode)
        self._size = status.st_size
        # A file from an earlier day is rotated at its first write today.
        self._day = time.strftime("%Y%m%d", time.localtime(status.st_mtime)) if status.st_size else self._today()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def reopen(self) -> None:
        """Close and open the path afresh (after an outside rename)."""
        self.close()
        self.open()

    def reopenIfMoved(self) -> bool:
        """Reopen if the path no longer names the open file; True if it did."""
        if self._fd is None:
            return False
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self.reopen()
            return True
        opened = os.fstat(self._fd)
        if (current.st_ino, current.st_dev) != (opened.st_ino, opened.st_dev):
            self.reopen()
            return True
        return False

    def write(self, data: bytes) -> None:
        """
        Append C{data}, rotating first if it is due.

        @raise OSError: If the write fails (the caller counts what is lost).
        """
        if self._fd is None:
            self.open()
        if self._rotationDue(len(data)):
            self.rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._size += written

    def _rotationDue(self, incoming: int) -> bool:
        if not self._size or not self._regular:
            return False
        settings = self.settings
        if settings.max_size and self._size + incoming > settings.max_size:
            return True
        return settings.daily and self._today() != self._day

    def rotate(self) -> Path:
        """
        Move the current file aside (gzipped if C{compress}), open a new
        one, and apply the retention rules.

        @return: The rotated file's path.
        """
        self.close()
        now = self.now()
        # Names sort as the files were rotated: "ls" and a shell glob give
        # verify-log the files oldest first.
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists() or target.with_name(target.name + ".gz").exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
            n += 1
        os.rename(self.path, target)
        self.open()
        self._day = self._today()
        if self.settings.compress:
            target = self._compress(target)
        self.prune()
        return target

    @staticmethod
    def _compress(path: Path) -> Path:
        packed = path.with_name(path.name + ".gz")
        with open(path, "rb") as source, gzip.open(packed, "wb") as sink:
            shutil.copyfileobj(source, sink, 1024 * 1024)
        os.chmod(packed, MODE)
        os.remove(path)
        return packed

    def rotated(self) -> list[Path]:
        """The rotated files of this log, newest first."""
        prefix = self.path.name + "."
        found = [p for p in self.path.parent.iterdir() if p.name.startswith(prefix) and p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def prune(self) -> list[Path]:
        """Delete rotated files beyond C{keep} or older than C{max_age_days}; return them."""
        settings = self.settings
        files = self.rotated()
        doomed = files[settings.keep:] if settings.keep else []
        if settings.max_age_days:
            oldest = self.now() - settings.max_age_days * 86400
            doomed += [p for p in files if p not in doomed and p.stat().st_mtime < oldest]
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed
