"""The options of ``--method sdq`` and their validation (one error naming every bad value)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MixbitsError
from ...space import SearchSpace
from ...train.optim import OPTIMIZERS
from ..diff_options import fraction, is_int, is_number, non_negative, one_of, positive
from ..differentiable import PENALTIES

DBP_OPTIMIZERS = ("adam", "sgd")


@dataclass
class SdqOptions:
    # search training (weights through mixbits.train.fit, DBPs by their own optimiser on the same loss) ------
    epochs: int = 10  # search epochs over the training data
    lr: float = 0.01  # weights: starts from the float model, so a fine-tuning rate (cosine to 0)
    optimizer: str = "sgd"  # weights: "sgd" (momentum, Nesterov) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dbp_lr: float | None = None  # DBPs; None (Adam only): the rate that lets a steadily pushed DBP walk a layer
    #   from its highest to its lowest candidate within descent_fraction of the search (Adam moves ~dbp_lr per step)
    dbp_optimizer: str = "adam"  # "adam" (betas 0.9, 0.999) or "sgd" (momentum 0.9)
    descent_fraction: float = 0.5  # sets the automatic dbp_lr (see there)
    # stochastic quantization and progressive removal ------------------------------------------------------------
    init_keep: float = 0.9  # keep-probability sigmoid(θ) a DBP starts from when its bit-width becomes current
    tau: float = 1.0  # temperature of the soft Gumbel-sigmoid sample (shapes the gradient only)
    threshold: float = 0.2  # a current bit-width whose keep-probability falls below this is removed for good
    stop_at_budget: bool = True  # end a budget's search once the current bits meet it (False: every epoch,
    #   removals going on with the regulariser off)
    # regulariser toward fewer bits: reg_weight · penalty(E[cost] / cap), on while the current bits exceed the budget
    reg_weight: float = 1.0
    penalty: str = "linear"  # "linear" r, "hinge" relu(r − 1), "squared" relu(r − 1)²; r = E[cost]/cap per cap
    # activations --------------------------------------------------------------------------------------------------
    search_activations: bool = True  # activation bit-widths get DBPs too, searched the same way (False: fixed)
    activation_bits: int | None = None  # search_activations false: the fixed bits; None: chosen per budget
    # stage 2: settings of every fine-tune of the found policies (0 turns each off) ------------------------------
    ebr_weight: float = 0.1  # train.ebr_weight: entropy-aware bin regularisation (mixbits.quant.ebr)
    kd_alpha: float = 0.5  # train.kd_alpha: distillation from the float model (the --init run)


def check_options(opts: SdqOptions, space: SearchSpace) -> None:
    """Raise one MixbitsError listing every bad option, its value and what it must be."""
    act = opts.activation_bits
    act_ok = act is None or (is_int(act) and act in space.a_bits and opts.search_activations is not True)
    act_expected = (f"null or one of the activation candidates {list(space.a_bits)}"
                    + (", and null unless search_activations is false (activations are searched by default)"
                       if opts.search_activations is True else ""))
    rules = [
        ("epochs", is_int(opts.epochs) and opts.epochs >= 1, "a whole number >= 1"),
        ("lr", positive(opts.lr), "a number > 0"),
        ("optimizer", one_of(opts.optimizer, OPTIMIZERS), f"one of {list(OPTIMIZERS)}"),
        ("momentum", is_number(opts.momentum) and 0 <= opts.momentum < 1, "a number in [0, 1)"),
        ("weight_decay", non_negative(opts.weight_decay), "a number >= 0"),
        ("dbp_lr", positive(opts.dbp_lr) or (opts.dbp_lr is None and opts.dbp_optimizer == "adam"),
         "a number > 0, or null for the automatic rate (dbp_optimizer: adam only)"),
        ("dbp_optimizer", one_of(opts.dbp_optimizer, DBP_OPTIMIZERS), f"one of {list(DBP_OPTIMIZERS)}"),
        ("descent_fraction", fraction(opts.descent_fraction, closed=True) and opts.descent_fraction > 0,
         "a number in (0, 1]"),
        ("init_keep", fraction(opts.init_keep), "a number strictly between 0 and 1"),
        ("tau", positive(opts.tau), "a number > 0"),
        ("threshold", fraction(opts.threshold) and (not fraction(opts.init_keep) or opts.threshold < opts.init_keep),
         "a number strictly between 0 and init_keep"),
        ("stop_at_budget", isinstance(opts.stop_at_budget, bool), "true or false"),
        ("reg_weight", non_negative(opts.reg_weight), "a number >= 0"),
        ("penalty", one_of(opts.penalty, PENALTIES), f"one of {list(PENALTIES)}"),
        ("search_activations", isinstance(opts.search_activations, bool), "true or false"),
        ("activation_bits", act_ok, act_expected),
        ("ebr_weight", non_negative(opts.ebr_weight), "a number >= 0 (0 turns EBR off)"),
        ("kd_alpha", fraction(opts.kd_alpha, closed=True), "a number in [0, 1] (0 turns distillation off)"),
    ]
    problems = [f"{name}: must be {expected}, got {getattr(opts, name)!r}" for name, ok, expected in rules if not ok]
    if problems:
        raise MixbitsError("invalid options for search method 'sdq':\n  " + "\n  ".join(problems))
