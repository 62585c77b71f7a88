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
import json
import sys

from ..rundir import add_force_argument
from ..runs.search import search
from ..train import Stopped, launch_rank, stop_on_signals
from .common import add_config_arguments, config_from_args


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
