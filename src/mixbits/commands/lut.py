"""`mixbits lut`: measure a latency table on this machine, for latency budgets and `mixbits cost`.

    mixbits lut runs/w4a4 --out lut.json
    mixbits lut --model resnet20 --input-shape 1,28,28 --out lut.json [--runtime torch] [--repeats 10]

Every layer of the search space (default: W2..6 A2..6, first and last layer at 8 bits) is timed at
every (w, a) it may take, alone, at batch 1: with onnxruntime, as the layer's ONNX subgraph in the form
`mixbits export` writes (--form; default exact, as the export's; fast: the integer kernels onnxruntime fuses), or with
--runtime torch, as the PyTorch layer's inference. Each entry
is the median of --repeats runs; the file is in the mixbits.latency/1 format that --latency-table reads.
An existing --out file is replaced only with --force.
"""

from __future__ import annotations

import argparse
import sys

from ..budget import reference_policy
from ..config import QuantConfig
from ..errors import MixbitsError
from ..models import create
from ..pipeline import load_trained, search_space
from ..rundir import add_force_argument, check_output_file
from ..space import DEFAULT_BITS
from .cost import _shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run directory or checkpoint (uses its model and input shape)")
    p.add_argument("--model", default="resnet20", help="registered model name (when no run is given)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W of one input sample (default: Fashion-MNIST)")
    p.add_argument("--out", required=True, help="where to write the table (JSON)")
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per entry (median; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before them (default 2)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--form", choices=("fast", "exact"), default="exact",
                   help="the export form timed (default exact, as mixbits export's; fast: its integer kernels)")
    p.add_argument("--opset", type=int, help="ONNX opset of the timed graphs (default: as mixbits export)")
    p.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)),
                   help="candidate bit-widths for weights and activations (default 2,3,4,5,6)")
    add_force_argument(p)


def run(args) -> int:
    from ..export import measure_latency_table

    check_output_file(args.out, force=args.force)  # before minutes of measuring, not after
    if args.run:
        _, card, _ = load_trained(args.run)
        model, shape = card.float_model(), card.example_input()
    else:
        shape = _shape(args.input_shape)
        model = create(args.model, num_classes=args.num_classes, in_chans=shape[0])
    bits = _bits(args.bits)
    space = search_space(model, QuantConfig(w_bits=bits, a_bits=bits), example_input=shape if args.run else None)
    print(f"timing {len(space.layers)} layers with {args.runtime} ...", file=sys.stderr)
    table = measure_latency_table(model, space, shape, runtime=args.runtime, repeats=args.repeats,
                                  warmup=args.warmup, threads=args.threads, opset=args.opset, form=args.form)
    table.save(args.out)
    entries = sum(len(e) for e in table.layers.values())
    print(f"wrote {args.out}: {entries} entries for {len(table.layers)} layers, in {table.unit}, on {table.device}")
    for b in bits:
        print(f"  uniform W{b}A{b}: {table.cost(reference_policy(space, b, b)):.4g} {table.unit}")
    return 0


def _bits(text: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        bits = []
    if not bits or min(bits) < 2 or max(bits) > 8:
        raise MixbitsError(f"--bits {text!r} must be comma-separated integers in 2..8, e.g. 2,3,4,5,6")
    return bits
