"""The options of ``--method oneshot`` and their validation (one error naming every bad value)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MixbitsError
from ...train.optim import OPTIMIZERS
from ..diff_options import fraction, is_int, is_number, non_negative, one_of, positive

UNSTABLE_SCALES = ("power", "inverse")
IDM_FORMS = ("paper", "mse")
COST_TERMS = ("budget", "bitops")
MOVES = ("layer", "separate")
SCORE_BN = ("batch", "recalibrate", "pair")
LARGEST = ("train", "teach", "off")


@dataclass
class OneshotOptions:
    # supernet training (through mixbits.train.fit) --------------------------------------------------------
    epochs: int = 10  # supernet epochs; 0 searches the calibrated float-initialised model as it is
    lr: float = 0.01  # starts from float weights, so a fine-tuning rate (the paper: 0.04 from its own start)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 2.5e-5  # the paper's value
    warmup_epochs: float = 0.0  # linear lr warm-up, then cosine to 0
    grad_clip: float | None = 1.0  # clip each step's gradient norm (None: no clip). Ours: at 2-3 bits a heavy-tailed
    #   layer's fitted per-tensor step rounds whole channels to 0, and the BatchNorm after it divides their ~0 spread
    #   by sqrt(eps); the sensitivity toy's latent weights then took gradients of 130-650 (0.1-1.2 at higher bits),
    #   which wrecked every policy the weights serve (tests/test_sensitivity.py; docs/search.md)
    policies_per_step: int = 1  # K sampled policies per step, gradients accumulated before one update
    largest: str = "teach"  # the all-highest policy on a sandwich step: "train" it with the task loss (in-place
    #   distillation teacher, a pass with backward); "teach": run it forward only (no gradient) for the distillation
    #   and IDM targets, about a third of a pass (default, ours: its weights are every policy's and the others train
    #   them; front-state/teach/README.md); "off": no teacher (no distillation; IDM still gets its targets) ...
    train_smallest: bool = True  # ... and the all-lowest available policy (the "sandwich rule") ...
    sandwich_every: int = 2  # ... on one step in this many; the other steps train the K sampled policies alone
    #   (task loss only). Default: 1.5 trained passes and 0.5 forward-only a step on average; the released code runs
    #   largest + 3 sampled, 4 passes, and policies_per_step 2 with sandwich_every 1 is our sandwich form of that
    distill: float = 0.5  # sampled policies: (1 - distill)·CE + distill·KL to the largest policy's output
    # bit-width scheduler (Eq. 6-7) ---------------------------------------------------------------------------
    scheduler: bool = True
    epsilon: float = 0.25  # ε of Eq. 6: a weight within ε·γ/2 of a quantization bound is unstable
    unstable_scale: str = "power"  # weight of bit-width b in Eq. 6: "power" 1/2^(b-1) (paper), "inverse" 1/b
    freeze_ratio_start: float = 0.5  # K = ratio·L at the first freezing event ...
    freeze_ratio_end: float = 0.2  # ... falling on a cosine to this ratio at the last event
    freeze_start: float = 0.1  # fraction of training before the first event (all bit-widths train)
    freeze_period: float = 0.1  # fraction of training between events (one period)
    # information distortion mitigation (Eq. 8) -----------------------------------------------------------
    idm: bool = True
    idm_weight: float = 0.1  # weight of the alignment loss
    idm_form: str = "paper"  # "paper": normalised, learnable affine, max floor; "mse": plain MSE of raw outputs
    idm_floor: float = 0.0  # Q of Eq. 8
    # fairness weight regularisation ------------------------------------------------------------------------
    fairness: bool = True  # no weight decay from passes in which a layer ran at its smallest weight bits
    # bidirectional greedy search (Eq. 9) ---------------------------------------------------------------------
    lam: float = 1.5  # λ of Eq. 9
    bidirectional: bool = True  # False: descending moves only
    moves: str = "layer"  # "layer": a layer's w and a move together (2L neighbours, paper); "separate": 4L
    start: int | str = "auto"  # start policy: "auto" (ours), the lowest uniform W k A k above every budget; "highest"
    #   (the paper); or a bit-width k. Auto scores fewer policies: those a walk from the highest scores fit no budget
    #   (searcher.py; docs/search.md for what it changed on the fronts)
    stride: float = 0.1  # a step moves up to this fraction of the searchable layers (at least one): the best move,
    #   then the same step's next-best descents, until the budget holds (greedy.py); 0: one move a step (paper).
    #   A fill round likewise takes up to as many raises
    max_steps: int | None = None  # bidirectional steps per budget before descending only (None: 2 x descents)
    cost_term: str = "budget"  # cost in J: "budget" (Σ cost/cap over the budget's caps) or "bitops" (paper)
    continue_path: bool = True  # a budget continues the path of an earlier one with the same cost term
    fill: bool = True  # after the walk, raise w or a one step at a time, lowest loss first, while the budget holds
    #   (a round takes up to the stride's count of raises on different layers, each while the budget holds)
    eval_batches: int = 2  # validation batches per score
    eval_samples: int | None = 1024  # at most this many of their images per score (None: the whole batches);
    #   benchmarks/experiments/score_stability.py: two scorings of a walk step's moves on 256 images rank them alike at
    #   Spearman ρ 0.45, on 1024 at 0.72 (ResNet-20)
    screen_samples: int | None = 128  # a step first scores every neighbour on this many of the scored images ...
    screen_keep: float = 0.15  # ... and re-scores this share of them (at least 3), ranked best, on all of them;
    #   None: every neighbour on all (the paper). benchmarks/experiments/score_stability.py --screen measures what
    #   it keeps
    bn_batches: int = 2  # training batches for BatchNorm recalibration per score (score_bn: recalibrate)
    score_bn: str = "batch"  # BatchNorm: "batch" (each scored batch's own statistics), "recalibrate", or "pair"
    #   (one BatchNorm per (w, a) pair of the layer before it, trained with the supernet; scores use its statistics)
    reuse_prefix: bool = True  # score_bn "batch": a neighbour replays the blocks it shares with the current policy
    save_supernet: bool = True  # with a run directory, write the trained weights to oneshot_supernet.pt
    keep_weights: bool = False  # a fine-tune starts from the supernet's weights, not the float model's (ours: the
    #   paper retrains nothing); written per budget to <run_dir>/searched/ (search/searched.py)
    random_baseline: bool = False  # also score random policies on the supernet with the walks' scorer and compute;
    #   the best per budget in info["random_baseline"] (oneshot/random_baseline.py)


def check_options(opts: OneshotOptions, candidates: tuple[int, ...]) -> None:
    """Raise one MixbitsError listing every bad option, its value and what it must be."""
    start_ok = opts.start in ("highest", "auto") or (is_int(opts.start) and opts.start in candidates)
    rules = [
        ("epochs", is_int(opts.epochs) and opts.epochs >= 0, "a whole number >= 0"),
        ("lr", positive(opts.lr), "a number > 0"),
        ("optimizer", one_of(opts.optimizer, OPTIMIZERS), f"one of {list(OPTIMIZERS)}"),
        ("momentum", is_number(opts.momentum) and 0 <= opts.momentum < 1, "a number in [0, 1)"),
        ("weight_decay", non_negative(opts.weight_decay), "a number >= 0"),
        ("warmup_epochs", non_negative(opts.warmup_epochs)
         and (not is_number(opts.epochs) or opts.warmup_epochs <= opts.epochs), "a number in [0, epochs]"),
        ("grad_clip", opts.grad_clip is None or positive(opts.grad_clip), "a number > 0, or null for no clip"),
        ("policies_per_step", is_int(opts.policies_per_step) and opts.policies_per_step >= 1, "a whole number >= 1"),
        ("largest", one_of(opts.largest, LARGEST), f"one of {list(LARGEST)}"),
        ("train_smallest", isinstance(opts.train_smallest, bool), "true or false"),
        ("sandwich_every", is_int(opts.sandwich_every) and opts.sandwich_every >= 1, "a whole number >= 1"),
        ("distill", fraction(opts.distill, closed=True), "a number in [0, 1]"),
        ("scheduler", isinstance(opts.scheduler, bool), "true or false"),
        ("epsilon", fraction(opts.epsilon, closed=True), "a number in [0, 1]"),
        ("unstable_scale", one_of(opts.unstable_scale, UNSTABLE_SCALES), f"one of {list(UNSTABLE_SCALES)}"),
        ("freeze_ratio_start", fraction(opts.freeze_ratio_start, closed=True), "a number in [0, 1]"),
        ("freeze_ratio_end", fraction(opts.freeze_ratio_end, closed=True), "a number in [0, 1]"),
        ("freeze_start", is_number(opts.freeze_start) and 0 <= opts.freeze_start < 1, "a number in [0, 1)"),
        ("freeze_period", is_number(opts.freeze_period) and 0 < opts.freeze_period <= 1, "a number in (0, 1]"),
        ("idm", isinstance(opts.idm, bool), "true or false"),
        ("idm_weight", non_negative(opts.idm_weight), "a number >= 0"),
        ("idm_form", one_of(opts.idm_form, IDM_FORMS), f"one of {list(IDM_FORMS)}"),
        ("idm_floor", is_number(opts.idm_floor), "a number (or -1.0e9 for no floor)"),
        ("fairness", isinstance(opts.fairness, bool), "true or false"),
        ("lam", non_negative(opts.lam), "a number >= 0"),
        ("bidirectional", isinstance(opts.bidirectional, bool), "true or false"),
        ("moves", one_of(opts.moves, MOVES), f"one of {list(MOVES)}"),
        ("start", start_ok, f"'highest', 'auto' or one of the shared candidate bit-widths {list(candidates)}"),
        ("stride", fraction(opts.stride, closed=True), "a number in [0, 1]"),
        ("max_steps", opts.max_steps is None or (is_int(opts.max_steps) and opts.max_steps >= 0),
         "a whole number >= 0, or null for twice the descents to the lowest bits"),
        ("cost_term", one_of(opts.cost_term, COST_TERMS), f"one of {list(COST_TERMS)}"),
        ("continue_path", isinstance(opts.continue_path, bool), "true or false"),
        ("fill", isinstance(opts.fill, bool), "true or false"),
        ("eval_batches", is_int(opts.eval_batches) and opts.eval_batches >= 1, "a whole number >= 1"),
        ("bn_batches", is_int(opts.bn_batches) and opts.bn_batches >= 0, "a whole number >= 0"),
        ("eval_samples", opts.eval_samples is None or (is_int(opts.eval_samples) and opts.eval_samples >= 1),
         "a whole number >= 1, or null for the whole batches"),
        ("screen_samples", opts.screen_samples is None or (is_int(opts.screen_samples) and opts.screen_samples >= 1),
         "a whole number >= 1, or null to score every neighbour on all the images"),
        ("screen_keep", is_number(opts.screen_keep) and 0 < opts.screen_keep <= 1, "a number in (0, 1]"),
        ("score_bn", one_of(opts.score_bn, SCORE_BN), f"one of {list(SCORE_BN)}"),
        ("reuse_prefix", isinstance(opts.reuse_prefix, bool), "true or false"),
        ("save_supernet", isinstance(opts.save_supernet, bool), "true or false"),
        ("keep_weights", isinstance(opts.keep_weights, bool) and not (opts.keep_weights and opts.score_bn == "pair"),
         "true or false, and false with score_bn 'pair' (its BatchNorms have no float counterpart to start from)"),
        ("random_baseline", isinstance(opts.random_baseline, bool), "true or false"),
    ]
    problems = [f"{name}: must be {expected}, got {getattr(opts, name)!r}" for name, ok, expected in rules if not ok]
    if problems:
        raise MixbitsError("invalid options for search method 'oneshot':\n  " + "\n  ".join(problems))
