"""The library verbs: search, finetune, quantize, evaluate, export and subnet, on any nn.Module and data; and
(in .weights, loaded on first use as ``mixbits.quantize_weights``) weight-only post-training quantization of a
causal LM under a bits-per-weight budget.

The command line wraps exactly these; the zoo, the shipped datasets and the YAML configs are
conveniences on top.
"""

from ..data.batches import Batches
from .finetuning import FINETUNE_LR, finetune
from .model import evaluate, export, quantize, subnet
from .searching import search

__all__ = ["FINETUNE_LR", "Batches", "evaluate", "export", "finetune", "quantize", "search", "subnet"]
