"""Ablations on the pareto setting: switch one feature of a method off and compare at every budget.

    python benchmarks/ablation.py --method oneshot --preset quick   # scheduler off / IDM off / both on
    python benchmarks/ablation.py --method sdq --preset quick       # stage 2 with/without EBR and distillation
    python benchmarks/ablation.py --method dnas --preset quick      # shared / separate weights per bit-width

oneshot and dnas: each variant runs its own search (the options differ), exactly as the method's row
of benchmarks/pareto.py (oneshot tests its policies without retraining, dnas fine-tunes them). sdq: the
search runs once (the pareto run's, from the cache); each variant fine-tunes the same found policies
with EBR and distillation switched on or off, so only stage 2 differs. Writes
benchmarks/results/ablation-<method>-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_result  # noqa: E402
from pareto import CACHE, PRESETS, float_checkpoint, run_method, train_result  # noqa: E402

from mixbits.config import load_config  # noqa: E402
from mixbits.runs.train import train  # noqa: E402

VARIANTS = {
    "oneshot": {"both on": {}, "scheduler off": {"scheduler": False}, "idm off": {"idm": False}},
    "dnas": {"shared": {}, "separate": {"weights": "separate"}},
    # stage-2 train settings of the found policies: (ebr_weight, kd_alpha) None = the method's default
    "sdq": {"ebr + kd": {}, "no ebr": {"ebr_weight": 0.0}, "no kd": {"kd_alpha": 0.0},
            "neither": {"ebr_weight": 0.0, "kd_alpha": 0.0}},
}


def search_rows(args, preset: dict, fp: Path) -> list[dict]:
    """One search per variant of the method's options; the variant without options is the pareto run."""
    rows = []
    for name, options in VARIANTS[args.method].items():
        tag = "" if not options else name.replace(" ", "-")
        for row in run_method(args, preset, fp, args.method, args.seed, options=options, tag=tag):
            rows.append({**row, "variant": name})
    return rows


def sdq_rows(args, preset: dict, fp: Path) -> list[dict]:
    """Fine-tune the pareto run's SDQ policies at the W3A3 and W2A2 budgets under each stage-2 variant."""
    searched = run_method(args, preset, fp, "sdq", args.seed)  # reused from the cache when the pareto run made it
    search_dir = CACHE / f"pareto-{args.preset}" / f"sdq-s{args.seed}"
    base = load_config(search_dir / "config.yaml")
    defaults = {k: getattr(base.train, k) for k in ("ebr_weight", "kd_alpha")}
    stage2 = json.loads((search_dir / "search.json").read_text()).get("finetune", {})
    rows = []
    for name, settings in VARIANTS["sdq"].items():
        for i, found in enumerate(searched):
            if found["budget"] not in ("bitops<=uniform:2", "bitops<=uniform:3"):
                continue
            if not settings:  # the method's own stage 2 is the pareto row itself
                rows.append({**found, "variant": name, **{k: stage2.get(k, defaults[k]) for k in defaults}})
                continue
            cfg = copy.deepcopy(base)
            cfg.out = str(CACHE / f"ablation-{args.preset}" / f"sdq-{name.replace(' ', '-')}-b{i}-s{args.seed}")
            cfg.quant.policy = str(search_dir / "policies" / f"budget{i}.json")
            cfg.train.epochs = preset["finetune_epochs"]
            for key, value in {**stage2, **settings}.items():
                setattr(cfg.train, key, value)
            result = train(cfg, resume=(Path(cfg.out) / "checkpoint.pt").exists()).result
            rows.append({**found, "variant": name, "test_top1": result["test_top1"],
                         "train_seconds": result["train_seconds"], **{k: getattr(cfg.train, k) for k in defaults}})
            print(f"sdq {name} {found['budget']}: {result['test_top1']:.2f} %", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(VARIANTS), required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    fp = float_checkpoint(args, preset)
    rows = sdq_rows(args, preset, fp) if args.method == "sdq" else search_rows(args, preset, fp)
    columns = ["variant", "budget", "epochs", "test_top1", "bitops", "avg_w_bits", "avg_a_bits", "search_seconds",
               "train_seconds"]
    if args.method == "sdq":
        columns[1:1] = ["ebr_weight", "kd_alpha"]
    table = markdown_table(rows, columns)
    header = f"{args.method} ablation, preset {args.preset}: {preset}; float {train_result(fp):.2f} %; seed {args.seed}"
    print(f"\n{header}\n\n{table}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ablation-{args.method}-{args.preset}.md").write_text(f"{header}\n\n{table}\n")
    write_result(f"ablation-{args.method}-{args.preset}", {"args": vars(args), "preset": preset, "rows": rows,
                                                          "table": table})


if __name__ == "__main__":
    main()
