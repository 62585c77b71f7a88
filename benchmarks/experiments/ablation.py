"""Ablations on the front benchmark's setting: switch one feature of a method off, compare at every budget.

    python benchmarks/experiments/ablation.py --method oneshot --preset quick  # scheduler off / IDM off / both on
    python benchmarks/experiments/ablation.py --method sdq --preset quick    # stage 2 with/without EBR, distillation
    python benchmarks/experiments/ablation.py --method dnas --preset quick   # shared / separate weights per bit-width

The float model, data, budgets and fine-tune recipe are those of ``benchmarks/front.py`` at the same
model and preset (the float weights are shared with it). oneshot: each variant runs its own search and
its policies are tested retraining-free. dnas: each variant searches, and its policies get the front's
one fine-tune. sdq: one search, then its policies are fine-tuned with SDQ's stage 2 with bin
regularisation and distillation on or off, so only stage 2 differs. Finished rows are cached like the
front's, in their own file (front-state/<model>-<preset>/ablation-<method>/). Writes
benchmarks/results/ablation-<method>-<model>-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS, STATE, Bench, RowCache  # noqa: E402

import mixbits  # noqa: E402
from mixbits.errors import TrainingDiverged  # noqa: E402

VARIANTS = {
    "oneshot": {"both on": {}, "scheduler off": {"scheduler": False}, "idm off": {"idm": False}},
    "dnas": {"shared": {}, "separate": {"weights": "separate"}},
    # SDQ's stage-2 settings, over the method's own: distillation weight and bin regularisation weight.
    "sdq": {"ebr + kd": {}, "no ebr": {"ebr_weight": 0.0}, "no kd": {"kd_alpha": 0.0},
            "neither": {"ebr_weight": 0.0, "kd_alpha": 0.0}},
}


def searched_variants(bench: Bench, method: str, seed: int) -> None:
    """oneshot and dnas: one search per variant of the method's options."""
    budgets = bench.budgets()
    for name, options in VARIANTS[method].items():
        label = f"{method}[{name}]"
        if all(bench.cache.get(label, b, seed) for b in budgets):
            continue
        try:
            result, search = bench.search(method, budgets, seed, options)
        except TrainingDiverged as e:  # a variant that does not train is a finding: recorded, the others still run
            bench.record_diverged_search([label], budgets, seed, e)
            continue
        train = bench.loaders(seed)[0]
        for i, (budget, policy) in enumerate(zip(budgets, result.policies, strict=True)):
            if method == "oneshot":  # the one-shot claim is retraining-free accuracy
                model = mixbits.subnet(result, i, bn_data=train, device=bench.device)
                seconds = {"finetune_seconds": 0.0, "finetune_passes": 0}
            else:
                model, seconds = bench.finetuned(policy, result.space, seed, f"{method}-{name}-b{i}-s{seed}")
            bench.record(bench.row(label, budget, seed, model, policy, {**search, **seconds}))


def stage2_variants(bench: Bench, seed: int) -> None:
    """sdq: the same found policies, fine-tuned under each stage-2 variant."""
    budgets = bench.budgets()
    labels = [f"sdq[{name}]" for name in VARIANTS["sdq"]]
    if all(bench.cache.get(label, b, seed) for label in labels for b in budgets):
        return
    try:
        result, search = bench.search("sdq", budgets, seed)
    except TrainingDiverged as e:
        bench.record_diverged_search(labels, budgets, seed, e)
        return
    for name, settings in VARIANTS["sdq"].items():
        for i, (budget, policy) in enumerate(zip(budgets, result.policies, strict=True)):
            if bench.cache.get(f"sdq[{name}]", budget, seed):
                continue
            stage2 = {**result.finetune, **settings}
            model, seconds = bench.finetuned(policy, result.space, seed, f"sdq-{name}-b{i}-s{seed}",
                                             teacher=copy.deepcopy(bench.float_model), **stage2)
            bench.record(bench.row(f"sdq[{name}]", budget, seed, model, policy,
                                   {**search, **seconds, **{k: stage2.get(k) for k in ("ebr_weight", "kd_alpha")}}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(VARIANTS), required=True)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--state-dir", default=str(STATE), help="the front benchmark's state (float weights, rows)")
    args = p.parse_args(argv)
    bench = Bench(argparse.Namespace(**vars(args), seeds=[args.seed], keep_stale=False))
    bench.cache = RowCache(bench.state / f"ablation-{args.method}", bench.cache.version)
    if args.method == "sdq":
        stage2_variants(bench, args.seed)
    else:
        searched_variants(bench, args.method, args.seed)
    rows = sorted(bench.cache.rows.values(), key=lambda r: (r["budget"], r["method"]))
    columns = ["method", "budget", "test_top1", "bitops", "search_seconds", "finetune_seconds"]
    if args.method == "sdq":
        columns[2:2] = ["ebr_weight", "kd_alpha"]
    table = markdown_table(rows, columns)
    name = f"ablation-{args.method}-{args.model}-{args.preset}"
    header = (f"{args.method} ablation, {args.model} preset {args.preset} ({bench.preset}); float "
              f"{bench.float_top1:.2f} %; seed {args.seed}; code {bench.cache.version}")
    write_report(name, header, table, {"args": vars(args), "preset": bench.preset, "rows": rows, "table": table},
                 directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
