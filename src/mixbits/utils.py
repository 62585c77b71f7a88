"""Small shared helpers: atomic file writes, reading user files, seeding, and the device check."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import MixbitsError


def _umask() -> int:
    # The only portable way to read the umask is to set it; done once, at import, before any thread starts.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
# The temporary files of atomic writes end so: one a killed process left is known for what it is, and removed by
# the next job that owns the directory (mixbits.rundir.claim_output_dir).
TEMP_SUFFIX = ".mixbits-partial"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` then rename, so a crash never leaves half a file.

    The file gets the mode a plain ``open(path, "w")`` would give it: an existing file's, else 0666 less
    the umask (a temporary file alone would be private, 0600). An OS error (read-only directory, a file
    where a directory should be, a full disk) becomes one MixbitsError naming the path.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_UMASK
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_files(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory inside ``out_dir`` whose files move into ``out_dir`` when the block ends well.

    When the block raises, nothing it wrote is left behind (nor ``out_dir``, if this call created it), so a
    failed export never leaves a model file without its report, or an unchecked graph.
    """
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    except OSError as e:
        raise _write_error(out, e) from None
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _write_error(path: Path, e: OSError) -> MixbitsError:
    return MixbitsError(f"cannot write {str(path)!r}: {e.strerror or e}; choose an output path in a writable "
                        "directory (or free some space)")


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user gave; a missing, unreadable or non-UTF-8 file is one MixbitsError.

    ``what`` names the file's role in the message, e.g. "config file" or "policy file".
    """
    path = Path(path)
    if path.is_dir():
        raise MixbitsError(f"{what} {str(path)!r} is a directory; give the path of a file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixbitsError(f"{what} {str(path)!r} does not exist; check the path") from None
    except UnicodeDecodeError as e:
        raise MixbitsError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x}); "
                           "save it as UTF-8") from None
    except OSError as e:
        raise MixbitsError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None


def parse_json(text: str, where: str, fix: str = "repair it"):
    """JSON ``text`` as plain data; invalid JSON, a key given twice in one object (JSON leaves its meaning open:
    Python would silently keep the last) or nesting too deep to read is one MixbitsError naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise MixbitsError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"{fix}") from None
    except _DuplicateKey as e:
        raise MixbitsError(f"{where} gives the key {e.args[0]!r} twice in one object; keep one; {fix}") from None
    except RecursionError:
        raise MixbitsError(f"{where} is nested too deeply to read (thousands of levels); {fix}") from None


def read_json(path: str | os.PathLike, what: str, fix: str = "repair it"):
    """The JSON data of a file (see :func:`parse_json`); ``what`` names its role, ``fix`` what to do about it."""
    return parse_json(read_text(path, what), f"{what} {str(path)!r}", fix)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order and sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run here (no CUDA, no such GPU, no MPS), or None when it can."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"{device!r} asked for, but this torch sees no CUDA device; use cpu"
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return f"{device!r} does not exist: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"{device!r} asked for, but MPS is not available here; use cpu"
    return None
