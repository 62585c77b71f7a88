"""Output guards: no command writes over files it did not write itself for the same job.

Every output directory a command creates holds a small marker, ``.mixbits-job``, naming the job that
owns it (``train``, ``search``, ``export of <checkpoint>``, ``report of <run>``). A command may write
into a directory that is missing, empty, or marked with its own job; anything else is refused unless
the user passes ``--force``, which writes into it anyway, replacing files of the same names and
deleting nothing. File outputs (a latency table, a benchmark report) are refused when they exist.

Checks come first and write nothing, so a command that fails later leaves no trace; the directory
and its marker are made at the first write.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import MixbitsError
from .utils import atomic_write_text

MARKER = ".mixbits-job"
FORCE_HELP = ("write over an existing output that another job wrote: files of the same names are replaced, "
              "nothing else is touched or deleted")


def add_force_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def job_of(directory: str | os.PathLike) -> str | None:
    """The job recorded in ``directory``'s marker, or None when it has none."""
    marker = Path(directory) / MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def check_output_dir(path: str | os.PathLike, job: str, *, force: bool = False, resume: bool = False,
                     flag: str = "--out") -> Path:
    """Refuse ``path`` as ``job``'s output directory unless it is missing, empty, or already ``job``'s.

    ``resume`` also accepts an unmarked directory (a run written before markers existed); the job's own
    resume checks then decide whether it really is one. Writes nothing.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MixbitsError(f"{flag} {str(path)!r} exists and is not a directory; choose a directory path")
    _check_writable(path, flag)
    if not path.exists() or force or not _holds_files(path):
        return path
    owner = job_of(path)
    if owner == job or (resume and owner is None):
        return path
    holds = f"the output of `{owner}`" if owner else f"files of another job ({_sample(path)})"
    raise MixbitsError(f"{flag} {str(path)!r} already holds {holds}, not of `{job}`; choose another {flag}, or pass "
                       "--force to write into it anyway")


def make_output_dir(path: str | os.PathLike, job: str) -> Path:
    """Create ``path`` (checked with :func:`check_output_dir`) and mark it as ``job``'s."""
    path = Path(path)
    if job_of(path) != job:
        atomic_write_text(path / MARKER, job + "\n")
    return path


def check_output_file(path: str | os.PathLike, *, force: bool = False, flag: str = "--out") -> Path:
    """Refuse an existing ``path`` (unless ``force``) or one that cannot be written. Writes nothing."""
    path = Path(path)
    if path.is_dir():
        raise MixbitsError(f"{flag} {str(path)!r} is a directory; give a file path")
    _check_writable(path.parent, flag)
    if path.exists() and not force:
        raise MixbitsError(f"{flag} {str(path)!r} already exists; choose another {flag}, or pass --force to "
                           "replace it")
    return path


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` (itself included) must be a directory we may write in."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise MixbitsError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    needed = os.W_OK | os.X_OK | (os.R_OK if existing == path else 0)  # reading: to see what it holds
    if not os.access(existing, needed):
        raise MixbitsError(f"{flag} {str(path)!r} cannot be written: {str(existing)!r} is not writable by you; "
                           f"choose another {flag}")


def _holds_files(path: Path) -> bool:
    return any(path.iterdir())


def _sample(path: Path, shown: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
