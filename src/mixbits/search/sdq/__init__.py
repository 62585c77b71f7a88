"""SDQ: stochastic differentiable quantization (options, DBPs and stochastic quantization, the searcher)."""

from .dbp import BitParams, drive, set_current_bits, straight_through_gumbel_sigmoid
from .options import SdqOptions, check_options
from .searcher import BudgetRun, DbpStep, activation_bits_for, sdq_search

__all__ = ["BitParams", "BudgetRun", "DbpStep", "SdqOptions", "activation_bits_for", "check_options", "drive",
           "sdq_search", "set_current_bits", "straight_through_gumbel_sigmoid"]
