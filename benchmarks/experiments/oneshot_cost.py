"""What a one-shot front costs against one uniform QAT run of the same epochs, as the training set grows.

    python benchmarks/experiments/oneshot_cost.py [--model resnet20] [--train-samples 8000 60000] [--epochs 1]
                                      [--starts highest auto] [--options '{"largest": "train"}']

The front benchmark's float model (benchmarks/front-state/<model>-medium/float.pt) is searched by one-shot at
the medium preset's five budgets (supernet training, then the walk and its fills: the whole retraining-free
front) and, from the same float model, fine-tuned at uniform W4A4 for the same epochs with the front's recipe
(:func:`mixbits.finetune`), both on the first N training images at seed 0. Each row gives the seconds and the
forward samples of both, and their ratios. The supernet's cost grows with the data and the walk's does not, so
the ratio is measured at several sizes and epochs rather than inferred. It times: run it on an otherwise idle
machine. Finished rows are kept in benchmarks/cache/oneshot-cost/ per code version (an interrupted run resumes
after them), and the report lists every row of the current code, so calls with other --epochs or --options add
to it (``--options``: one-shot options other than the defaults, e.g. to time a change beside them).
Writes benchmarks/experiments/results/oneshot-cost-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS as RESULTS  # noqa: E402
from common import front_float_model, markdown_table, metadata, write_result
from front import BUDGETS, MODEL_RECIPE, MODELS, RECIPE, CodeVersion, forward_counter  # noqa: E402

import mixbits  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402

CACHE = Path(__file__).parent / "cache" / "oneshot-cost"
COLUMNS = ["train_samples", "start", "epochs", "options", "search_seconds", "qat_seconds", "seconds_ratio",
           "search_samples", "qat_samples", "samples_ratio", "supernet_seconds", "walk_seconds"]


def timed(model_class: type, run) -> tuple[object, float, int]:
    """(what ``run()`` returns, its seconds, the samples it put through the whole network)."""
    started = time.perf_counter()
    with forward_counter(model_class) as passes:
        out = run()
    return out, time.perf_counter() - started, passes["samples"]


def measure(model: torch.nn.Module, name: str, samples: int, start: str, epochs: int, options: dict) -> dict:
    train, val = build_loaders(DataConfig(max_train_samples=samples), 0)[:2]
    budgets = ",".join(f"bitops<={b}" for b in BUDGETS)
    result, search_s, search_n = timed(type(model), lambda: mixbits.search(
        model, train, budgets, method="oneshot", val=val, options={**options, "epochs": epochs, "start": start}, seed=0,
        progress=False))
    supernet_s = sum(e["seconds"] for stage in result.trace if stage.get("stage") == "supernet"
                     for e in stage.get("epochs", []))
    _, qat_s, qat_n = timed(type(model), lambda: mixbits.finetune(
        model, "uniform:4", train, epochs=epochs, seed=0, progress=False, **{**RECIPE, **MODEL_RECIPE[name]}))
    return {"train_samples": samples, "start": start, "epochs": epochs, "options": _label(options),
            "search_seconds": round(search_s, 1),
            "qat_seconds": round(qat_s, 1), "seconds_ratio": round(search_s / qat_s, 2), "search_samples": search_n,
            "qat_samples": qat_n, "samples_ratio": round(search_n / qat_n, 2), "supernet_seconds": round(supernet_s, 1),
            "walk_seconds": round(search_s - supernet_s, 1), "threads": torch.get_num_threads()}


def _label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"


def _label_of(row: dict) -> str:
    return row.get("options", "defaults")  # rows from before --options ran at the defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--train-samples", type=int, nargs="+", default=[8000, 60000])
    parser.add_argument("--epochs", type=int, default=1, help="supernet epochs, and the QAT run's")
    parser.add_argument("--starts", nargs="+", default=["highest", "auto"], help="one-shot's walk starts")
    parser.add_argument("--options", type=json.loads, default={},
                        help="one-shot options other than the defaults, as JSON (not epochs or start)")
    args = parser.parse_args()
    if not isinstance(args.options, dict):
        raise SystemExit(f"--options: expected a JSON object such as '{{\"largest\": \"train\"}}', got "
                         f"{args.options!r}")
    if {"epochs", "start"} & set(args.options):
        raise SystemExit("--options: give epochs and start with --epochs and --starts")
    model = front_float_model(args.model)
    if model is None:
        raise SystemExit(f"no kept float weights for {args.model}: run benchmarks/front.py --model "
                         f"{args.model} --preset medium first")
    cache = CACHE / f"{args.model}-{CodeVersion()}.jsonl"
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    for samples in args.train_samples:
        for start in args.starts:
            key = (samples, start, args.epochs, _label(args.options))
            row = next((r for r in done if (r["train_samples"], r["start"], r["epochs"], _label_of(r)) == key), None)
            if row is None:
                row = measure(model, args.model, samples, start, args.epochs, args.options)
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
            print(json.dumps(row), flush=True)
    # the report holds every row this code has measured (other epochs and sizes from earlier calls too)
    rows = sorted(done, key=lambda r: (r["train_samples"], r["epochs"], r["start"], _label_of(r)))
    meta = metadata()
    text = "\n".join([f"# One-shot front against one uniform QAT run, {args.model}", "",
                      f"`python benchmarks/experiments/oneshot_cost.py --model {args.model}` "
                      f"(`--epochs E --train-samples N "
                      f"--starts S [--options O]` for each row) at {meta['commit']} ({meta['date']}, code "
                      f"{CodeVersion()}), {torch.get_num_threads()} threads. search: one-shot at the medium budgets "
                      f"({', '.join(BUDGETS)}), supernet then walk and fills; qat: uniform W4A4 fine-tuned for the "
                      "same epochs with the front's recipe; samples: forward samples through the whole network; "
                      "options: one-shot options other than the defaults. A QAT run of 1,000 optimiser steps or more "
                      "is compiled (train.compile: auto) and its epochs cost less than an eager run's; the "
                      "supernet, whose policy changes every step, always runs eager: compare ratios at the epochs "
                      "measured, not extrapolated from one epoch.", "",
                      markdown_table(rows, COLUMNS), ""])
    print(text)
    (RESULTS / f"oneshot-cost-{args.model}.md").write_text(text)
    print(f"wrote {write_result(f'oneshot-cost-{args.model}', {'model': args.model, 'rows': rows}, directory=RESULTS)}")


if __name__ == "__main__":
    main()
