"""mixbits: mixed-precision quantization search for PyTorch networks.

    import mixbits
    result = mixbits.search(model, train_loader, "bitops<=uniform:2.5,uniform:3", method="oneshot")
    qmodel = mixbits.finetune(model, result.policies[0], train_loader, epochs=10)
    mixbits.evaluate(qmodel, test_loader); mixbits.export(qmodel, "out/", example_input)

The verbs are imported here, not lazily: ``mixbits.search`` and ``mixbits.export`` are also packages, and a
lazy name would be shadowed by the package once anything imported it. ``quantize_weights`` (language models)
is the exception: no package shares its name, and the classifier workflow need not load the LM code.
"""

from .errors import MixbitsError
from .space import Policy, SearchSpace, parse_policy

__version__ = "0.1.0"

from .api import FINETUNE_LR, evaluate, export, finetune, quantize, search, subnet  # noqa: E402

_LAZY = {"quantize_weights": "api.weights", "WeightQuantResult": "api.weights",
         "SearchResult": "search.base", "Budget": "budget", "parse_budget": "budget", "parse_budgets": "budget",
         "profile": "cost", "bitops": "cost", "size_bytes": "cost"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mixbits' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def list_methods() -> list[str]:
    """The registered search methods (``method=`` of :func:`search`)."""
    from .search import SEARCHERS

    return SEARCHERS.names()


__all__ = ["FINETUNE_LR", "MixbitsError", "Policy", "SearchSpace", "__version__", "evaluate", "export", "finetune",
           "list_methods", "parse_policy", "quantize", "search", "subnet", *_LAZY]
