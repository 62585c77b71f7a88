"""`mixbits export RUN --out DIR`: a trained quantized run as QDQ ONNX and packed integer weights, checked.

    mixbits export runs/w4a4 --out export/w4a4 [--form fast|exact] [--opset 21] [--format onnx,packed]
                                               [--check-samples 1000]

Writes model.onnx (by default the integer codes multiplied in float Conv/Gemm nodes, matching PyTorch to the
bit but slower than the float model; ``--form fast`` writes every quantized layer as a pattern onnxruntime runs as
an integer kernel, QLinearConv, QGemm, QLinearAdd, within a level of PyTorch per layer: docs/export.md),
model.mxb (weights bit-packed at their bit-widths; layout in docs/export.md), policy.json, and
export_report.json: ONNX Runtime against PyTorch on the first --check-samples test samples (max
|diff| of every output, top-1 agreement where the output is class scores, each layer alone; --no-check
skips it), the layers kept float, and bytes on disk against the size the cost model predicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..data import build_loaders
from ..data.batches import batch_size, first_rows
from ..errors import MixbitsError, did_you_mean
from ..layer_types import kept_float
from ..pipeline import load_trained, resolve_checkpoint, saved_data_config
from ..quant import quant_layers
from ..rundir import add_force_argument, check_output_dir, claim_output_dir
from ..utils import atomic_write_text

FORMATS = ("onnx", "packed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or checkpoint.pt of a quantized run (mixbits train --policy ...)")
    p.add_argument("--out", required=True, help="directory for model.onnx, model.mxb, policy.json, export_report.json")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the highest of 25, 21, 13 onnxruntime runs; "
                                             "13 stores every code as int8)")
    p.add_argument("--form", choices=("fast", "exact"), default="exact",
                   help="exact (default): float products of the integer codes, bit-exact against PyTorch, slower "
                        "than float; fast: integer kernels in onnxruntime, within a level of PyTorch per layer")
    p.add_argument("--format", default="onnx,packed", help="comma-separated formats: onnx, packed (default: both)")
    p.add_argument("--check-samples", type=int, default=1000,
                   help="test samples on which ONNX Runtime is compared with PyTorch (0: no check; default 1000)")
    p.add_argument("--no-check", action="store_true", help="write the ONNX file without comparing it with PyTorch "
                                                           "(the same as --check-samples 0)")
    p.add_argument("--data-dir", help="dataset directory, if it moved since training")
    add_force_argument(p)


def run(args) -> int:
    formats = _formats(args.format)
    if args.check_samples < 0:
        raise MixbitsError(f"--check-samples must be >= 0, got {args.check_samples}")
    model, card, saved = load_trained(args.run)
    if card.policy is None:
        raise MixbitsError(f"{args.run} is a float run; export needs a quantized one (mixbits train --policy ...)")
    job = f"export of {resolve_checkpoint(args.run).resolve()}"  # re-exporting the same run may replace its files
    check_output_dir(args.out, job, force=args.force)  # before reading the check's data, not after
    checked = "onnx" in formats and args.check_samples and not args.no_check
    check = _check_batches(args, saved) if checked else None
    with claim_output_dir(args.out, job, force=args.force) as out:
        report = _write(args, model, card, formats, check, out)
    _print_summary(out, report)
    return 0


def _write(args, model, card, formats: list[str], check, out: Path) -> dict:
    card.policy.save(out / "policy.json")
    report = {"run": str(args.run), "model": card.name, "policy": card.policy.describe(),
              "kept_float": kept_float(model, quant_layers(model))}
    if "onnx" in formats:
        report["onnx"] = _export_onnx(model, card, args.opset, check, out / "model.onnx", args.form)
    if "packed" in formats:
        from ..export import pack_model

        report["packed"] = pack_model(model, out / "model.mxb", card=card).to_dict()
    atomic_write_text(out / "export_report.json", json.dumps(report, indent=2) + "\n")
    return report


def _formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        hint = did_you_mean(bad[0], FORMATS) if bad else ""
        raise MixbitsError(f"--format {text!r} is not understood.{hint} Use a comma-separated list of "
                           f"{', '.join(FORMATS)}")
    return formats


def _export_onnx(model, card, opset: int | None, check, path: Path, form: str = "exact") -> dict:
    from ..export import export_onnx

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(model, card.example_input(), path, opset=opset, check_inputs=check, form=form,
                             calibration=None if check is not None or form == "exact" else _calibration(card))
    for w in caught:
        print(f"mixbits export: warning: {w.message}", file=sys.stderr)
    return report.to_dict()


def _calibration(card):
    """A calibration batch for the fast form when no check runs (--check-samples 0): 64 standard normal inputs
    of the model's shape, like normalised images (integer inputs such as token ids: zeros); with a check, its first
    test samples calibrate instead."""
    import torch

    return card.example_input(64, torch.Generator().manual_seed(0))


def _check_batches(args, saved: dict):
    """The first ``--check-samples`` test images and labels, from the data settings the run was trained with."""
    data = saved_data_config(args.run, args.data_dir)  # read now: a bad config.yaml fails before any file is written
    _, _, test_loader, _ = build_loaders(data, saved.get("train_config", {}).get("seed", 0))
    return _first_samples(test_loader, args.check_samples)


def _first_samples(test_loader, count: int):
    """The first ``count`` samples of the batches; the inputs a tensor, or a tuple or dict of them."""
    left = count
    for x, y in test_loader:
        if left <= 0:
            break
        yield first_rows(x, left), y[:left]
        left -= batch_size(x)


def _print_summary(out: Path, report: dict) -> None:
    print(f"exported {report['model']} ({report['policy']}) to {out}/")
    if "onnx" in report:
        onnx = report["onnx"]
        print(f"  model.onnx   {onnx['bytes'] / 1e3:9.1f} KB  opset {onnx['opset']}, {onnx['form']} form")
        kernels = {k: v for k, v in onnx.get("kernels", {}).items() if k.startswith(("QLinear", "QGemm", "MatMulInt"))}
        if kernels:
            print("  integer kernels in onnxruntime: " + ", ".join(f"{v} {k}" for k, v in kernels.items()) +
                  (f"; left as float products: {', '.join(onnx['unfused_layers'])}" if onnx["unfused_layers"] else ""))
        check = onnx.get("check")
        if check:
            agreement = (f"top-1 agreement {check['top1_agreement']:.2f} % with onnxruntime's default optimisations "
                         f"({check['unoptimized']['top1_agreement']:.2f} % without), "
                         if check["top1_agreement"] is not None else "")
            print(f"  check on {check['samples']} test samples: {agreement}"
                  f"max |diff| {check['max_abs_diff']:.3g} ({check['rel_diff']:.2g} of the largest output), "
                  f"{check['differing_samples']} samples beyond {check['tolerance']:g}; each layer alone within "
                  f"{check['layer_max_rel_diff']:.2g}")
    if "packed" in report:
        packed = report["packed"]
        predicted = packed["predicted_bytes"]
        print(f"  model.mxb    {packed['file_bytes'] / 1e3:9.1f} KB  weights+parameters "
              f"{packed['param_bytes'] / 1e3:.2f} KB vs predicted {predicted / 1e3:.2f} KB; the rest is metadata, "
              f"BatchNorm statistics and step sizes")
    if report["kept_float"]:
        print(f"  kept float (32-bit, counted in the predicted size): {', '.join(report['kept_float'])}")
    print("  policy.json, export_report.json")
