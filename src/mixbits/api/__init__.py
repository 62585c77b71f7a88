"""The library verbs: search, finetune, quantize, evaluate, export and subnet, on any nn.Module and data; and
quantize_weights, weight-only post-training quantization of a causal LM under a bits-per-weight budget.

The command line wraps exactly these; the zoo, the shipped datasets and the YAML configs are
conveniences on top.
"""

from ..data.batches import Batches
from .finetuning import FINETUNE_LR, finetune
from .model import evaluate, export, quantize, subnet
from .searching import search
from .weights import WeightQuantResult, quantize_weights

__all__ = ["FINETUNE_LR", "Batches", "WeightQuantResult", "evaluate", "export", "finetune", "quantize",
           "quantize_weights", "search", "subnet"]
