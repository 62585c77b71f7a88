"""Deployment agreement on fine-tuned models: does the fast form lose top-1 where a user's model has been trained
at its policy, as every exported model is, rather than only calibrated?

    python benchmarks/deploy_finetuned.py [--models resnet20,mobilenetv2] [--policies W4A4,mixed,W8A8]
                                          [--samples 10000] [--check-samples 1000]

``deploy.py``'s models are calibrated without training (post-training quantization), so many of their
predictions sit on small margins; that is its stress case. Here each CNN (the front benchmark's trained float
ResNet-20 and MobileNetV2, medium preset) at each of ``deploy.py``'s policies is fine-tuned with the front's recipe
(``mixbits.finetune`` from the float model: fitted steps, SGD, distillation from the float model with kd_alpha 0.5,
2 epochs on 8,000 training images, seed 0; MobileNetV2 with its gradient clipping), then exported in both forms
and checked on ``--samples`` Fashion-MNIST test images. Per model and policy, each row is one set of weights,
labelled ``fine-tuned`` or ``PTQ`` (the policy calibrated as ``deploy.py`` does, on 256 of those training
images, and checked on the same test images):

- PyTorch's top-1, and each form's top-1 and top-1 agreement with PyTorch (under onnxruntime's default graph
  optimisations; the unoptimised session's too in the JSON); for the fast form, the images it and PyTorch
  classify differently right and wrong, and the exact McNemar p-value of that split (is its top-1 loss measurable);
- each layer alone on PyTorch's own input: its largest difference in levels of its 8-bit output (1/127 of its
  largest value) and the layer where it is largest;
- the fast form's own check with its default limits (``CHECK_LIMITS``) on the first ``--check-samples`` test images,
  as ``mixbits export`` runs it: passed, or the message it raised.

Fine-tuned weights are cached in benchmarks/cache/deploy-finetuned/ (per model, policy and recipe; the epoch
checkpoints there let an interrupted fine-tune resume), so a rerun only exports. Writes
benchmarks/results/deploy-finetuned-<model>.json and .md as each model finishes, with the command that made them.
No timing: the kernels and so the speed are ``deploy.py``'s, whatever the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, front_float_model, markdown_table, write_result  # noqa: E402
from deploy import default_session, policies  # noqa: E402
from export import SHAPE, _take  # noqa: E402
from front import MODEL_RECIPE, PRESETS, RECIPE, finetune_dir  # noqa: E402

import mixbits  # noqa: E402
from mixbits import SearchSpace  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.errors import MixbitsError  # noqa: E402
from mixbits.export import export_onnx  # noqa: E402
from mixbits.quant import apply_policy, calibrate, quantize_model  # noqa: E402
from mixbits.quant.attention import prepare_model  # noqa: E402

MODELS = ("resnet20", "mobilenetv2")
POLICIES = ("W4A4", "mixed", "W8A8")  # the first word of deploy.py's policy labels
CACHE = Path(__file__).parent / "cache" / "deploy-finetuned"  # not committed: fine-tuned weights, checkpoints
MEDIUM = PRESETS["medium"]  # the front's fine-tune: its training subset and epochs
TWO_DECIMALS = ("top1_torch", "exact_top1", "fast_top1", "fast_minus_torch", "exact_agreement_%", "fast_agreement_%")
# fast_lost/gained and fast_mcnemar_p are empty in rows measured before they were added
COLUMNS = ["model", "policy", "weights", "top1_torch", "exact_top1", "fast_top1", "fast_minus_torch",
           "fast_lost/gained", "fast_mcnemar_p", "exact_agreement_%", "fast_agreement_%", "exact_layer_levels",
           "fast_layer_levels", "fast_worst_layer", "default_check"]


def finetuned(name: str, float_model, space: SearchSpace, policy, train) -> torch.nn.Module:
    """``policy`` fine-tuned from ``float_model`` with the front's recipe; the weights are kept in CACHE."""
    recipe = {**RECIPE, **MODEL_RECIPE[name]}
    where = finetune_dir(CACHE, name, policy, {**recipe, "epochs": MEDIUM["finetune_epochs"], "seed": 0})
    weights, run_dir = where / "model.pt", where / "run"
    if weights.is_file():  # quantized at the policy as the fine-tune was, then its trained tensors
        model = mixbits.quantize(float_model, policy, _take(train, 256)[0], space=space)
        model.load_state_dict(torch.load(weights, map_location="cpu"))
        return model.eval()
    resume = (run_dir / "checkpoint.pt").is_file()  # else a run stopped before its first epoch: start it anew
    model = mixbits.finetune(float_model, policy, train, epochs=MEDIUM["finetune_epochs"], space=space, seed=0,
                             run_dir=run_dir, resume=resume, force=not resume, **recipe)
    torch.save(model.state_dict(), weights)
    return model.eval()


