"""``mixbits.search``: one call from a float model, data and a budget to one policy per budget."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..budget import Budget, check_feasible, parse_budgets
from ..cost import LatencyTable, profile
from ..data.batches import Batches, one_batch, to_device
from ..errors import AdvisedError, MixbitsError
from ..quant import calibrate, quantize_model
from ..rundir import claim_output_dir, record_settings
from ..search import SEARCHERS, SearchContext, SearchResult, run_searcher
from ..space import SearchSpace
from ..train.evaluate import LossFn
from ..utils import seed_everything
from .arguments import (
    check_device,
    check_int,
    check_mapping,
    check_model,
    check_optional_callable,
    check_path,
    check_trainable,
)
from .model import example_of, prepared_copy


def search(model: nn.Module, train: Iterable, budget: str | Budget | Sequence[Budget], method: str = "oneshot", *,
           val: Iterable | None = None, example_input=None, space: SearchSpace | None = None,
           options: dict | None = None, loss_fn: LossFn | None = None, run_dir: str | os.PathLike | None = None,
           resume: bool = False, progress: bool | None = None, seed: int = 0, device: str | torch.device = "cpu",
           latency_table: LatencyTable | str | os.PathLike | None = None, per_channel: bool = False,
           force: bool = False) -> SearchResult:
    """Find one policy per budget for the float ``model`` with ``method`` (see ``mixbits.list_methods()``).

    ``train``/``val``: iterables of batches (a DataLoader, or a list of ``(inputs, targets)`` tuples); ``val``
    scores policies and defaults to ``train``. ``budget``: ``"bitops<=uniform:2.5,uniform:3"`` as the CLI
    takes it, or Budget objects. ``example_input`` (default: the first batch's inputs) sizes the cost
    model and calibrates the quantizers. ``loss_fn(model, batch) -> loss`` replaces cross-entropy on
    ``(x, y)`` batches in every training and scoring pass of every method (with it, what needs logits, such
    as one-shot's distillation between policies, is skipped). ``space``: default every Conv2d/Linear,
    W2..6 A2..6, first and last fixed at 8/8. With ``run_dir`` the search checkpoints its training there and
    ``resume=True`` continues it. ``run_dir`` follows the command line's rules: it must be new, empty or a
    search's (``force=True`` writes into another job's directory anyway), one process holds it at a time, and
    a resume must ask for the method, budgets, options, seed and space it was started with (settings.json).

    The model is not changed. The result holds ``policies`` (one per budget), ``front`` (every scored
    point), ``trace``, ``space``, and ``model`` (the searched quantized model; a one-shot supernet whose
    policies :func:`mixbits.subnet` runs without retraining).
    """
    check_model(model)
    check_int(seed, "seed")
    check_optional_callable(loss_fn, "loss_fn")
    check_path(run_dir, "run_dir")
    check_device(device)
    check_mapping(options, "options")
    SEARCHERS.get(method)  # an unknown method fails here, naming the known ones, before any work
    check_trainable(model, method)
    seed_everything(seed)
    device = torch.device(device)
    train = Batches(train, "train")
    val = Batches(val, "val") if val is not None else train
    example = example_of(train, example_input)
    float_model = prepared_copy(model).to(device).eval()
    space = space if space is not None else SearchSpace.from_model(float_model, example_input=example)
    if not space.searchable:
        raise AdvisedError(f"nothing to search in {type(model).__name__}: all {len(space.layers)} quantized layer(s) "
                           f"are held fixed ({', '.join(space.fixed)}), so every method would return the same "
                           "policy", [("space=SearchSpace.from_model(model, fixed='none')", "--set quant.fixed=none")])
    stats = profile(float_model, example)
    latency = LatencyTable.load(latency_table) if isinstance(latency_table, (str, os.PathLike)) else latency_table
    budgets = _budgets(budget)
    for b in budgets:
        check_feasible(b, stats, space, latency)
    qmodel = quantize_model(float_model, space, per_channel=per_channel)
    with torch.no_grad():
        calibrate(qmodel, one_batch(to_device(example, device)))
    ctx = SearchContext(model=qmodel, space=space, stats=stats, budgets=budgets, train_loader=train, val_loader=val,
                        options=dict(options or {}), float_model=float_model, latency=latency,
                        run_dir=run_dir, device=device, seed=seed, progress=progress, resume=resume,
                        loss_fn=loss_fn, example_input=example)
    if run_dir is None:
        return run_searcher(method, ctx)
    with claim_output_dir(run_dir, "search", force=force, resume=resume, flag="run_dir"):
        record_settings(run_dir, {"method": method, "budgets": [b.text for b in budgets], "options": ctx.options,
                                  "seed": seed, "per_channel": per_channel, "space": space.to_dict()}, resume=resume,
                        force=force)
        return run_searcher(method, ctx)


def _budgets(budget) -> list[Budget]:
    if isinstance(budget, str):
        return parse_budgets(budget)
    if isinstance(budget, Budget):
        return [budget]
    budgets = list(budget) if isinstance(budget, (list, tuple)) else []
    if not budgets or not all(isinstance(b, Budget) for b in budgets):
        raise MixbitsError(f"budget must be a budget string such as 'bitops<=uniform:3' or Budget objects, "
                           f"got {budget!r}")
    return budgets
