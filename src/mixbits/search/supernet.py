"""Training a differentiable supernet through the shared loop, once per budget.

The weights train in ``mixbits.train.fit``; the architecture parameters have their own optimiser, stepped
by the ``ArchitectureStep`` hook after every weight step: with ``updates: alternating`` on a batch of
the architecture split (first-order bilevel, as DARTS), with ``updates: single`` from the gradients the
same loss already left on them. A method supplies a ``MethodSpec`` (how logits become mixing
probabilities, its loss) and returns a ``Derived`` policy; ``search_each_budget`` does the rest: fresh
architecture parameters and the same starting weights per budget, repair into the budget, the result.
With a run directory, each budget's training checkpoints every epoch under ``supernet/budget<i>/``
(weights, architecture parameters and their optimiser, the methods' hook states), and a resumed search
continues where it stopped: finished budgets reload their last checkpoint instead of training again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..budget import Budget
from ..data import BatchLoader
from ..data.datasets import split_train_val
from ..errors import MixbitsError
from ..quant import QuantLayer, quant_layers
from ..space import Policy
from ..train import Hook, StepOutput, TrainConfig, TrainState, fit
from ..train.loop import split_batch
from .base import SearchContext, SearchResult
from .convergence import automatic_rate, distribution_movement, recorded_rate, softmax_walk, warn_if_near_start
from .derive import fill, repair
from .diff_options import DifferentiableOptions
from .differentiable import ArchParams, ExpectedCost, LayerProbs, apply_mixture, clear_mixture, cost_ratios
from .searched import save_searched_weights, searched_dir
from .start import fitted_start


@dataclass
class BudgetSearch:
    """One budget's search: the model's searchable layers, fresh architecture parameters, the expected cost."""

    ctx: SearchContext
    arch: ArchParams
    layers: list[QuantLayer]  # in the order of arch.layers
    cost: ExpectedCost
    budget: Budget
    limits: dict[str, float]
    index: int  # of the budget in ctx.budgets

    def ratios(self, probs: LayerProbs) -> dict[str, Tensor]:
        """Expected cost over each cap of the budget."""
        return cost_ratios(self.cost(probs.pairs), self.limits)


ArchLoss = Callable[[TrainState, Tensor, LayerProbs], tuple[Tensor, dict]]


@dataclass
class MethodSpec:
    mixing: Callable[[TrainState], LayerProbs]  # the probabilities of the next forward (may be sampled)
    arch_loss: ArchLoss  # (state, task loss of the batch, probs) -> (task loss with cost terms, metrics)
    distribution: Callable[[], LayerProbs]  # the learned distribution, without sampling noise
    hooks: list[Hook] = field(default_factory=list)
    epoch_info: Callable[[TrainState], dict] | None = None  # extra per-epoch trace entries (temperature, ...)
    # d(K): how far a steadily pushed candidate's logit moves before its layer of K candidates counts as decided;
    # sets the automatic architecture rate (search/convergence.py)
    decisive_walk: Callable[[int], float] = softmax_walk


@dataclass
class Derived:
    policy: Policy  # before repair
    pair_probs: Tensor  # L×K: repair lowers the layers least sure of their choice first
    trace: dict = field(default_factory=dict)
    front: list[dict] = field(default_factory=list)
    candidate_weights: dict[str, list[Tensor]] | None = None  # per layer, one per weight bit-width (keep_weights)


def warmup_steps(state: TrainState, warmup: float) -> int:
    """The weight steps before the architecture starts to learn."""
    return round(warmup * state.cfg.epochs * state.steps_per_epoch)


def architecture_progress(state: TrainState, warmup: float) -> float:
    """Share of the architecture phase done: 0 until the weight warm-up ends, 1 at the search's last step."""
    start, total = warmup_steps(state, warmup), state.cfg.epochs * state.steps_per_epoch
    return min(1.0, max(0.0, (state.step - start) / max(1, total - start)))


