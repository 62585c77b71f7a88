"""Do the differentiable searches decide within the medium preset's length? Fixed against automatic arch_lr.

    python benchmarks/arch_rate.py --models resnet20 mobilenetv2 --methods dnas ssps dmpq

Runs DNAS, SSPS and DMPQ as ``benchmarks/front.py``'s medium preset calls them (its float model from
benchmarks/front-state/<model>-medium/float.pt, 8,000 Fashion-MNIST training images, 1 search epoch) at one
budget and seed, once with the former fixed ``arch_lr: 0.01`` and once with the automatic rate (``arch_lr:
null``, ``mixbits.search.convergence``), and records how far the bit-width distributions moved (mean entropy
drop, mean largest pair probability), the architecture split's task loss at the end, how many layers repair
and fill (or DNAS's sampling) set away from the learned argmax, and how many layers' bits differ between
the two policies. A quick check
that the distributions move and the policies change, not a front: no fine-tuning, no test accuracy. Each
finished run is kept in benchmarks/cache/arch-rate/ so an interrupted run continues. Writes
benchmarks/results/arch-rate.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS, STATE  # noqa: E402

import mixbits  # noqa: E402
from mixbits.cost import bitops, profile  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.models import create  # noqa: E402
from mixbits.quant import set_fused  # noqa: E402
from mixbits.space import Policy  # noqa: E402

CACHE = Path(__file__).parent / "cache" / "arch-rate"
RATES = {"fixed 0.01": 0.01, "automatic": None}


def float_model(name: str) -> torch.nn.Module:
    model = create(name, num_classes=10, in_chans=1, width=PRESETS["medium"]["width"][name], **MODELS[name])
    model.load_state_dict(torch.load(STATE / f"{name}-medium" / "float.pt", map_location="cpu"))
    return model.eval()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--models, --data-dir and --threads, as the experiments on the medium float models take them."""
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def medium_batches(args: argparse.Namespace, count: int) -> list:
    """The first ``count`` batches of the medium preset's training images (seed 0), torch's threads set first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    train = build_loaders(DataConfig(root=args.data_dir, max_train_samples=PRESETS["medium"]["train_samples"]), 0)[0]
    return list(itertools.islice(iter(train), count))


def cache_path(model_name: str, method: str, rate: str, budget: str, seed: int, variant: str = "") -> Path:
    tag = f"-{variant}" if variant else ""
    return CACHE / f"{model_name}-{method}-{rate.replace(' ', '')}{tag}-{budget.replace(':', '')}-s{seed}.json"


def cached(model_name: str, method: str, rate: str, budget: str, seed: int, variant: str = "") -> dict | None:
    path = cache_path(model_name, method, rate, budget, seed, variant)
    return json.loads(path.read_text()) if path.is_file() else None


def restore_recorded_rows() -> None:
    """Put the rows of the recorded report back in the cache (the cache is not kept in the repository)."""
    recorded = EXPERIMENT_RESULTS / "arch-rate.json"
    if not recorded.is_file():
        return
    for row in json.loads(recorded.read_text())["rows"]:
        path = cache_path(row["model"], row["method"], row["rate"], row["budget"], row["seed"], row.get("variant", ""))
        if not path.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({k: v for k, v in row.items() if k != "layers_changed_by_rate"}, indent=1))


def run(model_name: str, method: str, rate: str, budget: str, seed: int, data_dir: str | None,
        variant: str = "", extra: dict | None = None) -> dict:
    """One search; its movement, loss and derivation figures (cached by its settings)."""
    done = cached(model_name, method, rate, budget, seed, variant)
    if done is not None:
        return done
    path = cache_path(model_name, method, rate, budget, seed, variant)
    model = float_model(model_name)
    train, val, _ = build_loaders(DataConfig(root=data_dir, max_train_samples=PRESETS["medium"]["train_samples"]),
                                  seed)[:3]
    options = {"epochs": PRESETS["medium"]["search_epochs"], "arch_lr": RATES[rate], **(extra or {})}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = mixbits.search(model, train, f"bitops<={budget}", method=method, val=val, options=options, seed=seed)
    trace = result.trace[0]
    last = trace["epochs"][-1]
    stats = profile(model, (1, 28, 28))
    cap = result.budgets[0].limits(stats, result.space)["bitops"]
    row = {"model": model_name, "method": method, "rate": rate, "variant": variant, "budget": budget, "seed": seed,
           "arch_lr": last["arch_lr"], "entropy_drop": trace["distribution"]["entropy_drop"],
           "p_max_mean": trace["distribution"]["p_max_mean"], "p_uniform": trace["distribution"]["p_uniform"],
           "near_start": trace["near_start"], "warned": any("near their uniform start" in str(w.message)
                                                             for w in caught),
           "arch_ce_end": last.get("ce"), "expected_bitops_over_cap": last.get("expected_bitops_over_cap"),
           "layers_off_argmax": sum(tuple(d["argmax"]) != result.policies[0][n]
                                    for n, d in trace["distribution"]["layers"].items()),
           "bitops_over_cap": float(bitops(stats, result.policies[0])) / cap,
           "argmax_policy_off": sum(tuple(d["argmax"]) != argmax_policy(result)[n]
                                    for n, d in trace["distribution"]["layers"].items()),
           "chosen": chosen(result),
           "policy": result.policies[0].to_dict(), "search_seconds": time.perf_counter() - started}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def chosen(result) -> str:
    """Which derived policy was returned: DNAS scores its argmax and its samples and keeps the best."""
    scored = [row for row in result.front if "sample" in row]
    if not scored:
        return "argmax"
    best = min(scored, key=lambda row: row["loss"])
    return "argmax" if best["argmax"] else f"sample {best['sample']}"


def argmax_policy(result) -> Policy:
    """The learned argmax after repair and fill: DNAS's first scored candidate, the others' returned policy."""
    row = next((row for row in result.front if row.get("argmax")), None)
    return Policy.from_dict(row["policy"]) if row is not None else result.policies[0]


def changed_layers(a: dict, b: dict) -> int:
    pa, pb = Policy.from_dict(a), Policy.from_dict(b)
    return sum(pa[n] != pb[n] for n in pa.bits)


def parse_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` method options (VALUE read as JSON where it parses: numbers, true, null)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r} (e.g. --set cost_scale=1.1)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--methods", nargs="+", choices=("dnas", "ssps", "dmpq"), default=["dnas", "ssps", "dmpq"])
    p.add_argument("--budget", default="uniform:2.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rates", nargs="+", choices=sorted(RATES), default=list(RATES),
                   help="run only these (the report holds every cached run of the chosen models and methods)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="method options for these runs, recorded as the row's variant (e.g. cost_scale=1.1)")
    p.add_argument("--report-only", action="store_true", help="write the report from the cached runs, run nothing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_fused(True)
    restore_recorded_rows()
    extra, variant = parse_settings(args.set), ",".join(args.set)
    for rate in [] if args.report_only else args.rates:  # in the order given: each finished run is cached
        for model_name in args.models:
            for method in args.methods:
                run(model_name, method, rate, args.budget, args.seed, args.data_dir, variant, extra)
    rows = []
    for model_name in args.models:
        for method in args.methods:
            found = [json.loads(f.read_text()) for f in sorted(CACHE.glob(f"{model_name}-{method}-*.json"))]
            found = [r for r in found if r["budget"] == args.budget and r["seed"] == args.seed]
            for variant in sorted({r.get("variant", "") for r in found}):
                pair = [next((r for r in found if r["rate"] == rate and r.get("variant", "") == variant), None)
                        for rate in RATES]
                differ = changed_layers(pair[0]["policy"], pair[1]["policy"]) if all(pair) else None
                rows += [{**r, "variant": variant, "layers_changed_by_rate": differ} for r in pair if r is not None]
    columns = ["model", "method", "rate", "variant", "arch_lr", "entropy_drop", "p_max_mean", "p_uniform",
               "near_start", "arch_ce_end", "expected_bitops_over_cap", "layers_off_argmax", "argmax_policy_off",
               "chosen", "layers_changed_by_rate", "search_seconds"]
    header = (f"DNAS/SSPS/DMPQ at the medium preset's length (8,000 images, 1 search epoch, width 1.0), budget "
              f"bitops<={args.budget}, seed {args.seed}: fixed arch_lr 0.01 against the automatic rate. variant: "
              "method options set for the run (DNAS's earlier default cost_scale was 10). entropy_drop: "
              "mean over layers of 1 - H_end/H_start of the (w, a) pair distribution (under 0.1: near_start, "
              "warned); p_max_mean: mean largest pair probability (p_uniform at the start); arch_ce_end: task loss "
              "on the architecture split in the last epoch; expected_bitops_over_cap: under the learned "
              "distribution; layers_off_argmax: searchable layers whose returned bits are not their most likely "
              "pair (set by repair, fill or, for DNAS, a sampled policy); argmax_policy_off: the same for the learned "
              "argmax after repair and fill (DNAS: before its samples compete; missing: not recorded then); chosen: "
              "the derived policy returned (DNAS: its argmax or one of its samples); layers_changed_by_rate: "
              "layers whose bits differ between the two rates' policies; search_seconds: wall time on a shared, "
              "loaded machine, not a timing. A missing rate: not run.")
    write_report("arch-rate", header, markdown_table(rows, columns), {"args": vars(args), "rows": rows},
                 directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
