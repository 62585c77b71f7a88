"""Bit-width search methods: each registers itself in SEARCHERS (one file per method, one line here)."""

from . import dmpq, dnas, hawq, oneshot, random_search, sdq, ssps, uniform  # noqa: F401  (registration)
from .base import SEARCHERS, SearchContext, SearchResult, method_problems, run_searcher
from .evaluator import PolicyEvaluator
from .ilp import solve_choice

__all__ = ["SEARCHERS", "PolicyEvaluator", "SearchContext", "SearchResult", "method_problems", "run_searcher",
           "solve_choice"]