class ArchitectureStep(Hook):
    """Steps the architecture optimiser after each weight step (after the warm-up) and keeps a per-epoch trace.

    The trace records the mean gradient norm reaching the lowest-bit candidates' logits (column 0), the
    mean probability of those candidates, the mean over layers of the largest pair probability (how decided
    the search is) and the expected cost over each cap.
    """

    def __init__(self, search: BudgetSearch, spec: MethodSpec, optimizer: torch.optim.Optimizer, arch_loader=None,
                 warmup: float = 0.0):
        self.search, self.spec, self.optimizer, self.arch_loader = search, spec, optimizer, arch_loader
        self.warmup = warmup
        self.params = list(search.arch.parameters())
        self._batches, self._arch_epoch, self._arch_taken = None, 0, 0
        self.history: list[dict] = []
        self._reset()

    def state_dict(self) -> dict:
        """Checkpointed with the weights at each epoch's end (the per-epoch sums are empty then)."""
        return {"arch": {k: v.detach().clone() for k, v in self.search.arch.state_dict().items()},
                "decided": dict(self.search.arch.decided), "optimizer": self.optimizer.state_dict(),
                "history": list(self.history), "arch_epoch": self._arch_epoch, "arch_taken": self._arch_taken}

    def load_state_dict(self, state: dict) -> None:
        self.search.arch.load_state_dict(state["arch"])
        self.search.arch.decided = {int(k): int(v) for k, v in state["decided"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self._batches, self._arch_epoch, self._arch_taken = None, state["arch_epoch"], state["arch_taken"]

    def _reset(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._count = 0

    def after_step(self, state: TrainState) -> None:
        if state.step <= warmup_steps(state, self.warmup):  # weights only; drop what a single loss left here
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.arch_loader is not None:
            x, y = self._next_batch(state.device)
            probs = self.spec.mixing(state)
            apply_mixture(self.search.layers, probs)
            loss, metrics = self.spec.arch_loss(state, self.search.ctx.task_loss(state.model, x, y)[0], probs)
            # Only the architecture gradients: the weights' own update is the loop's business.
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self._add(metrics)
        for name, logits in self.search.arch.named_logits().items():
            if logits.grad is not None:
                self._add({f"grad_lowest_{name}": logits.grad[:, 0].norm().detach()})
        self._count += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach() if isinstance(v, Tensor) else v
            self._sums[k] = self._sums.get(k, 0.0) + v

    def _next_batch(self, device: torch.device):
        """The architecture split's next batch; its epochs run on independently of the weights' epochs."""
        while True:
            if self._batches is None:
                if hasattr(self.arch_loader, "set_epoch"):
                    self.arch_loader.set_epoch(self._arch_epoch)
                self._batches = iter(self.arch_loader)
                for _ in range(self._arch_taken):  # after a resume: skip what the interrupted run used
                    next(self._batches)
            try:
                batch = next(self._batches)
                self._arch_taken += 1
                return split_batch(batch, device)
            except StopIteration:
                self._batches, self._arch_epoch, self._arch_taken = None, self._arch_epoch + 1, 0

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        with torch.no_grad():
            probs = self.spec.distribution()
            ratios = self.search.ratios(probs)
        entry = {"epoch": state.epoch + 1, **{k: float(v) / max(1, self._count) for k, v in self._sums.items()},
                 "p_lowest_w": float(probs.w[:, 0].mean()), "p_lowest_a": float(probs.a[:, 0].mean()),
                 "p_max": float(probs.pairs.max(dim=-1).values.mean()),
                 "arch_lr": self.optimizer.param_groups[0]["lr"],
                 **{f"expected_{m}_over_cap": float(r) for m, r in ratios.items()}}
        if self.spec.epoch_info is not None:
            entry.update(self.spec.epoch_info(state))
        self.history.append(entry)
        metrics.update({k: v for k, v in entry.items() if k != "epoch"})
        self._reset()


def split_for_architecture(loader, arch_fraction: float, seed: int):
    """(weight loader, architecture loader): a seeded split of the dataset, or of each epoch's batch positions.

    In-memory loaders split their samples once (a fixed, disjoint split, as DARTS); any other iterable of
    batches gives every ``1/arch_fraction``-th batch position to the architecture.
    """
    if isinstance(loader, BatchLoader) and loader.world_size == 1:
        weights, arch = split_train_val(loader.dataset, arch_fraction, seed)

        def make(ds, drop_last):
            return BatchLoader(ds, loader.batch_size, train=True, seed=loader.seed, augment=loader.augment,
                               drop_last=drop_last)

        return make(weights, loader.drop_last), make(arch, False)
    n = len(loader)
    if n < 2:
        raise MixbitsError(f"alternating updates need at least 2 training batches to split, got {n}; "
                           "use more data or the option updates: single")
    n_arch = min(n - 1, max(1, round(n * arch_fraction)))
    arch_positions = {(k + 1) * n // n_arch - 1 for k in range(n_arch)}
    return _Positions(loader, set(range(n)) - arch_positions), _Positions(loader, arch_positions, follow=False)


class _Positions:
    """The batches of ``loader`` at fixed positions of each pass."""

    def __init__(self, loader, positions: set[int], follow: bool = True):
        self.loader, self.positions, self.follow = loader, positions, follow

    def __len__(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        if self.follow and hasattr(self.loader, "set_epoch"):  # only one side may drive the shared loader
            self.loader.set_epoch(epoch)

    def __iter__(self):
        return (batch for i, batch in enumerate(self.loader) if i in self.positions)


def _arch_optimizer(params, opts: DifferentiableOptions, lr: float) -> torch.optim.Optimizer:
    if opts.arch_optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), weight_decay=opts.arch_weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opts.arch_weight_decay)


def architecture_rate(search: BudgetSearch, opts: DifferentiableOptions, spec: MethodSpec, weight_loader) -> float:
    """``opts.arch_lr``, or with null the automatic rate: a steadily pushed candidate decides its layer within
    ``decide_fraction`` of the architecture steps (one per weight step after the warm-up)."""
    if opts.arch_lr is not None:
        return opts.arch_lr
    arch = search.arch
    candidates = len(arch.pairs) if arch.joint else max(len(arch.w_bits), len(arch.a_bits))
    steps = opts.epochs * len(weight_loader) * (1.0 - opts.arch_warmup)
    return automatic_rate(spec.decisive_walk(candidates), steps, opts.decide_fraction)


def _objective(search: BudgetSearch, spec: MethodSpec, alternating: bool):
    def objective(state: TrainState, x: Tensor, y: Tensor) -> StepOutput:
        probs = spec.mixing(state)
        apply_mixture(search.layers, probs.detach() if alternating else probs)
        task, logits = search.ctx.task_loss(state.model, x, y)
        if alternating:  # the weight step: task loss only; the cost terms do not depend on the weights
            return StepOutput(task, logits)
        loss, metrics = spec.arch_loss(state, task, probs)
        return StepOutput(loss, logits, metrics)

    return objective


def train_supernet(search: BudgetSearch, opts: DifferentiableOptions, spec: MethodSpec) -> list[dict]:
    """Train weights and architecture parameters for ``opts.epochs``; returns the per-epoch trace."""
    ctx = search.ctx
    cfg = TrainConfig(epochs=opts.epochs, optimizer=opts.optimizer, lr=opts.lr, momentum=opts.momentum,
                      weight_decay=opts.weight_decay, seed=ctx.seed, compile=False)
    alternating = opts.updates == "alternating"
    weight_loader, arch_loader = (split_for_architecture(ctx.train_loader, opts.arch_fraction, ctx.seed)
                                  if alternating else (ctx.train_loader, None))
    optimizer = _arch_optimizer(search.arch.parameters(), opts, architecture_rate(search, opts, spec, weight_loader))
    step = ArchitectureStep(search, spec, optimizer, arch_loader, opts.arch_warmup)
    # checkpointed every epoch with the architecture state; `mixbits search --resume` continues it
    run_dir, resume = ctx.training_run(f"budget{search.index}")
    try:
        fit(ctx.model, weight_loader, cfg, objective=_objective(search, spec, alternating),
            hooks=[step, *spec.hooks], device=ctx.device, progress=ctx.progress, run_dir=run_dir, resume=resume)
    finally:
        clear_mixture(search.layers)
    return step.history


def search_each_budget(ctx: SearchContext, method: str, opts: DifferentiableOptions,
                       search_one: Callable[[BudgetSearch], Derived]) -> SearchResult:
    """Run ``search_one`` per budget from the same starting weights, repair each policy into its budget."""
    by_name = quant_layers(ctx.model)
    names = ctx.space.searchable
    if not names:
        raise MixbitsError(f"search method {method!r} has nothing to search: every quantized layer is fixed")
    layers = [by_name[n] for n in names]
    if opts.keep_weights:
        searched_dir(ctx, method)
    cost = ExpectedCost(ctx, ArchParams(names, ctx.space.w_bits, ctx.space.a_bits).pairs)
    policies, trace, front, searched = [], [], [], []
    with fitted_start(ctx) as start:  # every budget starts from these weights; the model is restored afterwards
        try:
            for index, budget in enumerate(ctx.budgets):
                ctx.model.load_state_dict(start)
                arch = ArchParams(names, ctx.space.w_bits, ctx.space.a_bits, joint=opts.joint).to(ctx.device)
                limits = budget.limits(ctx.stats, ctx.space, ctx.latency)
                found = search_one(BudgetSearch(ctx, arch, layers, cost, budget, limits, index))
                movement = distribution_movement(arch.layers, found.pair_probs, arch.pairs)
                warn_if_near_start(method, budget.text, movement, recorded_rate(found.trace.get("epochs", [])))
                policy, repaired = repair(ctx, arch, found.policy, budget, found.pair_probs)
                filled = []
                if opts.fill_budget:
                    policy, filled = fill(ctx, arch, policy, budget, found.pair_probs)
                policies.append(policy)
                trace.append({"budget": budget.text, **found.trace, "distribution": movement,
                              "near_start": movement["near_start"], "derived": found.policy.describe(),
                              "repair": repaired, "fill": filled, "policy": policy.describe(), **ctx.cost(policy)})
                front.extend(found.front)
                if opts.keep_weights:
                    searched.append(save_searched_weights(ctx, method, index, policy, found.candidate_weights))
        finally:
            clear_mixture(layers)
    info = {"options": asdict(opts), "near_start": [t["budget"] for t in trace if t["near_start"]]}
    if opts.keep_weights:
        info["finetune_init"] = searched
    return SearchResult(method, list(ctx.budgets), policies, trace=trace, front=front, info=info)
