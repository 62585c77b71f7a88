"""How long work shows its progress: a live bar on a terminal, and one line per epoch or walk step.

``progress`` is tri-state everywhere: None (the default) draws bars only when stderr is a terminal and
always writes the per-epoch and per-step lines, so a log file or CI output shows movement; True forces
the bars; False is silent.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar_enabled(progress: bool | None) -> bool:
    return progress if progress is not None else sys.stderr.isatty()


def lines_enabled(progress: bool | None) -> bool:
    return progress is not False


def progress_line(text: str, progress: bool | None) -> None:
    """One line on stderr (through tqdm, so a live bar is not broken), unless progress is False."""
    if lines_enabled(progress):
        tqdm.write(text, file=sys.stderr)
