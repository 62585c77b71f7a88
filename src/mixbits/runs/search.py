"""A configured search run (what `mixbits search` runs): :func:`mixbits.search` per the config, then a
fine-tune run per found policy.

Under torchrun the search runs on rank 0 (with the global batch), its result is broadcast, and every
rank fine-tunes the found policies data-parallel (see docs/distributed.md).

The run directory's files are listed in docs/search.md; a re-run with resume reuses a finished search
and resumes unfinished fine-tuning runs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..api import search as search_model
from ..budget import check_feasible, parse_budgets
from ..compiler import fused_setting
from ..config import RunConfig
from ..cost import LatencyTable, average_bits, bitops, kept_float_layers, profile, size_bytes
from ..data import build_loaders
from ..data.batches import model_input
from ..errors import MixbitsError
from ..pipeline import float_card, resolve_checkpoint, search_space
from ..quant import set_fused
from ..search import SearchResult, method_problems
from ..space import Policy
from ..train import (
    barrier,
    broadcast_object,
    init_from_env,
    load_checkpoint,
    load_model_state,
)
from ..utils import atomic_write_text, read_json, seed_everything
from .ownership import owned_run
from .subnets import evaluate_subnets
from .train import train


def search(cfg: RunConfig, resume: bool = False, progress: bool | None = None, force: bool = False) -> list[dict]:
    """Search, then fine-tune each found policy; returns one summary row per budget.

    cfg.out must be new, empty or a search's (``force`` writes into another job's output anyway).

    Under torchrun (WORLD_SIZE > 1) rank 0 searches alone, on the loaders one process with the global
    batch would use, and broadcasts the result; every rank then fine-tunes each policy data-parallel.
    Only rank 0 writes. Every process returns the same rows.
    """
    cfg.validate(extra=method_problems(cfg.search.method))
    ctx = init_from_env(cfg.device)
    try:
        rows = _search(cfg, ctx, resume, progress, force)
        barrier()
    finally:
        ctx.cleanup()
    return rows


def _search(cfg: RunConfig, dist_ctx, resume: bool, progress: bool | None, force: bool) -> list[dict]:
    if cfg.init is None:
        raise MixbitsError("search needs a trained float model to start from: pass --init FLOAT_RUN "
                           "(train one with `mixbits train`)")
    with owned_run(cfg, "search", dist_ctx, force=force, resume=resume) as out:
        if (out / "search.json").exists() and not resume:
            raise MixbitsError(f"{str(out)!r} already holds a search; pass --resume to reuse it or choose another "
                               "--out")
        return _search_owned(cfg, dist_ctx, out, resume, progress)


def _search_owned(cfg: RunConfig, dist_ctx, out: Path, resume: bool, progress: bool | None) -> list[dict]:
    set_fused(fused_setting(cfg.quant.fused))
    seed_everything(cfg.train.seed)
    global_data = replace(cfg.data, batch_size=cfg.data.batch_size * dist_ctx.world_size)
    train_loader, val_loader, test_loader, train_set = build_loaders(global_data, cfg.train.seed)
    card = float_card(cfg.model, train_set.num_classes, train_set.in_chans, train_set.image_size)
    float_model = card.float_model()
    source = resolve_checkpoint(cfg.init)
    load_model_state(float_model, load_checkpoint(source)["model"], str(source))
    float_model.to(cfg.device).eval()
    example = model_input(next(iter(train_loader)))
    card.record_input(example)
    space = search_space(float_model, cfg.quant, example)
    stats = profile(float_model, example)
    latency = LatencyTable.load(cfg.search.latency_table) if cfg.search.latency_table else None
    budgets = parse_budgets(cfg.search.budget)
    for budget in budgets:
        check_feasible(budget, stats, space, latency)
    result = None
    if dist_ctx.is_main():
        cfg.save(out / "config.yaml")
        result = _load_or_search(out, resume, lambda: search_model(
            float_model, train_loader, budgets, cfg.search.method, val=val_loader,
            example_input=example, space=space, options=dict(cfg.search.options), run_dir=out,
            resume=resume, progress=progress, seed=cfg.train.seed, device=dist_ctx.device, latency_table=latency,
            per_channel=cfg.quant.per_channel))
    result = broadcast_object(result)
    policies = [Policy.from_dict(p) for p in result["policies"]]
    subnets = None
    if _finetune_epochs(cfg) == 0 and result.get("info", {}).get("supernet"):
        subnets = broadcast_object(_evaluate_subnets(cfg, out, result["info"]["supernet"], card, policies,
                                                     train_loader, test_loader, dist_ctx.device)
                                   if dist_ctx.is_main() else None)
    rows = [_finetune(cfg, out, i, budget, policy, stats, result, resume, progress)
            if subnets is None else {**_row(cfg, budget, policy, stats, result), **_subnet_fields(subnets[i])}
            for i, (budget, policy) in enumerate(zip(result["budgets"], policies, strict=True))]
    if dist_ctx.is_main():
        atomic_write_text(out / "result.json", json.dumps(rows, indent=2) + "\n")
    return rows


def _evaluate_subnets(cfg: RunConfig, out: Path, supernet: str, card, policies: list[Policy], train_loader,
                      test_loader, device) -> list[dict]:
    """Each policy on the supernet's weights, no retraining: subnets/budget<i>/ is a run eval and export read."""
    dirs = [out / "subnets" / f"budget{i}" for i in range(len(policies))]
    rows = evaluate_subnets(supernet, card, cfg.quant.per_channel, policies, train_loader, test_loader, dirs,
                            device=device)
    for run_dir in dirs:
        cfg.save(run_dir / "config.yaml")  # the data settings `mixbits eval` reads back
    return rows


