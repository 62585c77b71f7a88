"""`mixbits search`: find a policy per budget with a search method, then fine-tune each through QAT.

    mixbits search --method hawq --init runs/fp --budget "bitops<=uniform:2,uniform:3,uniform:4" --out runs/hawq
    mixbits search --method random --init runs/fp --budget "bitops<=uniform:3;size<=80KB" --finetune-epochs 3

Under torchrun the search runs on rank 0 (with the global batch), its result is broadcast, and every
rank fine-tunes the found policies data-parallel (see docs/distributed.md):

    torchrun --standalone --nproc_per_node 8 -m mixbits search --device cuda --method hawq --init runs/fp ...

Writes to --out: search.json (method, budgets, policies, trace, seconds), front.json (every evaluated
point), policies/budget<i>.json, finetune/budget<i>/ (a `mixbits train` run per policy) and
result.json (one row per budget). A retraining-free method (oneshot) run with --finetune-epochs 0
instead tests each policy on the supernet's own weights after BatchNorm recalibration and writes
subnets/budget<i>/ (a checkpoint that eval and export read). Every budget is checked for feasibility
before anything runs; a re-run with --resume reuses a finished search and resumes unfinished
fine-tuning runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..budget import check_feasible, parse_budgets
from ..config import RunConfig
from ..cost import LatencyTable, average_bits, bitops, profile, size_bytes
from ..data import build_loaders
from ..errors import MixbitsError
from ..pipeline import float_card, resolve_checkpoint, search_space
from ..quant import calibrate, quantize_model, set_fused
from ..rundir import add_force_argument, check_output_dir, make_output_dir
from ..search import SearchContext, run_searcher
from ..space import Policy
from ..subnets import evaluate_subnets
from ..train import (
    Stopped,
    barrier,
    broadcast_object,
    init_from_env,
    launch_rank,
    load_checkpoint,
    load_model_state,
    stop_on_signals,
)
from ..utils import atomic_write_text, seed_everything
from .common import add_config_arguments, config_from_args
from .train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    g = p.add_argument_group("search")
    g.add_argument("--method", help="search method (search.method), see `mixbits list methods`")
    g.add_argument("--budget", help="budget(s) (search.budget), e.g. 'bitops<=uniform:2,uniform:3,uniform:4'")
    g.add_argument("--finetune-epochs", type=int, help="QAT epochs per found policy (search.finetune_epochs)")
    g.add_argument("--latency-table", help="latency table JSON for latency budgets (search.latency_table)")
    p.add_argument("--resume", action="store_true", help="reuse a finished search and resume fine-tuning runs")
    add_force_argument(p)


FLAGS = {"method": "search.method", "budget": "search.budget", "finetune_epochs": "search.finetune_epochs",
         "latency_table": "search.latency_table"}  # this command's flags -> settings, beside the common ones


def run(args) -> int:
    cfg = config_from_args(args, FLAGS)
    with stop_on_signals():
        try:
            rows = search(cfg, resume=args.resume, force=args.force)
        except Stopped as e:
            print(f"mixbits search: {e}; the last checkpoint is kept, continue with --resume", file=sys.stderr)
            return e.exit_code
    if launch_rank() == 0:
        print(json.dumps(rows, indent=2))
    return 0


def search(cfg: RunConfig, resume: bool = False, progress: bool | None = None, force: bool = False) -> list[dict]:
    """Search, then fine-tune each found policy; returns one summary row per budget.

    cfg.out must be new, empty or a search's (``force`` writes into another job's output anyway).

    Under torchrun (WORLD_SIZE > 1) rank 0 searches alone, on the loaders one process with the global
    batch would use, and broadcasts the result; every rank then fine-tunes each policy data-parallel.
    Only rank 0 writes. Every process returns the same rows.
    """
    cfg.validate()
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
    out = Path(cfg.out)
    if (out / "search.json").exists() and not resume:
        raise MixbitsError(f"{str(out)!r} already holds a search; pass --resume to reuse it or choose another --out")
    check_output_dir(out, "search", force=force, resume=resume)
    set_fused(cfg.quant.fused)
    seed_everything(cfg.train.seed)
    global_data = replace(cfg.data, batch_size=cfg.data.batch_size * dist_ctx.world_size)
    train_loader, val_loader, test_loader, train_set = build_loaders(global_data, cfg.train.seed)
    card = float_card(cfg.model, train_set.num_classes, train_set.in_chans, train_set.image_size)
    float_model = card.float_model()
    source = resolve_checkpoint(cfg.init)
    load_model_state(float_model, load_checkpoint(source)["model"], str(source))
    float_model.to(cfg.device).eval()
    space = search_space(float_model, cfg.quant)
    stats = profile(float_model, card.input_shape)
    latency = LatencyTable.load(cfg.search.latency_table) if cfg.search.latency_table else None
    budgets = parse_budgets(cfg.search.budget)
    for budget in budgets:
        check_feasible(budget, stats, space, latency)
    result = None
    if dist_ctx.is_main():
        make_output_dir(out, "search")
        cfg.save(out / "config.yaml")
        result = _load_or_search(cfg, out, resume, SearchContext(
            model=_quantized(float_model, space, cfg, next(iter(train_loader))[0]), space=space, stats=stats,
            budgets=budgets, train_loader=train_loader, val_loader=val_loader, options=dict(cfg.search.options),
            float_model=float_model, latency=latency, run_dir=out, device=dist_ctx.device,
            seed=cfg.train.seed, progress=progress, resume=resume))
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


def _quantized(float_model, space, cfg: RunConfig, batch: torch.Tensor):
    model = quantize_model(float_model, space, per_channel=cfg.quant.per_channel)
    calibrate(model, batch)
    return model


def _load_or_search(cfg: RunConfig, out: Path, resume: bool, ctx: SearchContext) -> dict:
    path = out / "search.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    result = run_searcher(cfg.search.method, ctx).to_dict()
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
            "search_seconds": result["seconds"], "policy": policy.describe(), "seed": cfg.train.seed}


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
    for key, value in result.get("finetune", {}).items():
        if not hasattr(run.train, key):  # a searcher bug, never the user's
            raise RuntimeError(f"{cfg.search.method} asked for an unknown train setting {key!r} in its fine-tune")
        setattr(run.train, key, value)
    resumed = resume and (Path(run.out) / "checkpoint.pt").exists()
    trained = train(run, resume=resumed, progress=progress).result
    return {**row, "test_top1": trained["test_top1"], "train_seconds": trained["train_seconds"]}
