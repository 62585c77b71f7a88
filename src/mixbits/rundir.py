"""Output guards: no command writes over files it did not write itself for the same job.

Every output directory a command creates holds a small marker, ``.mixbits-job``, naming the job that
owns it (``train``, ``search``, ``export of <checkpoint>``, ``report of <run>``). A command may write
into a directory that is missing, empty, or marked with its own job; anything else is refused unless
the user passes ``--force``, which writes into it anyway, replacing files of the same names and
deleting nothing. File outputs (a latency table, a benchmark report) are refused when they exist.

Checks come first and write nothing. A job that writes a directory holds it for its whole life with
:func:`claim_output_dir`: the checks, a lock (one owner per directory, see runlock.py), the cleanup of
temporary files a killed job left, and, when the job fails before it wrote anything to resume from (a
checkpoint), the removal of what it added, so a command that fails leaves the directory as it found it.

The same rules hold for the library verbs that write (``export``, ``search(run_dir=)``, ``finetune(run_dir=)``):
their messages name the keyword argument (``out_dir``, ``force=True``) instead of the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import MixbitsError
from .runlock import LOCK, run_lock
from .utils import TEMP_SUFFIX, atomic_write_text, read_json

MARKER = ".mixbits-job"
SETTINGS = "settings.json"  # what a library verb's run was started with (record_settings)
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
    _check_link(path, flag)
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
                       f"{_force(flag)} to write into it anyway")


@contextlib.contextmanager
def claim_output_dir(path: str | os.PathLike, job: str, *, force: bool = False, resume: bool = False,
                     flag: str = "--out") -> Iterator[Path]:
    """Own ``path`` as ``job``'s output for the block: checked (:func:`check_output_dir`), created, locked
    against any other process, marked, and cleared of temporary files a killed job left.

    When the block raises and the directory holds no checkpoint (``*.pt``) to resume from, the files the
    block added are removed again, and the directory too if the claim created it. Nested claims of one
    directory in one process share the outermost one.
    """
    path = Path(path)
    check_output_dir(path, job, force=force, resume=resume, flag=flag)  # a refusal creates nothing
    created = _first_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MixbitsError(f"{flag} {str(path)!r} cannot be created: {e.strerror or e}; "
                           f"choose another {flag}") from None
    try:
        with run_lock(path, job, flag):
            before = _files(path)
            try:
                check_output_dir(path, job, force=force, resume=resume, flag=flag)  # again, now that we own it
                _remove_partial_files(path)
                make_output_dir(path, job)
                yield path
            except BaseException:
                _remove_added(path, before)
                raise
    finally:
        _remove_empty(path, created)


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


def record_settings(run_dir: str | os.PathLike, settings: dict, *, resume: bool, force: bool = False,
                    flag: str = "run_dir") -> None:
    """Write what a run is started with to ``run_dir``/settings.json; on resume, refuse settings that differ from
    the record instead, naming each one (a run resumed under another budget would mix two runs into one). A new
    start where a record exists is refused unless ``force``: that directory holds a run already."""
    path = Path(run_dir) / SETTINGS
    asked = json.loads(json.dumps(settings, default=repr))  # as the record holds them: lists, string keys
    if not resume and not force and path.is_file():
        raise MixbitsError(f"{flag} {str(run_dir)!r} already holds a run (its {SETTINGS}); pass resume=True to "
                           f"continue it, choose another {flag}, or pass {_force(flag)} to start anew over it")
    if resume and path.is_file():
        recorded = read_json(path, "run settings", f"remove it to resume without the check, or choose another {flag}")
        changes = changed_settings(flat_settings(recorded), flat_settings(asked))
        if changes:
            raise MixbitsError(f"cannot resume {str(run_dir)!r}: {settings_differ(changes)} from the run's {SETTINGS} "
                               f"(recorded -> asked): {', '.join(changes)}; resume with the recorded settings, or "
                               f"start a new run with another {flag}")
        return
    atomic_write_text(path, json.dumps(asked, indent=1) + "\n")


def changed_settings(recorded: dict, asked: dict, may_change=frozenset()) -> list[str]:
    """``"policy 'uniform:4' -> 'uniform:2'"`` per flat setting that differs, in the order asked for; a setting the
    record lacks (added to mixbits after the run started) is taken at its value asked for."""
    return [f"{key} {recorded[key]!r} -> {value!r}" for key, value in asked.items()
            if key not in may_change and key in recorded and _plain(recorded[key]) != _plain(value)]


def settings_differ(changes: list[str]) -> str:
    return "1 setting differs" if len(changes) == 1 else f"{len(changes)} settings differ"


def flat_settings(settings: dict, whole=frozenset(), prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; a mapping named in ``whole`` (e.g. model.kwargs) stays one value."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in whole:
            out.update(flat_settings(value, whole, f"{name}."))
        else:
            out[name] = value
    return out


def _plain(value):
    """YAML and JSON give lists where a config holds tuples."""
    return list(value) if isinstance(value, tuple) else value


def _force(flag: str) -> str:
    return "--force" if flag.startswith("--") else "force=True"  # a flag on the command line, else a keyword


def _check_link(path: Path, flag: str) -> None:
    """A symbolic link whose target is missing or loops is refused by name (mkdir would say "File exists")."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except FileNotFoundError:
            raise MixbitsError(f"{flag} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                               f"exist; create the target directory, remove the link, or choose another "
                               f"{flag}") from None
        except (RuntimeError, OSError):  # a loop: RuntimeError up to Python 3.12, OSError (ELOOP) after
            raise MixbitsError(f"{flag} {str(path)!r} is a symbolic link that loops ({os.readlink(path)!r}); "
                               f"remove the link or choose another {flag}") from None


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what creating it makes), or None."""
    missing = None
    for p in (path, *path.absolute().parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _files(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def _remove_partial_files(path: Path) -> None:
    """Temporary files of atomic writes a killed job left (an 8 MB checkpoint in the making, say)."""
    for leftover in path.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def _remove_added(path: Path, before: set[Path]) -> None:
    """After a failure: the files added since ``before``, unless there is a checkpoint to resume from."""
    after = _files(path)
    if any(p.suffix == ".pt" for p in after):
        return
    for added in sorted(after - before - {path / LOCK}, reverse=True):
        with contextlib.suppress(OSError):
            added.unlink()
    for directory in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            if not any(directory.iterdir()) and not any(b.is_relative_to(directory) for b in before):
                directory.rmdir()


def _remove_empty(path: Path, created: Path | None) -> None:
    """The directories the claim created, from ``path`` up to ``created``, where they are empty."""
    if created is None:
        return
    for p in (path, *path.absolute().parents):
        try:
            p.rmdir()
        except OSError:
            return
        if p.absolute() == created.absolute():
            return


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
    return any(p.name != LOCK for p in path.iterdir())


def _sample(path: Path, shown: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    more = f", ... ({len(names)} entries)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
