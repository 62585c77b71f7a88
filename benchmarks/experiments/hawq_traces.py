"""How steady are HAWQ's Hessian traces? Relative standard error against the number of batches.

    python benchmarks/hawq_traces.py --model resnet20 --max-batches 16

On the medium front's float model (benchmarks/front-state/<model>-medium/float.pt) and its 8,000 training
images, Hutchinson traces (16 Rademacher probes a batch of 128, the weight and the input activation of every
searchable layer) batch after batch, as ``mixbits.search.hutchinson.converged_traces`` takes them. Reports,
after 2 batches (the former fixed setting) and after every batch: the largest and the median relative standard
error over the layers' traces, and how alike two disjoint estimates rank the layers by weight trace per
parameter (Spearman ρ between batches 1-2 and 3-4, and between the first and second half of all the batches).
Writes benchmarks/results/hawq-traces-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # experiments/, benchmarks/
from arch_rate import float_model  # noqa: E402
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS  # noqa: E402

from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.search.hutchinson import KINDS, batch_traces  # noqa: E402
from mixbits.space import SearchSpace  # noqa: E402


def relative_errors(per_batch: list[dict]) -> list[float]:
    """Every trace's standard error (spread of the per-batch estimates over sqrt(batches)) over |trace|."""
    out = []
    for name in per_batch[0]:
        for kind in KINDS:
            values = [b[name][kind] for b in per_batch]
            spread = statistics.stdev(values) / len(values) ** 0.5
            if spread > 0:
                out.append(spread / abs(statistics.fmean(values)))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def per_parameter(per_batch: list[dict], sizes: dict[str, int]) -> list[float]:
    return [statistics.fmean(b[n]["weight"] for b in per_batch) / sizes[n] for n in sizes]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--max-batches", type=int, default=16)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = float_model(args.model)
    train = build_loaders(DataConfig(root=args.data_dir, max_train_samples=PRESETS["medium"]["train_samples"]), 0)[0]
    layers = SearchSpace.from_model(model).searchable
    sizes = {n: model.get_submodule(n).weight.numel() for n in layers}
    gen = torch.Generator().manual_seed(0)  # as hawq with seed 0
    per_batch, rows = [], []
    for batch in train:
        per_batch.append(batch_traces(model, batch, layers, args.probes, True, gen))
        n = len(per_batch)
        if n >= 2:
            errors = relative_errors(per_batch)
            rows.append({"batches": n, "probes": n * args.probes, "max_rse": max(errors),
                         "median_rse": statistics.median(errors), "traces_above_0.1": sum(e > 0.1 for e in errors),
                         "traces": len(errors)})
            print(rows[-1], flush=True)
        if n >= args.max_batches:
            break
    half = len(per_batch) // 2
    agreement = {"rho_2_vs_2": spearman(per_parameter(per_batch[:2], sizes), per_parameter(per_batch[2:4], sizes)),
                 f"rho_{half}_vs_{half}": spearman(per_parameter(per_batch[:half], sizes),
                                                   per_parameter(per_batch[half:2 * half], sizes))}
    header = (f"HAWQ trace steadiness, {args.model} medium float model, {args.probes} probes a batch of 128, seed 0; "
              f"{len(layers)} searchable layers, a weight and an input-activation trace each (traces: those with a "
              "spread; an exact zero has none). rse: standard error of the per-batch estimates' mean over |trace|. "
              "Spearman ρ of the layers' weight trace per parameter between disjoint batches: "
              + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()) + ".")
    write_report(f"hawq-traces-{args.model}", header, markdown_table(rows, list(rows[0])),
                 {"args": vars(args), "rows": rows, "agreement": agreement}, directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
