"""`mixbits list [models|datasets|methods|configs]`: what can be named on the command line."""

from __future__ import annotations

import argparse

from ..config import shipped_configs
from ..data import DATASETS
from ..models import MODELS
from ..search import SEARCHERS

KINDS = ("models", "datasets", "methods", "configs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", choices=KINDS, help="what to list (default: everything)")


def run(args) -> int:
    for kind in [args.kind] if args.kind else KINDS:
        print(f"{kind}:")
        for name, about in _entries(kind).items():
            print(f"  {name:<16} {about}")
    return 0


def _entries(kind: str) -> dict[str, str]:
    if kind == "models":
        return MODELS.describe()
    if kind == "datasets":
        return DATASETS.describe()
    if kind == "methods":
        return SEARCHERS.describe()
    return {name: _first_comment(path) for name, path in shipped_configs().items()}


def _first_comment(path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
