"""HAWQ-style search: Hessian-aware sensitivity per layer and candidate, then an exact integer program.

Sensitivity of layer l at (w, a), a second-order estimate of the loss increase:

    Ω(l, w, a) = ½ · tr(H_W)/n_W · ||Q_w(W) − W||²  +  ½ · tr(H_A)/n_A · ||Q_a(A) − A||²

with H_W, H_A the Hessians of the training loss with respect to the layer's weight and its input
activation (Hutchinson traces of the float model), Q_b the layer's quantizer at b bits with its MSE-fitted
step (``quant.fit``: LSQ's initial step would be 1.5x to 6.5x off the best error and flatten the ratios
between bit-widths), and A the layer's inputs on the first ``batches`` batches. The traces take batch after
batch (``probes`` Rademacher probes each) until every layer's relative standard error (the spread of the
per-batch estimates over sqrt(batches), over |trace|) is at most ``trace_rse``, or ``max_batches`` have been
used (then a warning names the layers still above); the result's ``info["traces"]`` records the batches,
probes, largest error and those layers, ``front`` each layer's errors. Follows HAWQ-V2/V3 (trace / parameter
count × quantization error, integer program over one or several budgets). Library choices: the activation
term (off with ``activations: false``), Rademacher probes, the error bound and cap, the fitted step, and a
negative trace estimate (probe noise, or curvature a second-order model cannot use) counting as 0, so more
bits never score worse. Traces are cached in the run
directory, keyed by the float weights and the options.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import MixbitsError
from ..quant import quant_layers
from ..quant.fit import fitted_error
from ..utils import atomic_write_text
from .base import SEARCHERS, SearchContext, SearchResult, method_options
from .costs import candidate_pairs, layer_cost_arrays, remaining_limits
from .diff_options import is_int, positive
from .hawq_stopping import Units, sensitivity, sensitivity_errors
from .hutchinson import converged_traces, layer_inputs
from .ilp import solve_choice

RSE_OF = ("sensitivity", "trace")


@dataclass
class HawqOptions:
    probes: int = 16  # Hutchinson probes per batch
    batches: int = 2  # training batches the activation errors average over, and the traces' first batches
    trace_rse: float | None = 0.2  # traces take batch after batch until every layer's relative standard error is
    #   at most this (None: exactly `batches` batches); docs/search.md, benchmarks/experiments/hawq_traces.py
    rse_of: str = "trace"  # the error held to the bound: each trace's, or ("sensitivity") each layer's share of the
    #   summed Ω the program compares (hawq_stopping.py; on ResNet-20 larger than the traces': docs/search.md)
    max_batches: int = 16  # ... or this many batches have been used (8x the former fixed 2)
    activations: bool = True  # include the activation term
    tied: bool = False  # only w == a candidates (HAWQ-V3's W4A4/W8A8-style choices)


def check_options(opts: HawqOptions) -> None:
    """Raise one MixbitsError naming every bad option, its value and what it must be."""
    rules = [
        ("probes", is_int(opts.probes) and opts.probes >= 1, "a whole number >= 1"),
        ("batches", is_int(opts.batches) and opts.batches >= 1, "a whole number >= 1"),
        ("trace_rse", opts.trace_rse is None or positive(opts.trace_rse),
         "a number > 0 (e.g. 0.1), or null for exactly `batches` batches"),
        ("rse_of", opts.rse_of in RSE_OF, f"one of {list(RSE_OF)}"),
        ("max_batches", is_int(opts.max_batches) and opts.max_batches >= 1
         and (not is_int(opts.batches) or opts.max_batches >= opts.batches), "a whole number >= batches"),
        ("activations", isinstance(opts.activations, bool), "true or false"),
        ("tied", isinstance(opts.tied, bool), "true or false"),
    ]
    problems = [f"{name}: must be {expected}, got {getattr(opts, name)!r}" for name, ok, expected in rules if not ok]
    if problems:
        raise MixbitsError("invalid options for search method 'hawq':\n  " + "\n  ".join(problems))


@SEARCHERS.register("hawq")
def hawq_search(ctx: SearchContext) -> SearchResult:
    """HAWQ-style: Hessian-trace sensitivity, then the exact integer program per budget (scipy milp)."""
    opts = method_options(HawqOptions, ctx.options, "hawq")
    check_options(opts)
    if ctx.float_model is None:
        raise MixbitsError("hawq needs the float model: run it through `mixbits search --init FLOAT_RUN`")
    layers = ctx.space.searchable
    batches = list(itertools.islice(iter(ctx.train_loader), opts.batches))
    pairs = candidate_pairs(ctx, opts.tied)
    units = unit_errors(ctx, opts, batches)
    estimate = _cached_traces(ctx, opts, units, pairs)
    traces = estimate["traces"]
    scores = np.array([[sensitivity(traces[n]["weight"], traces[n]["act"], units[n], w, a) for w, a in pairs]
                       for n in layers])
    base, arrays = layer_cost_arrays(ctx, pairs)
    policies, trace = [], []
    for budget in ctx.budgets:
        limits = remaining_limits(ctx, budget, base)
        choice = solve_choice(scores, {m: arrays[m] for m in limits}, limits, layers)
        policy = base
        for name, k in zip(layers, choice, strict=True):
            policy = policy.replace(name, *pairs[k])
        policies.append(policy)
        trace.append({"budget": budget.text, "objective": float(scores[np.arange(len(layers)), choice].sum()),
                      **ctx.cost(policy)})
    front = [{"layer": n, "trace_weight": traces[n]["weight"], "trace_act": traces[n]["act"],
              "rse_weight": _finite(estimate["rse"][n]["weight"]), "rse_act": _finite(estimate["rse"][n]["act"]),
              "rse_held": _finite(estimate["errors"][n]),
              "sensitivity": {f"w{w}a{a}": float(scores[i, k]) for k, (w, a) in enumerate(pairs)}}
             for i, n in enumerate(layers)]
    summary = {k: estimate[k] for k in ("batches", "probes", "converged", "above_bound")}
    summary["bound"], summary["rse_of"] = opts.trace_rse, opts.rse_of
    summary["max_rse"] = _finite(max(estimate["errors"].values(), default=0.0))
    if not estimate["converged"]:
        measured = "their traces" if opts.rse_of == "trace" else "their sensitivity shares"
        warnings.warn(f"hawq: after {estimate['batches']} batches ({estimate['probes']} probes) the Hessian traces "
                      f"of {len(estimate['above_bound'])} layer(s) ({', '.join(estimate['above_bound'][:5])}) still "
                      f"give {measured} a relative standard error above trace_rse={opts.trace_rse} (largest "
                      f"{summary['max_rse'] or math.inf:.3g}); raise max_batches or probes for a steadier ranking",
                      stacklevel=3)
    return SearchResult("hawq", list(ctx.budgets), policies, trace=trace, front=front,
                        info={"options": asdict(opts), "traces": summary})


def _finite(x: float) -> float | None:
    """A relative error for JSON: None where it is undefined (one batch, or a zero trace with spread)."""
    return x if math.isfinite(x) else None


def unit_errors(ctx: SearchContext, opts: HawqOptions, batches) -> Units:
    """Per layer and bit-width, the squared quantization error at the fitted step per element: the weight's, and
    the input activation's on ``batches`` (one step for every batch, as the deployed quantizer has); 0 for the
    activations with ``activations: false`` and for an embedding, whose token ids are not quantized."""
    qlayers = quant_layers(ctx.model)
    inputs = (layer_inputs(ctx.float_model, batches, ctx.space.searchable, ctx.device, ctx.loss_fn)
              if opts.activations else {})
    units: Units = {}
    with torch.no_grad():
        for name in ctx.space.searchable:
            layer = qlayers[name]
            weight = {b: fitted_error(layer.w_quant, layer.weight, b) / layer.weight.numel() for b in ctx.space.w_bits}
            act = {b: 0.0 for b in ctx.space.a_bits}
            if opts.activations and not layer.weight_only:
                acts = torch.cat(inputs[name])
                per_batch = inputs[name][0].numel() * len(inputs[name])
                act = {b: fitted_error(layer.a_quant, acts, b) / per_batch for b in ctx.space.a_bits}
            units[name] = {"weight": weight, "act": act}
    return units


def _cached_traces(ctx: SearchContext, opts: HawqOptions, units: Units, pairs) -> dict:
    """``converged_traces``'s estimate (with ``trace_rse`` null: exactly ``batches`` batches), cached."""
    key = _fingerprint(ctx, opts)
    path = ctx.run_dir / "hawq_traces.json" if ctx.run_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["estimate"]
    fixed = opts.trace_rse is None
    estimate = converged_traces(ctx.float_model, iter(ctx.train_loader), ctx.space.searchable, opts.probes,
                                opts.activations, ctx.seed, ctx.device, ctx.loss_fn, min_batches=opts.batches,
                                max_batches=opts.batches if fixed else opts.max_batches,
                                bound=math.inf if fixed else opts.trace_rse,
                                errors=((lambda per: sensitivity_errors(per, units, pairs))
                                        if opts.rse_of == "sensitivity" else None))
    if path is not None:
        atomic_write_text(path, json.dumps({"key": key, "estimate": estimate}, indent=1))
    return estimate


def _fingerprint(ctx: SearchContext, opts: HawqOptions) -> str:
    digest = hashlib.sha256(json.dumps([asdict(opts), ctx.seed, list(ctx.space.searchable)]).encode())
    for tensor in ctx.float_model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
