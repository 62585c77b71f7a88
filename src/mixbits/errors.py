"""The one exception type mixbits raises for bad input.

Every message says what was given, what was expected, and how to fix it. The CLI prints it as one
line and exits non-zero; the API lets it propagate.
"""


class MixbitsError(ValueError):
    """Bad input or state that the user can fix (a name, a file, a budget, a bit-width)."""


class TrainingDiverged(MixbitsError):
    """The training loss became NaN, infinite or exploded: the run stopped, its last checkpoint is kept."""


def did_you_mean(value: str, choices) -> str:
    """A hint naming the closest valid choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class AdvisedError(MixbitsError):
    """A MixbitsError whose fix is another setting, said in the caller's language.

    ``advice`` holds (keyword argument, command-line flag) pairs, e.g. ``("opset=13", "--opset 13")``:
    the message names the keyword arguments (a Python call sees it), and ``for_cli()`` the flags
    (the CLI prints that one).
    """

    def __init__(self, problem: str, advice=()):
        self.problem, self.advice = problem, list(advice)
        super().__init__(self._say(0))

    def for_cli(self) -> str:
        return self._say(1)

    def _say(self, language: int) -> str:
        if not self.advice:
            return self.problem
        return f"{self.problem}; try {' or '.join(pair[language] for pair in self.advice)}"
