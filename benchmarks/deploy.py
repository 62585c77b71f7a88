"""Deployment: the exported files in a default onnxruntime session on this CPU, against the float model's ONNX and
against onnxruntime's own INT8 quantization of it.

    python benchmarks/deploy.py [--samples 1000] [--rounds 30] [--models resnet20,mobilenetv2,vit_tiny]

For ResNet-20 and MobileNetV2 (the front benchmark's trained float weights, medium preset) and the zoo's ViT
(random weights with BatchNorm statistics and a least-squares head, as in ``export.py``; no trained ViT is
kept), each at uniform W8A8, uniform W4A4 and a mixed policy with 2-bit layers (the searchable layers in turn at
W2A2, W4A4, W3A8; first and last layer at W8A8), quantized with calibrated steps (no QAT):

- ``mixbits.export.export_onnx`` in the fast form (``form="fast"``), checked on ``--samples`` Fashion-MNIST test images:
  top-1 agreement with PyTorch under onnxruntime's default optimisations and with none, each layer alone in
  levels of its 8-bit output, the kernels onnxruntime runs (from its optimised graph), and the layers it left as
  float products;
- file size of that ONNX file against the packed ``.mxb`` (``pack_model``) and the target 1.25 x .mxb + 20 KB;
- latency in default ``InferenceSession``s (2 intra-op threads), batch 1 and batch 64: the float model's ONNX,
  the same float file in a second session (the noise floor), onnxruntime's ``quant_pre_process`` +
  ``quantize_static`` (QDQ, uint8 activations, int8 weights, 256 calibration images) and the three exports, run
  in turn in every round (the order rotating), ``--rounds`` rounds; each figure is the median over rounds of the
  per-round ratio (speed-up: float time / export time; against onnxruntime INT8: export time / INT8 time).

Writes benchmarks/results/deploy.json and deploy.md, with ``os.getloadavg()`` before and after in the meta.
About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, front_float_model, markdown_table, metadata, write_result  # noqa: E402
from export import SHAPE, _take, fit_head, random_model, zoo_policies  # noqa: E402

from mixbits import Policy, SearchSpace  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.export import export_onnx, pack_model  # noqa: E402
from mixbits.quant import apply_policy, calibrate, quantize_model  # noqa: E402
from mixbits.quant.attention import prepare_model  # noqa: E402

MODELS = ("resnet20", "mobilenetv2", "vit_tiny")
COLUMNS = ["model", "policy", "speedup_b1", "speedup_b64", "vs_ort_int8_b1", "vs_ort_int8_b64", "agreement_%",
           "unoptimized_%", "layer_levels", "onnx_KB", "mxb_KB", "size_target_KB", "integer_kernels", "unfused"]
THREADS = 2


def base_model(name: str, train_loader) -> tuple[torch.nn.Module, str]:
    """Trained float weights where the front benchmark kept them; else random weights (a least-squares head is
    fitted per policy)."""
    model = front_float_model(name)
    if model is not None:
        prepare_model(model)
        return model, f"trained float (front-state/{name}-medium/float.pt)"
    return random_model(train_loader, name), "random + least-squares head"


def float_onnx(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def ort_int8(float_path: Path, path: Path, calib: np.ndarray) -> None:
    """onnxruntime's own static INT8 quantization, as its documentation has a user run it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    pre = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(float_path), str(pre))
    except Exception as e:  # noqa: BLE001 - its symbolic shape inference fails on ViT's reshapes; its own option
        print(f"  quant_pre_process: {type(e).__name__}; again with skip_symbolic_shape=True", flush=True)
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def default_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Seconds of every session in every round, each round running all of them once, the order rotating."""
    names = list(sessions)
    for name in names:  # warm-up
        for _ in range(3):
            sessions[name].run(None, {"input": x})
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, {"input": x})
            times[name].append(time.perf_counter() - start)
    return times


def ratio(num: list[float], den: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)


def top1(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    out = default_session(path).run(None, {"input": x.numpy()})[0]
    return round(100.0 * float((out.argmax(1) == y.numpy()).mean()), 2)


def policies(space: SearchSpace) -> dict[str, Policy]:
    mixed = zoo_policies(space)["mixed 2/2,4/4,3/8"]
    return {"W8A8": Policy.uniform(space, 8), "W4A4": Policy.uniform(space, 4), "mixed 2/2,4/4,3/8": mixed}


def measure_model(name: str, args, loaders, tmp: Path) -> list[dict]:
    train_loader, test_loader = loaders
    base, weights = base_model(name, train_loader)
    calib, head_data = _take(train_loader, 256)[0], _take(train_loader, 5000)
    x, y = _take(test_loader, args.samples)
    batches = list(zip(x.split(500), y.split(500), strict=True))
    float_onnx(base, tmp / "float.onnx")
    ort_int8(tmp / "float.onnx", tmp / "ort_int8.onnx", calib.numpy())
    space = SearchSpace.from_model(base, range(2, 9), range(2, 9))
    rows, files = [], {}
    for label, policy in policies(space).items():
        start = time.perf_counter()
        model = apply_policy(quantize_model(copy.deepcopy(base), space), policy)
        calibrate(model, calib)
        if weights.startswith("random"):
            fit_head(model.eval(), *head_data)
            calibrate(model, calib)  # the new head's weight step
        path = tmp / f"{label.split()[0]}.onnx"
        report = export_onnx(model.eval(), SHAPE, path, check_inputs=batches, calibration=calib,
                             max_mismatch=1.0, min_agreement=0.0, form="fast")
        packed = pack_model(model, tmp / "model.mxb", input_shape=SHAPE)
        c = report.check
        integer = {k: v for k, v in report.kernels.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger"))}
        rows.append({"model": name, "weights": weights, "policy": label,
                     "agreement_%": round(c["top1_agreement"], 2),
                     "unoptimized_%": round(c["unoptimized"]["top1_agreement"], 2),
                     "max_abs_diff": c["max_abs_diff"], "differing": f"{c['differing_samples']}/{c['samples']}",
                     "layer_levels": round(c["layer_max_levels"], 3), "top1_torch": round(c["top1_torch"], 2),
                     "top1_onnx": round(c["top1_onnx"], 2), "onnx_KB": round(report.bytes / 1e3, 1),
                     "mxb_KB": round(packed.file_bytes / 1e3, 1),
                     "size_target_KB": round((1.25 * packed.file_bytes + 20e3) / 1e3, 1),
                     "integer_kernels": ", ".join(f"{v} {k}" for k, v in integer.items()),
                     "unfused": ", ".join(report.unfused_layers), "kernels": report.kernels,
                     "export_seconds": round(time.perf_counter() - start, 1)})
        files[label] = path
        print(f"  {name} {label}: agreement {c['top1_agreement']:.1f} % ({rows[-1]['export_seconds']} s)", flush=True)
    sessions = {"float": default_session(tmp / "float.onnx"), "float again": default_session(tmp / "float.onnx"),
                "ort int8": default_session(tmp / "ort_int8.onnx"),
                **{label: default_session(path) for label, path in files.items()}}
    anchors = {"float_top1": top1(tmp / "float.onnx", x, y), "ort_int8_top1": top1(tmp / "ort_int8.onnx", x, y),
               "float_onnx_KB": round((tmp / "float.onnx").stat().st_size / 1e3, 1),
               "ort_int8_KB": round((tmp / "ort_int8.onnx").stat().st_size / 1e3, 1)}
    for batch, rounds in ((1, args.rounds), (64, max(args.rounds // 3, 8))):
        times = interleaved(sessions, x[:batch].numpy(), rounds)
        floor = ratio(times["float"], times["float again"])
        ms = {k: round(1e3 * statistics.median(v), 3) for k, v in times.items()}
        int8_speedup = ratio(times["float"], times["ort int8"])
        for row in rows:
            t = times[row["policy"]]
            row[f"speedup_b{batch}"] = ratio(times["float"], t)
            row[f"vs_ort_int8_b{batch}"] = ratio(t, times["ort int8"])
            row[f"ms_b{batch}"] = ms[row["policy"]]
            row[f"float_ms_b{batch}"], row[f"ort_int8_ms_b{batch}"] = ms["float"], ms["ort int8"]
            row[f"noise_floor_b{batch}"], row[f"ort_int8_speedup_b{batch}"] = floor, int8_speedup
            row[f"rounds_b{batch}"] = rounds
        print(f"  {name} batch {batch}: float {ms['float']} ms, noise floor {floor}, onnxruntime INT8 "
              f"{int8_speedup}x", flush=True)
    for row in rows:
        row.update(anchors)
    return rows


def markdown(rows: list[dict], meta: dict, args) -> str:
    speed = [r for r in rows if min(r["speedup_b1"], r["speedup_b64"]) >= 1.3]
    near = [r for r in rows if max(r["vs_ort_int8_b1"], r["vs_ort_int8_b64"]) <= 1.2]
    small = [r for r in rows if r["onnx_KB"] <= r["size_target_KB"]]
    agree = [r for r in rows if min(r["agreement_%"], r["unoptimized_%"]) >= 99.9]
    anchors = "; ".join(f"{r['model']}: float {r['float_ms_b1']} ms (batch 1) / {r['float_ms_b64']} ms (batch 64), "
                        f"noise floor {r['noise_floor_b1']} / {r['noise_floor_b64']}, onnxruntime INT8 "
                        f"{r['ort_int8_speedup_b1']}x / {r['ort_int8_speedup_b64']}x faster than float, float top-1 "
                        f"{r['float_top1']} %, INT8 {r['ort_int8_top1']} %"
                        for r in rows if r["policy"] == "W8A8")
    lines = ["# Deployment in onnxruntime", "",
             f"`python benchmarks/deploy.py` at {meta['commit']} ({meta['date']}), onnxruntime {ort.__version__}, "
             f"{THREADS} threads, {args.samples} Fashion-MNIST test images, load average {meta['loadavg_before']} "
             f"before and {meta['loadavg_after']} after. `speedup_bN`: float time / export time at batch N "
             "(median of per-round ratios, interleaved); `vs_ort_int8_bN`: export time / onnxruntime INT8 time; "
             "`agreement_%` top-1 agreement with PyTorch as deployed (`unoptimized_%`: no graph optimisations); "
             "`layer_levels`: each layer alone, its largest difference in levels of its 8-bit output; "
             "`size_target_KB`: 1.25 x .mxb + 20 KB.", "",
             f"Anchors: {anchors}.", "",
             f"Targets: >= 1.3x float at batch 1 and 64: {len(speed)} of {len(rows)}; <= 1.2x onnxruntime INT8's time: "
             f"{len(near)} of {len(rows)}; file within the size target: {len(small)} of {len(rows)}; top-1 agreement "
             f">= 99.9 % both ways: {len(agree)} of {len(rows)}.", "",
             markdown_table(rows, COLUMNS), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="test images checked (default 1000)")
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds at batch 1 (a third at batch 64)")
    parser.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS))
    parser.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    before = [round(v, 2) for v in os.getloadavg()]
    loaders = build_loaders(DataConfig(root=args.data_dir, eval_batch_size=500), 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += measure_model(name, args, (loaders[0], loaders[2]), Path(tmp))
    meta = {**metadata(), "loadavg_before": before, "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    text = markdown(rows, meta, args)
    print(text)
    if args.models != list(MODELS):  # a subset is printed, never written over the whole table
        return
    (RESULTS / "deploy.md").write_text(text)
    path = write_result("deploy", {"samples": args.samples, "rounds": args.rounds, "threads": THREADS,
                                   "onnxruntime": ort.__version__, "loadavg": {"before": before,
                                                                              "after": meta["loadavg_after"]},
                                   "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
