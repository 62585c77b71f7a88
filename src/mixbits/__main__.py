"""The mixbits command line: a table of subcommands, each a module with add_arguments and run."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import cost, demo, evaluate, export, listing, lut, report, search, train
from .errors import AdvisedError, MixbitsError

COMMANDS = {
    "train": (train, "train a float model, or a quantized one at a policy (QAT)"),
    "search": (search, "find a policy per budget with a search method, then fine-tune each"),
    "eval": (evaluate, "evaluate a trained run on the test split"),
    "cost": (cost, "per-layer cost table (MACs, params, bits, BitOPs) of a model under a policy"),
    "report": (report, "Markdown and plots for a run or a benchmark result"),
    "export": (export, "export a quantized run: QDQ ONNX, packed integer weights, checked against PyTorch"),
    "lut": (lut, "measure a per-layer latency table on this machine"),
    "list": (listing, "list models, datasets, search methods and shipped configs"),
    "demo": (demo, "Fashion-MNIST end to end in a few minutes: float, uniform QAT, cost table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixbits", description="Mixed-precision quantization search for PyTorch.")
    parser.add_argument("--version", action="version", version=f"mixbits {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MixbitsError as e:
        message = e.for_cli() if isinstance(e, AdvisedError) else str(e)  # flags, not keyword arguments
        print(f"mixbits {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixbits {args.command}: interrupted; the last checkpoint is kept, continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
