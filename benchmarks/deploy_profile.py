"""Where the time goes at batch 1: onnxruntime's own profiler, node by node, for the float model's ONNX, onnxruntime's
INT8 quantization of it and the fast-form exports of ``deploy.py``.

    python benchmarks/deploy_profile.py [--models mobilenetv2,vit_tiny] [--policies W8A8,W4A4] [--runs 200]

End-to-end timings on a loaded machine move with the load; the profiler's per-node kernel times (the median over
``--runs`` batch-1 runs of each node, ``SessionOptions.enable_profiling``, one intra-op thread so that nodes do not
overlap) show which nodes an export has that onnxruntime's INT8 has not, and what each kind costs. The models,
weights and policies are ``deploy.py``'s. Prints one table per model (µs per run by node type, with node counts)
and writes benchmarks/results/deploy-profile.md when every model and policy ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, metadata  # noqa: E402
from deploy import MODELS, SHAPE, _take, base_model, fit_head, float_onnx, ort_int8, policies  # noqa: E402

from mixbits import SearchSpace  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.export import export_onnx  # noqa: E402
from mixbits.quant import apply_policy, calibrate, quantize_model  # noqa: E402

WARMUP = 20


def node_times(path: Path, runs: int) -> dict[tuple[str, str], float]:
    """(node name, op type) -> median kernel time in µs over ``runs`` batch-1 runs of the optimised graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
        for _ in range(WARMUP + runs):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    kernels = kernels[len(kernels) * WARMUP // (WARMUP + runs):]  # the warm-up runs come first
    times = defaultdict(list)
    for e in kernels:
        times[(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])].append(e["dur"])
    return {key: float(np.median(v)) for key, v in times.items()}


def by_op(times: dict) -> dict[str, tuple[int, float]]:
    """op type -> (nodes, µs per run)."""
    out = defaultdict(lambda: [0, 0.0])
    for (_, op), us in times.items():
        out[op][0] += 1
        out[op][1] += us
    return {op: (n, us) for op, (n, us) in out.items()}


def table(name: str, columns: dict[str, dict]) -> str:
    totals = {label: sum(us for _, us in ops.values()) for label, ops in columns.items()}
    order = sorted({op for ops in columns.values() for op in ops},
                   key=lambda op: -max(ops.get(op, (0, 0.0))[1] for ops in columns.values()))
    lines = [f"### {name}", "", "| node type | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for op in order:
        cells = [f"{ops[op][1]:.0f} ({ops[op][0]})" if op in ops else "" for ops in columns.values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **all nodes** | " + " | ".join(f"**{totals[label]:.0f}**" for label in columns) + " |")
    return "\n".join(lines + [""])


def profile_model(name: str, wanted: list[str], runs: int, loader, tmp: Path) -> str:
    base, weights = base_model(name, loader)
    calib, head_data = _take(loader, 256)[0], _take(loader, 5000)
    float_onnx(base, tmp / "float.onnx")
    ort_int8(tmp / "float.onnx", tmp / "int8.onnx", calib.numpy())
    columns = {"float": by_op(node_times(tmp / "float.onnx", runs)),
               "onnxruntime INT8": by_op(node_times(tmp / "int8.onnx", runs))}
    space = SearchSpace.from_model(base, range(2, 9), range(2, 9))
    for label, policy in policies(space).items():
        if label.split()[0] not in wanted:
            continue
        model = apply_policy(quantize_model(copy.deepcopy(base), space), policy)
        calibrate(model, calib)
        if weights.startswith("random"):
            fit_head(model.eval(), *head_data)
            calibrate(model, calib)
        path = tmp / f"{label.split()[0]}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unfused-layer warning: the table shows those layers' nodes
            export_onnx(model.eval(), SHAPE, path, calibration=calib, form="fast")
        columns[f"fast {label.split()[0]}"] = by_op(node_times(path, runs))
        print(f"  {name} {label} profiled", flush=True)
    return table(f"{name} ({weights})", columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS))
    parser.add_argument("--policies", type=lambda v: v.split(","), default=["W8A8", "W4A4", "mixed"],
                        help="first words of deploy.py's policy labels (default all three)")
    parser.add_argument("--runs", type=int, default=200, help="profiled batch-1 runs per file (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = [round(v, 2) for v in os.getloadavg()]
    loader = build_loaders(DataConfig(eval_batch_size=500), 0)[0]
    with tempfile.TemporaryDirectory() as tmp:
        tables = [profile_model(name, args.policies, args.runs, loader, Path(tmp)) for name in args.models]
    meta = metadata()
    text = "\n".join([
        "# Deployment profile: onnxruntime kernel time per node type at batch 1", "",
        f"`python benchmarks/deploy_profile.py` at {meta['commit']} ({meta['date']}), onnxruntime {ort.__version__}, "
        f"one intra-op thread, {args.runs} runs per file, load average {before} before and "
        f"{[round(v, 2) for v in os.getloadavg()]} after. Each cell: µs per run summed over the nodes of that type "
        "(each node's median over the runs), with the node count in parentheses.", "", *tables])
    print(text)
    if args.models == list(MODELS) and len(args.policies) == 3:
        (RESULTS / "deploy-profile.md").write_text(text)
        print(f"wrote {RESULTS / 'deploy-profile.md'}")


if __name__ == "__main__":
    main()
