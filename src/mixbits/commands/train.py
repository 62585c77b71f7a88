"""`mixbits train`: float pre-training, or quantization-aware training of a policy (uniform or from a file).

    mixbits train --model resnet20 --epochs 10 --out runs/fp
    mixbits train --policy uniform:4 --init runs/fp --epochs 5 --out runs/w4a4

Data-parallel on N processes (data.batch_size is then PER PROCESS; see docs/distributed.md):

    torchrun --standalone --nproc_per_node 8 -m mixbits train --device cuda --out runs/fp ...

SIGTERM stops training at the next step boundary with exit status 143, keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..rundir import add_force_argument
from ..runs.train import train
from ..train import Stopped, stop_on_signals
from .common import add_config_arguments, config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_force_argument(p)


def run(args) -> int:
    with stop_on_signals():
        try:
            outcome = train(config_from_args(args), resume=args.resume, force=args.force)
        except Stopped as e:
            print(f"mixbits train: {e}; the last checkpoint is kept, continue with --resume", file=sys.stderr)
            return e.exit_code
    if outcome.rank == 0:
        print(json.dumps(outcome.result, indent=2))
    return 0
