"""The one exception type mixbits raises for bad input.

Every message says what was given, what was expected, and how to fix it. The CLI prints it as one
line and exits non-zero; the API lets it propagate.
"""


class MixbitsError(ValueError):
    """Bad input or state that the user can fix (a name, a file, a budget, a bit-width)."""


def did_you_mean(value: str, choices) -> str:
    """A hint naming the closest valid choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