def _load_or_search(out: Path, resume: bool, run_search: Callable[[], SearchResult]) -> dict:
    path = out / "search.json"
    if resume and path.is_file():
        return read_json(path, "search result", "remove it and pass --resume again to search anew (trained "
                         "supernet checkpoints are reused), or choose another --out")
    result = run_search().to_dict()
    atomic_write_text(out / "front.json", json.dumps(result.pop("front"), indent=1) + "\n")
    for i, policy in enumerate(result["policies"]):
        Policy.from_dict(policy).save(out / "policies" / f"budget{i}.json")
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def _finetune_epochs(cfg: RunConfig) -> int:
    return cfg.train.epochs if cfg.search.finetune_epochs is None else cfg.search.finetune_epochs


def _row(cfg: RunConfig, budget: str, policy: Policy, stats, result: dict) -> dict:
    w_avg, a_avg = average_bits(stats, policy)
    return {"method": cfg.search.method, "budget": budget, "bitops": bitops(stats, policy),
            "size_bytes": size_bytes(stats, policy), "avg_w_bits": w_avg, "avg_a_bits": a_avg,
            "search_seconds": result["seconds"], "policy": policy.describe(), "seed": cfg.train.seed,
            "kept_float": kept_float_layers(stats, policy)}


def _subnet_fields(subnet: dict) -> dict:
    return {"test_top1": subnet["test_top1"], "train_seconds": 0.0, "retraining_free": True,
            "run_dir": subnet["run_dir"]}


def _finetune(cfg: RunConfig, out: Path, i: int, budget: str, policy: Policy, stats, result: dict,
              resume: bool, progress) -> dict:
    """QAT of the found policy from the float model, with the method's own fine-tune settings (e.g. SDQ's
    distillation and bin regularisation) over the run's train settings."""
    epochs = _finetune_epochs(cfg)
    row = _row(cfg, budget, policy, stats, result)
    if epochs == 0:
        return {**row, "test_top1": None, "train_seconds": 0.0}
    run = copy.deepcopy(cfg)
    run.out = str(out / "finetune" / f"budget{i}")
    run.quant.policy = str(out / "policies" / f"budget{i}.json")
    run.train.epochs = epochs
    searched = result.get("info", {}).get("finetune_init")
    if searched:  # the method kept its searched weights (keep_weights): the fine-tune starts from them
        run.init = searched[i]
    for key, value in result.get("finetune", {}).items():
        if not hasattr(run.train, key):  # a searcher bug, never the user's
            raise RuntimeError(f"{cfg.search.method} asked for an unknown train setting {key!r} in its fine-tune")
        setattr(run.train, key, value)
    resumed = resume and (Path(run.out) / "checkpoint.pt").exists()
    trained = train(run, resume=resumed, progress=progress).result
    return {**row, "test_top1": trained["test_top1"], "train_seconds": trained["train_seconds"]}