def calibrated(float_model, space: SearchSpace, policy, calib: torch.Tensor) -> torch.nn.Module:
    """The same policy as ``deploy.py`` quantizes it: calibrated steps, no training."""
    base = copy.deepcopy(float_model)
    prepare_model(base)
    model = apply_policy(quantize_model(base, space), policy)
    calibrate(model, calib)
    return model.eval()


def both_forms(model, batches, calib: torch.Tensor, tmp: Path) -> dict:
    """Each form exported and checked on every batch, with limits that never refuse (the figures are the result)."""
    out = {}
    for form in ("exact", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = export_onnx(model, SHAPE, tmp / f"{form}.onnx", check_inputs=batches, calibration=calib,
                            max_mismatch=1.0, min_agreement=0.0, form=form).check
        out.update({f"{form}_top1": round(c["top1_onnx"], 2), f"{form}_agreement_%": round(c["top1_agreement"], 2),
                    f"{form}_unoptimized_%": round(c["unoptimized"]["top1_agreement"], 2),
                    f"{form}_unoptimized_top1": round(c["unoptimized"]["top1_onnx"], 2),
                    f"{form}_differing": f"{c['differing_samples']}/{c['samples']}",
                    f"{form}_layer_levels": round(c["layer_max_levels"], 3), f"{form}_worst_layer": c["worst_layer"]})
        out["top1_torch"] = round(c["top1_torch"], 2)
    lost, gained = changed_answers(model, tmp / "fast.onnx", batches)
    out.update({"fast_lost/gained": f"{lost}/{gained}", "fast_mcnemar_p": round(mcnemar_p(lost, gained), 3)})
    return out


@torch.no_grad()
def changed_answers(model, path: Path, batches) -> tuple[int, int]:
    """(images PyTorch classifies right and the file, in a default onnxruntime session, wrong; the reverse)."""
    session = default_session(path)
    lost = gained = 0
    for x, y in batches:
        right_torch = model(x).argmax(1) == y
        right_file = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).argmax(1) == y
        lost += int((right_torch & ~right_file).sum())
        gained += int((right_file & ~right_torch).sum())
    return lost, gained


def mcnemar_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: how likely so uneven a split of the changed answers is if the file and
    PyTorch were equally accurate (each changed answer a fair coin); a top-1 difference is measurable when small."""
    n, k = lost + gained, min(lost, gained)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def default_check(model, batches, calib: torch.Tensor, tmp: Path) -> str:
    """What the fast form's check with its default limits says: its figures when it passes, else its message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = export_onnx(model, SHAPE, tmp / "checked.onnx", check_inputs=batches, calibration=calib,
                            form="fast").check
    except MixbitsError as e:
        return f"raised: {e}"
    return f"passed ({c['top1_agreement']:.1f} % agreement, {c['differing_samples']}/{c['samples']} differing)"


