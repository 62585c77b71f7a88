"""Configured runs, what the command line executes: a RunConfig in, a run directory out (config.yaml,
checkpoints, metrics, result.json) that eval, export, report and --resume read back. Built on the
library verbs of :mod:`mixbits.api`."""
