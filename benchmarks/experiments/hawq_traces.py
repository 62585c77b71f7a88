"""How steady are HAWQ's Hessian traces? Relative standard error against the number of batches.

    python benchmarks/hawq_traces.py --model resnet20 --max-batches 16

On the medium front's float model (benchmarks/front-state/<model>-medium/float.pt) and its 8,000 training
images, Hutchinson traces (16 Rademacher probes a batch of 128, the weight and the input activation of every
searchable layer) batch after batch, as ``mixbits.search.hutchinson.converged_traces`` takes them. Reports,
after 2 batches (the former fixed setting) and after every batch: the largest and the median relative standard
error over the layers' traces, and how alike two disjoint estimates rank the layers by weight trace per
parameter (Spearman ρ between batches 1-2 and 3-4, and between the first and second half of all the batches);
the same for the error ``hawq``'s default stopping rule holds to the bound: each layer's share of the summed
sensitivity Ω (``search/hawq_stopping.py``), and at which batch count each rule would stop at bounds 0.1 and 0.2.
Writes benchmarks/results/hawq-traces-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # experiments/, benchmarks/
from arch_rate import float_model  # noqa: E402
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS  # noqa: E402

from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.quant import calibrate, quantize_model  # noqa: E402
from mixbits.search import SearchContext  # noqa: E402
from mixbits.search.hawq import HawqOptions, unit_errors  # noqa: E402
from mixbits.search.hawq_stopping import sensitivity_errors  # noqa: E402
from mixbits.search.hutchinson import KINDS, batch_traces  # noqa: E402
from mixbits.space import SearchSpace  # noqa: E402

BOUNDS = (0.1, 0.2)


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


def sensitivity_units(model, train, layers_space: SearchSpace):
    """HAWQ's squared quantization errors per element, on its default first batches (``hawq.unit_errors``)."""
    opts = HawqOptions()
    batches = list(itertools.islice(iter(train), opts.batches))
    qmodel = quantize_model(model, layers_space)
    calibrate(qmodel, batches[0][0])
    ctx = SearchContext(model=qmodel, space=layers_space, stats=None, budgets=[], train_loader=train, val_loader=None,
                        float_model=model)
    pairs = [(w, a) for w in layers_space.w_bits for a in layers_space.a_bits]
    return unit_errors(ctx, opts, batches), pairs


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def per_parameter(per_batch: list[dict], sizes: dict[str, int]) -> list[float]:
    return [statistics.fmean(b[n]["weight"] for b in per_batch) / sizes[n] for n in sizes]


def row(per_batch: list[dict], units, pairs, probes: int) -> dict:
    """After len(per_batch) batches: the traces' errors, and the sensitivity shares' over every candidate pair,
    over the tied ones (w = a) and with the weight terms alone at the lowest weight bits."""
    errors = relative_errors(per_batch)
    held = list(sensitivity_errors(per_batch, units, pairs).values())
    tied = list(sensitivity_errors(per_batch, units, [(w, a) for w, a in pairs if w == a]).values())
    no_act = {n: {"weight": u["weight"], "act": dict.fromkeys(u["act"], 0.0)} for n, u in units.items()}
    weight_only = list(sensitivity_errors(per_batch, no_act, pairs[:1]).values())
    n = len(per_batch)
    return {"batches": n, "probes": n * probes, "max_rse": max(errors), "median_rse": statistics.median(errors),
            "traces_above_0.1": sum(e > 0.1 for e in errors), "traces": len(errors),
            "max_sensitivity_rse": max(held), "median_sensitivity_rse": statistics.median(held),
            "layers_above_0.2": sum(e > 0.2 for e in held), "layers": len(held),
            "max_sensitivity_rse_tied": max(tied), "max_sensitivity_rse_weights": max(weight_only)}


def measure(args) -> dict:
    """Per-batch traces of the float model, and HAWQ's quantization errors per element."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = float_model(args.model)
    train = build_loaders(DataConfig(root=args.data_dir, max_train_samples=PRESETS["medium"]["train_samples"]), 0)[0]
    space = SearchSpace.from_model(model)
    units, pairs = sensitivity_units(model, train, space)
    gen = torch.Generator().manual_seed(0)  # as hawq with seed 0
    per_batch = []
    for batch in itertools.islice(iter(train), args.max_batches):
        per_batch.append(batch_traces(model, batch, space.searchable, args.probes, True, gen))
        print(f"batch {len(per_batch)}", flush=True)
    return {"per_batch": per_batch, "units": units, "pairs": pairs,
            "sizes": {n: model.get_submodule(n).weight.numel() for n in space.searchable}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--max-batches", type=int, default=16)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the recorded per-batch traces")
    args = p.parse_args(argv)
    name = f"hawq-traces-{args.model}"
    if args.report_only:
        data = json.loads((EXPERIMENT_RESULTS / f"{name}.json").read_text())
        args.probes, args.max_batches = data["args"]["probes"], data["args"]["max_batches"]
        data["units"] = {n: {k: {int(b): v for b, v in u.items()} for k, u in us.items()}
                         for n, us in data["units"].items()}
        data["pairs"] = [tuple(p) for p in data.get("pairs") or
                         itertools.product(*(sorted(next(iter(data["units"].values()))[k]) for k in ("weight", "act")))]
        if "sizes" not in data:  # recorded before the sizes were kept: the model has them
            model = float_model(args.model)
            data["sizes"] = {n: model.get_submodule(n).weight.numel() for n in data["units"]}
    else:
        data = measure(args)
    per_batch, units, pairs, sizes = data["per_batch"], data["units"], data["pairs"], data["sizes"]
    rows = [row(per_batch[:n], units, pairs, args.probes) for n in range(2, len(per_batch) + 1)]
    half = len(per_batch) // 2
    agreement = {"rho_2_vs_2": spearman(per_parameter(per_batch[:2], sizes), per_parameter(per_batch[2:4], sizes)),
                 f"rho_{half}_vs_{half}": spearman(per_parameter(per_batch[:half], sizes),
                                                   per_parameter(per_batch[half:2 * half], sizes))}
    rules = (("trace", "max_rse"), ("sensitivity", "max_sensitivity_rse"), ("tied", "max_sensitivity_rse_tied"),
             ("weights", "max_sensitivity_rse_weights"))
    stops = {f"{rule}<={bound}": next((r["batches"] for r in rows if r[column] <= bound), None)
             for rule, column in rules for bound in BOUNDS}
    header = (f"HAWQ trace steadiness, {args.model} medium float model, {args.probes} probes a batch of 128, seed 0; "
              f"{len(units)} searchable layers, a weight and an input-activation trace each (traces: those with a "
              "spread; an exact zero has none). rse: standard error of the per-batch estimates' mean over |trace|. "
              "sensitivity_rse: per layer the largest over the (w, a) candidates of the standard error of its share of "
              "the summed Ω over the larger of that share and 1/layers (hawq_stopping.py: the error `rse_of: "
              "sensitivity` holds to trace_rse); _tied: over the w = a candidates only; _weights: the weight terms "
              "alone at 2 bits. First batch count at which the largest error is within a bound "
              f"(none: not within {len(per_batch)}): " + ", ".join(f"{k} {v}" for k, v in stops.items()) + ". "
              "Spearman ρ of the layers' weight trace per parameter between disjoint batches: "
              + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()) + ".")
    write_report(name, header, markdown_table(rows, list(rows[0])),
                 {"args": vars(args), "rows": rows, "agreement": agreement, "stops": stops, "per_batch": per_batch,
                  "units": units, "pairs": pairs, "sizes": sizes}, directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
