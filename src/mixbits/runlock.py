"""One owner per output directory: an advisory lock held for the life of the job that writes it.

The lock is ``flock`` on a file in the directory, ``.mixbits-lock``, which also names the owner (process
id, host, job, start time) for the message a second writer gets. The kernel releases a flock when its
process ends, however it ends, so a lock file left behind by a killed run is stale: the next job takes
it over. A lock is re-entrant within a process: a search run holds its directory while the library verb it
calls claims the same directory again.

The lock file is removed when the job ends. Removing a lock file races with a process that opened it
just before; after locking, :func:`run_lock` checks that the file it locked is still the one at the path
and tries again if not, so two processes never both hold a directory.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import MixbitsError

LOCK = ".mixbits-lock"
_HELD: dict[Path, list] = {}  # resolved directory -> [file descriptor, depth], for re-entrant claims


class RunDirBusy(MixbitsError):
    """Another process holds the output directory."""


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, job: str, flag: str = "--out") -> Iterator[Path]:
    """Hold ``directory`` (which must exist) as ``job``'s for the block; refuse it when another process holds it."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield directory
        finally:
            _HELD[key][1] -= 1
        return
    path = directory / LOCK
    fd = _locked_file(path, job, flag)
    _HELD[key] = [fd, 1]
    try:
        yield directory
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()  # still holding the lock: a process that opened this file sees it replaced, and retries
        os.close(fd)


def _locked_file(path: Path, job: str, flag: str) -> int:
    """An open descriptor of ``path``, exclusively flock-ed, the file still at ``path``; owner details written."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MixbitsError(f"{flag} {str(path.parent)!r}: cannot create its lock file ({e.strerror or e}); "
                               f"choose another {flag} in a directory you may write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise RunDirBusy(f"{flag} {str(path.parent)!r} is in use by another mixbits process ({owner}); wait for "
                             f"it to finish, stop it, or choose another {flag}") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the owner we waited behind removed the file: lock the new one
    record = {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "command": " ".join(sys.argv),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _owner(fd: int) -> str:
    """The holder as its lock file names it: "pid 123 on host, `train`, since 2026-01-01T10:00:00"."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {record['pid']} on {record['host']}, `{record['job']}`, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not readable"
