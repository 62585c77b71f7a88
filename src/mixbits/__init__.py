"""mixbits: mixed-precision quantization search for PyTorch networks."""

from .errors import MixbitsError
from .space import Policy, SearchSpace, parse_policy

__version__ = "0.1.0"

__all__ = ["MixbitsError", "Policy", "SearchSpace", "parse_policy", "__version__"]