def measure_model(name: str, args, loaders, tmp: Path) -> list[dict]:
    train_loader, test_loader = loaders
    float_model = front_float_model(name)
    if float_model is None:
        raise MixbitsError(f"no trained float weights for {name!r} in benchmarks/front-state/{name}-medium/float.pt; "
                           f"run `python benchmarks/front.py --model {name} --preset medium` first")
    calib = _take(train_loader, 256)[0]
    x, y = _take(test_loader, args.samples)
    batches = list(zip(x.split(500), y.split(500), strict=True))
    checked = batches[:max(1, args.check_samples // 500)]
    space = SearchSpace.from_model(float_model, range(2, 9), range(2, 9))
    rows = []
    for label, policy in policies(space).items():
        if label.split()[0] not in args.policies:
            continue
        start = time.perf_counter()
        tuned = finetuned(name, float_model, space, policy, train_loader)
        tuned_s = round(time.perf_counter() - start, 1)
        for weights, model in (("fine-tuned", tuned), ("PTQ", calibrated(float_model, space, policy, calib))):
            start = time.perf_counter()
            row = {"model": name, "policy": label, "weights": weights, **both_forms(model, batches, calib, tmp),
                   "default_check": default_check(model, checked, calib, tmp)}
            row["export_seconds"] = round(time.perf_counter() - start, 1)
            if weights == "fine-tuned":
                row["finetune_or_load_seconds"] = tuned_s
            rows.append(row)
            print(f"  {name} {label} {weights}: torch {row['top1_torch']} %, exact {row['exact_top1']} % "
                  f"({row['exact_agreement_%']} % agree), fast {row['fast_top1']} % ({row['fast_agreement_%']} % "
                  f"agree, layers {row['fast_layer_levels']}); check: {row['default_check'][:90]} "
                  f"({row['export_seconds']} s)", flush=True)
    return rows


def markdown(result: dict) -> str:
    """The table of one model's results file (deploy-finetuned-<model>.json), top-1 to the image (two decimals)."""
    meta, load = result["meta"], result["loadavg"]
    rows = [{**r, "fast_minus_torch": r["fast_top1"] - r["top1_torch"]} for r in result["rows"]]
    rows = [{k: f"{v:.2f}" if k in TWO_DECIMALS else v for k, v in r.items()} for r in rows]
    lines = ["# Deployment agreement on fine-tuned models", "",
             f"`{result['command']}` at {meta['commit']} ({meta['date']}), onnxruntime {result['onnxruntime']}, "
             f"{result['samples']} Fashion-MNIST test images, load average {load['before']} before and "
             f"{load['after']} after. `fine-tuned`: `mixbits.finetune` from the front's float model with its recipe "
             "(fitted steps, kd_alpha 0.5, 2 epochs on 8,000 training images); `PTQ`: calibrated steps, no training, "
             "as `deploy.py`. `*_top1`: top-1 (%) on the test images (`top1_torch`: the PyTorch model; "
             "`fast_minus_torch`: the fast form's top-1 less PyTorch's, in points; `fast_lost/gained`: images PyTorch "
             "classifies right and the fast form wrong / the reverse; `fast_mcnemar_p`: exact McNemar p-value of "
             "that split); `*_agreement_%`: top-1 agreement "
             "of that form, as deployed (default optimisations), with PyTorch; `*_layer_levels`: each layer alone "
             "on PyTorch's input, its largest difference in levels of its 8-bit output; `default_check`: the fast "
             f"form's check with its default limits on the first {result['check_samples']} test images.", "",
             markdown_table(rows, COLUMNS), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10000, help="test images checked (default 10000)")
    parser.add_argument("--check-samples", type=int, default=1000,
                        help="test images of the default-limit check, as `mixbits export` (default 1000)")
    parser.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS))
    parser.add_argument("--policies", type=lambda v: v.split(","), default=list(POLICIES),
                        help="of W4A4, mixed, W8A8 (default all)")
    parser.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the Markdown tables again from the --models' results files")
    args = parser.parse_args()
    unknown = sorted(set(args.policies) - set(POLICIES)) + sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown {unknown}: --models takes {','.join(MODELS)}, --policies {','.join(POLICIES)}")
    if args.report_only:
        for name in args.models:
            report(RESULTS / f"deploy-finetuned-{name}.json")
        return
    before = [round(v, 2) for v in os.getloadavg()]
    data = DataConfig(root=args.data_dir, max_train_samples=MEDIUM["train_samples"], split_seed=0,
                      eval_batch_size=500)  # the front's training subset at seed 0
    train, _, test = build_loaders(data, 0)[:3]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:  # each model's own files: an interrupted run keeps the models it finished
            write(name, measure_model(name, args, (train, test), Path(tmp)), before, args)


def write(name: str, rows: list[dict], before: list[float], args) -> None:
    command = " ".join(["python benchmarks/deploy_finetuned.py", *sys.argv[1:]])
    path = write_result(f"deploy-finetuned-{name}", {
        "command": command, "samples": args.samples, "check_samples": args.check_samples,
        "onnxruntime": ort.__version__, "loadavg": {"before": before, "after": [round(v, 2) for v in os.getloadavg()]},
        "rows": rows})
    report(path)


def report(path: Path) -> None:
    """Write (and print) the Markdown table beside a results file."""
    text = markdown(json.loads(path.read_text()))
    print(text)
    path.with_suffix(".md").write_text(text)
    print(f"wrote {path} and {path.with_suffix('.md').name}")

if __name__ == "__main__":
    main()
