"""Export fidelity: ONNX Runtime against PyTorch on the Fashion-MNIST test set, and packed bytes on disk
against the size the cost model predicts.

    python benchmarks/export.py [--run RUN_DIR] [--samples 10000] [--opset N]
    python benchmarks/export.py --ops [--samples 1000]
    python benchmarks/export.py --zoo [--samples 1000] [--models resnet20,vit_tiny]

ResNet-20 at uniform W2A2, W3A3, W4A4 and one mixed policy (layer1 at W6A6, layer2 at W3A5, layer3
at W2A2; first and last layer at 8 bits) is exported to QDQ ONNX and to the packed format. For each:
max |ONNX Runtime - PyTorch| over the test set, the samples whose logits differ by more than 1e-3 of
the largest logit, each layer alone on PyTorch's own inputs, top-1 agreement under onnxruntime's
default graph optimisations and with none, and packed weight bytes against ``size_bits(stats, policy) / 8``.

Weights: with --run, a trained run (a float run is quantized at each policy with calibrated steps; a
quantized run also contributes its own trained policy). Without it, random weights with BatchNorm
statistics from 2,048 training images and, per policy, a least-squares linear head fitted to the
quantized model's features on 5,000 training images (so the logits carry real margins; nothing else
is trained). Writes benchmarks/results/export.json.

--ops instead measures the ops that sit between an activation and the next quantized layer: for each
op (max, average, adaptive and global pooling, flatten, reshape, concat, residual add, ReLU6,
Hardswish), a small network conv -> activation -> op -> quantized layer, at 2, 3, 4 and 8-bit inputs
of that layer and at opsets 13, 21 and 25: the input type the exporter chose for that layer, whether
the whole graph made it widen a narrow type, and agreement with PyTorch under onnxruntime's default
optimisations and with none (random convolutions, least-squares head as above). Writes
benchmarks/results/export-ops.json.

--zoo instead exports every model ``mixbits list`` shows, at small widths on 28 px one-channel images
(``ZOO``), at opsets 13, 21 and 25 and two policies: a mixed one (the searchable layers in turn at W2A2,
W4A4, W3A8; first and last layer at W8A8) and uniform W4A4. Each model is measured with three sets of
weights: random as above (BatchNorm statistics, least-squares head per policy), a stress test in which many
predictions sit within float rounding of a tie; trained from scratch for 2 epochs on 8,000 training images
(``ZOO_TRAINING``; cached in benchmarks/cache/export-zoo/), with its own head, as a user's trained model
is; and, where the front benchmark kept trained float weights (benchmarks/front-state/<model>-medium/
float.pt) that fit the model as it builds it, those, with their own head. For each export: top-1
agreement with PyTorch under onnxruntime's default optimisations and with none, max |diff|, and, as a
reference that involves no export, the top-1 agreement of the quantized PyTorch model in float32 with
itself in float64. Writes
benchmarks/results/export-zoo.json and export-zoo.md (with --models, prints only).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, front_float_model, markdown_table, metadata, write_result  # noqa: E402

from mixbits import Policy, SearchSpace  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.export import export_onnx, pack_model  # noqa: E402
from mixbits.models import create, list_models  # noqa: E402
from mixbits.pipeline import load_trained  # noqa: E402
from mixbits.quant import apply_policy, calibrate, quantize_model  # noqa: E402
from mixbits.quant.attention import prepare_model  # noqa: E402
from mixbits.train import TrainConfig, evaluate, fit  # noqa: E402

SHAPE = (1, 28, 28)
ZOO_CACHE = Path(__file__).parent / "cache" / "export-zoo"  # not committed: briefly trained weights
COLUMNS = ["policy", "max_abs_diff", "rel_diff", "differing", "layer_rel_diff", "agreement_%", "unoptimized_%",
           "top1_torch", "top1_onnx", "onnx_KB", "packed_params_B", "predicted_B", "file_B"]
OP_COLUMNS = ["op", "a_bits", "opset", "act_type", "widened", "agreement_%", "unoptimized_%", "max_abs_diff",
              "differing", "seconds"]
OPS = ("maxpool", "avgpool", "adaptive", "global", "flatten", "reshape", "concat", "add", "relu6", "hardswish")


def _take(loader, n: int) -> torch.Tensor:
    xs, ys, left = [], [], n
    for x, y in loader:
        xs.append(x[:left])
        ys.append(y[:left])
        left -= xs[-1].shape[0]
        if left <= 0:
            break
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def random_model(train_loader, name: str = "resnet20", **options) -> nn.Module:
    """A random zoo model (ResNet-20 by default) with BatchNorm statistics from 2,048 training images."""
    torch.manual_seed(0)
    model = create(name, num_classes=10, in_chans=1, **options)
    prepare_model(model)  # attention as separate linear projections, which are quantized
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    for chunk in _take(train_loader, 2048)[0].split(256):
        model(chunk)
    return model.eval()


@torch.no_grad()
def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Least-squares linear head on the (quantized) model's own features, so its logits carry real margins.

    The head is the model's last ``nn.Linear`` (``fc``, ``classifier.1``, ``head``).
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats = []
    hook = head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    for chunk in x.split(500):
        model(chunk)
    hook.remove()
    phi = torch.cat([torch.cat(feats), torch.ones(len(x), 1)], 1).double()
    gram = phi.T @ phi
    ridge = 1e-3 * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge, phi.T @ (nn.functional.one_hot(y, 10).double() * 10 - 5))
    head.weight.copy_(w[:-1].T.float())
    head.bias.copy_(w[-1].float())


def policies(space: SearchSpace) -> dict[str, Policy]:
    mixed = Policy.from_rules(space, (4, 4), {r"re:layer1\..*": (6, 6), r"re:layer2\..*": (3, 5),
                                              r"re:layer3\..*": (2, 2)})
    return {"uniform W2A2": Policy.uniform(space, 2), "uniform W3A3": Policy.uniform(space, 3),
            "uniform W4A4": Policy.uniform(space, 4), "mixed 6/6,3/5,2/2": mixed}


def models_to_export(args, train_loader) -> tuple[str, dict[str, nn.Module]]:
    calib = _take(train_loader, 256)[0]
    if args.run:
        trained, card, _ = load_trained(args.run)
        base = card.float_model()
        state = {k: v for k, v in trained.state_dict().items() if "w_quant." not in k and "a_quant." not in k}
        base.load_state_dict(state)
        extra = {"the run's own (trained)": trained.eval()} if card.policy is not None else {}
        kind = "quantized" if extra else "float"
        source = (f"trained {kind} run {args.run} ({card.name}); the policies below quantize its float weights with "
                  "calibrated steps (no QAT)")
    else:
        base, extra = random_model(train_loader), {}
        source = ("random weights (not trained): BatchNorm statistics from training images, calibrated steps, and a "
                  "least-squares head fitted to each quantized model's features on 5,000 training images")
    space = SearchSpace.from_model(base)
    out, head_data = dict(extra), None if args.run else _take(train_loader, 5000)
    for name, policy in policies(space).items():
        model = apply_policy(quantize_model(copy.deepcopy(base), space), policy)
        calibrate(model, calib)
        if head_data is not None:
            fit_head(model.eval(), *head_data)
            calibrate(model, calib)  # the new head's weight step
        out[name] = model.eval()
    return source, out


def agreement(c: dict) -> dict:
    """The figures of one check that every table shows."""
    return {"max_abs_diff": c["max_abs_diff"], "differing": f"{c['differing_samples']}/{c['samples']}",
            "agreement_%": round(c["top1_agreement"], 2), "unoptimized_%": round(c["unoptimized"]["top1_agreement"], 2)}


def measure(name: str, model: nn.Module, test_loader, samples: int, opset, tmp: Path) -> dict:
    x, y = _take(test_loader, samples)
    start = time.perf_counter()
    batches = list(zip(x.split(500), y.split(500), strict=True))
    onnx = export_onnx(model, SHAPE, tmp / "model.onnx", form="exact", opset=opset, check_inputs=batches,
                       max_mismatch=1.0,
                       min_agreement=0.0)
    packed = pack_model(model, tmp / "model.mxb", input_shape=SHAPE)
    c = onnx.check
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return {"policy": name, **agreement(c), "rel_diff": c["rel_diff"], "layer_rel_diff": c["layer_max_rel_diff"],
            "top1_torch": round(c["top1_torch"], 2), "top1_onnx": round(c["top1_onnx"], 2),
            "onnx_KB": round(onnx.bytes / 1e3, 1), "packed_params_B": packed.param_bytes,
            "predicted_B": packed.predicted_bytes, "file_B": packed.file_bytes, "opset": onnx.opset,
            "widened": onnx.widened_inputs, "types": onnx.layers, "packed": packed.to_dict()}


class OpNet(nn.Module):
    """conv -> activation -> op -> ``after`` (the quantized layer measured) -> ReLU -> global average -> fc.

    For flatten and reshape the layer after the op is the head itself (a 4x4-stride stem keeps it small).
    """

    def __init__(self, op: str):
        super().__init__()
        self.op, head_input = op, op in ("flatten", "reshape")
        self.conv1 = nn.Conv2d(1, 16, 4, stride=4) if head_input else nn.Conv2d(1, 16, 3, padding=1)
        self.side = nn.Conv2d(1, 16, 3, padding=1) if op in ("concat", "add") else None
        self.after = None if head_input else nn.Conv2d(32 if op == "concat" else 16, 32, 3, padding=1)
        self.fc = nn.Linear(16 * 7 * 7 if head_input else 32, 10)

    def forward(self, x):
        op = self.op
        act = {"relu6": F.relu6, "hardswish": F.hardswish}.get(op, torch.relu)
        a = act(self.conv1(x))
        if op == "flatten":
            return self.fc(a.flatten(1))
        if op == "reshape":
            return self.fc(a.reshape(a.shape[0], -1))
        a = {"maxpool": lambda t: F.max_pool2d(t, 2), "avgpool": lambda t: F.avg_pool2d(t, 2),
             "adaptive": lambda t: F.adaptive_avg_pool2d(t, 7), "global": lambda t: F.adaptive_avg_pool2d(t, 1),
             "concat": lambda t: torch.cat([t, torch.relu(self.side(x))], 1),
             "add": lambda t: t + torch.relu(self.side(x))}.get(op, lambda t: t)(a)
        return self.fc(torch.relu(self.after(a)).mean((2, 3)))


def op_model(op: str, bits: int, calib: torch.Tensor, head_data) -> tuple[nn.Module, str]:
    """OpNet(op) quantized with ``bits``-bit inputs to the layer after the op, 8 bits elsewhere; (model, that layer)."""
    torch.manual_seed(0)
    base = OpNet(op).eval()
    after = "fc" if base.after is None else "after"
    space = SearchSpace.from_model(base, (4, 8), range(2, 9), fixed="none")
    model = apply_policy(quantize_model(base, space), Policy.from_rules(space, (8, 8), {after: (4, bits)}))
    calibrate(model, calib)
    fit_head(model.eval(), *head_data)
    calibrate(model, calib)  # the new head's weight step
    return model, after


def op_rows(args, train_loader, test_loader) -> list[dict]:
    calib, head_data = _take(train_loader, 256)[0], _take(train_loader, 5000)
    x, y = _take(test_loader, args.samples)
    batches = list(zip(x.split(500), y.split(500), strict=True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op in OPS:
            for bits in (2, 3, 4, 8):
                model, after = op_model(op, bits, calib, head_data)
                for opset in (13, 21, 25):
                    start = time.perf_counter()
                    report = export_onnx(model, SHAPE, Path(tmp) / "op.onnx", form="exact", opset=opset,
                                         check_inputs=batches,
                                         max_mismatch=1.0, min_agreement=0.0)
                    rows.append({"op": op, "a_bits": bits, "opset": opset, **agreement(report.check),
                                 "act_type": report.layers[after]["act_type"],
                                 "widened": after in report.widened_inputs,
                                 "seconds": round(time.perf_counter() - start, 2)})
            print(f"  {op}: done", flush=True)
    return rows


# Every model `mixbits list` shows, at small widths (28 px, one channel): the whole --zoo run takes about
# 12 minutes of one CPU core, and ResNet-50 takes over a third of the time spent exporting and checking.
ZOO = {"mobilenetv2": {"width": 0.25}, "resnet18": {}, "resnet20": {"width": 0.5}, "resnet32": {"width": 0.5},
       "resnet50": {}, "resnet56": {"width": 0.25}, "small_cnn": {}, "vit_tiny": {}}
ZOO_OPSETS = (13, 21, 25)
ZOO_COLUMNS = ["model", "weights", "policy", "opset", "agreement_%", "unoptimized_%", "max_abs_diff", "differing",
               "fp32_vs_fp64_%", "narrow_inputs", "widened", "seconds"]
MIXED_CYCLE = ((2, 2), (4, 4), (3, 8))  # searchable layers in turn; first and last layer at W8A8


def zoo_policies(space: SearchSpace) -> dict[str, Policy]:
    cycle = {name: MIXED_CYCLE[i % len(MIXED_CYCLE)] for i, name in enumerate(space.searchable)}
    return {"mixed 2/2,4/4,3/8": Policy.from_rules(space, (4, 4), cycle), "uniform W4A4": Policy.uniform(space, 4)}


def trained_front_model(name: str) -> tuple[nn.Module, str] | None:
    """The front benchmark's trained float weights of ``name`` (medium preset), built as it builds them, if kept."""
    try:
        model = front_float_model(name)
    except RuntimeError as e:  # kept weights of another build of the model: say so, measure the rest
        print(f"  the front's float.pt does not fit {name}: {str(e).splitlines()[0]}", flush=True)
        return None
    if model is None:
        return None
    prepare_model(model)
    return model, f"trained float (front-state/{name}-medium/float.pt)"


@torch.no_grad()
def fp32_vs_fp64(model: nn.Module, x: torch.Tensor) -> float:
    """Top-1 agreement (%) of the quantized model in float32 with the same model in float64: how far float
    rounding alone moves its predictions (an activation within rounding of a midpoint between two levels
    lands on either side), whatever runs it."""
    wide = copy.deepcopy(model).double()
    agree = sum(int((model(c).argmax(-1) == wide(c.double()).argmax(-1)).sum()) for c in x.split(500))
    return round(100.0 * agree / len(x), 2)


# Briefly trained zoo models: SGD as the front trains its float models; Adam for the transformer, which SGD at
# that rate left near chance after two epochs (a library choice: the weights only need real margins).
ZOO_TRAINING = {"epochs": 2, "samples": 8000}
ZOO_TRAIN_CONFIG = {"default": {"lr": 0.05, "warmup_epochs": 0.5}, "vit_tiny": {"optimizer": "adam", "lr": 1e-3}}


def briefly_trained(name: str, data_dir: str | None, test_loader) -> tuple[nn.Module, str]:
    """``name`` at its ``ZOO`` options trained from scratch for ``ZOO_TRAINING`` (weights cached in
    benchmarks/cache/export-zoo/): a network with the margins of a trained one, where random weights leave
    many predictions within float rounding of a tie."""
    options = ZOO.get(name, {})
    torch.manual_seed(0)
    model = create(name, num_classes=10, in_chans=1, **options)
    prepare_model(model)
    path = ZOO_CACHE / f"{name}-{ZOO_TRAINING['epochs']}x{ZOO_TRAINING['samples']}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        train = build_loaders(DataConfig(root=data_dir, max_train_samples=ZOO_TRAINING["samples"]), 0)[0]
        settings = ZOO_TRAIN_CONFIG.get(name, ZOO_TRAIN_CONFIG["default"])
        fit(model, train, TrainConfig(epochs=ZOO_TRAINING["epochs"], seed=0, **settings), progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    top1 = evaluate(model.eval(), test_loader, "cpu", max_batches=2)["top1"]
    return model, (f"trained {ZOO_TRAINING['epochs']} epochs on {ZOO_TRAINING['samples']} images "
                   f"(float {top1:.1f} %)")


def zoo_bases(args, train_loader, test_loader, names: list[str]):
    """(model, weights, float model): each zoo model with random weights, briefly trained, then with the front's
    trained weights where it kept them."""
    for name in names:
        yield name, "random + least-squares head", random_model(train_loader, name, **ZOO.get(name, {}))
    for name in names:
        model, weights = briefly_trained(name, args.data_dir, test_loader)
        yield name, weights, model
    for name in names:
        trained = trained_front_model(name)
        if trained is not None:
            yield name, trained[1], trained[0]


def zoo_row(model: nn.Module, opset: int, batches, path: Path) -> dict:
    start = time.perf_counter()
    try:
        report = export_onnx(model, SHAPE, path, form="exact", opset=opset, check_inputs=batches,
                             max_mismatch=1.0,
                             min_agreement=0.0)
    except Exception as e:  # noqa: BLE001 - a failed export is a result of this table, recorded with its message
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - start, 1)}
    types = [layer["act_type"] for layer in report.layers.values()]
    narrow = sum(t not in ("int8", "uint8") for t in types)
    return {**agreement(report.check), "rel_diff": report.check["rel_diff"],
            "layer_rel_diff": report.check["layer_max_rel_diff"], "narrow_inputs": f"{narrow}/{len(types)}",
            "widened": len(report.widened_inputs), "widened_layers": report.widened_inputs,
            "seconds": round(time.perf_counter() - start, 1)}


def zoo_rows(args, train_loader, test_loader) -> list[dict]:
    calib, head_data = _take(train_loader, 256)[0], _take(train_loader, 5000)
    x, y = _take(test_loader, args.samples)
    batches = list(zip(x.split(500), y.split(500), strict=True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights, base in zoo_bases(args, train_loader, test_loader, args.models or list_models()):
            space = SearchSpace.from_model(base, range(2, 9), range(2, 9))
            for label, policy in zoo_policies(space).items():
                model = apply_policy(quantize_model(base, space), policy)
                calibrate(model, calib)
                if weights.startswith("random"):
                    fit_head(model.eval(), *head_data)
                    calibrate(model, calib)  # the new head's weight step
                reference = fp32_vs_fp64(model.eval(), x)
                for opset in ZOO_OPSETS:
                    row = {"model": name, "options": {} if weights.startswith("trained float") else ZOO.get(name, {}),
                           "weights": weights, "policy": label, "opset": opset, "fp32_vs_fp64_%": reference,
                           **zoo_row(model.eval(), opset, batches, Path(tmp) / "zoo.onnx")}
                    rows.append(row)
                    print(f"  {name} {label} opset {opset}: " + (row.get("error") or
                          f"{row['agreement_%']} % / {row['unoptimized_%']} %, max |diff| {row['max_abs_diff']:.3g}"),
                          flush=True)
    return rows


def _weights_kind(weights: str) -> str:
    """The kind of a row's weights, without the per-model figures its label carries."""
    if weights.startswith("random"):
        return "random"
    return "the front's trained" if weights.startswith("trained float") else "briefly trained"


def _passing_by_weights(rows: list[dict], target: float) -> str:
    """"random: 30 of 48, ..." for the exports at ``target`` % agreement both ways, by kind of weights."""
    kinds: dict[str, list[bool]] = {}
    for r in rows:
        kinds.setdefault(_weights_kind(r["weights"]), []).append(min(r["agreement_%"], r["unoptimized_%"]) >= target)
    return "; ".join(f"{kind} weights: {sum(ok)} of {len(ok)}" for kind, ok in kinds.items())


def ops_markdown(rows: list[dict], samples: int, meta: dict) -> str:
    """The per-op table: each op between a ReLU (ReLU6, Hardswish) and the next quantized layer."""
    exact = sum(r["max_abs_diff"] == 0 for r in rows)
    worst = min(min(r["agreement_%"], r["unoptimized_%"]) for r in rows)
    intro = (f"`python benchmarks/export.py --ops` at {meta['commit']} ({meta['date']}): OpNet(op) with the "
             "layer after the op at 2, 3, 4 or 8-bit inputs (8 bits elsewhere), exported at opsets 13, 21 and 25 "
             f"and run by onnxruntime on {samples} Fashion-MNIST test images. Columns as in export-zoo.md; "
             "`act_type`: the input type of the layer after the op; `widened`: carried in an 8-bit container "
             "with a Clip because the whole graph refused the narrow type. Lowest top-1 agreement in either "
             f"session: {worst} %; bit-exact (max |diff| 0): {exact} of {len(rows)}.")
    return "\n".join(["# Export fidelity per op", "", intro, "", markdown_table(rows, OP_COLUMNS), ""])


def zoo_markdown(rows: list[dict], samples: int, target: float = 99.9) -> str:
    done, failed = [r for r in rows if "error" not in r], [r for r in rows if "error" in r]
    low = {}  # (model, weights, policy) -> the lowest agreement of its exports below the target
    for r in done:
        worst = min(r["agreement_%"], r["unoptimized_%"])
        if worst < target:
            key = (r["model"], r["weights"], r["policy"])
            low[key] = min(low.get(key, (worst, r["fp32_vs_fp64_%"])), (worst, r["fp32_vs_fp64_%"]))
    meta = metadata()
    lines = ["# Export fidelity across the zoo", "",
             f"`python benchmarks/export.py --zoo` at {meta['commit']} ({meta['date']}). Each model is exported to "
             "QDQ ONNX at every opset and run by onnxruntime on "
             f"{samples} Fashion-MNIST test images (28 px, one channel): `agreement_%` is top-1 agreement with "
             "PyTorch under onnxruntime's default graph optimisations, `unoptimized_%` with none, `max_abs_diff` "
             "the largest logit difference, `differing` the samples off by more than 1e-3 of the largest logit. "
             "`fp32_vs_fp64_%` runs no export: it is the same quantized PyTorch model in float32 against float64, "
             "so below 100 % float rounding alone moves its predictions (an activation within rounding of a "
             "midpoint between two levels lands on either side, and in a deep network at 2-3 bits that one level "
             "changes many later ones). `narrow_inputs`: layers whose input codes keep a 2- or 4-bit type; "
             "`widened`: layers the whole graph made carry them in an 8-bit container.", "",
             f"Exports: {len(rows)}, failed: {len(failed)}; at >= {target:g} % agreement both ways: "
             f"{sum(min(r['agreement_%'], r['unoptimized_%']) >= target for r in done)} "
             f"({_passing_by_weights(done, target)}). Each layer alone, fed "
             "PyTorch's own input, matches PyTorch to "
             f"{max((r['layer_rel_diff'] for r in done), default=0.0):.2g} of its largest output at worst."]
    if low:
        lines += ["", f"Below {target:g} % (lowest agreement over the opsets; the model's own float32 against "
                  "float64 beside it):", ""]
        lines += [f"- {m} ({w}), {p}: {a} %; float32 against float64: {f} %" for (m, w, p), (a, f) in low.items()]
    lines += ["", markdown_table(rows, ZOO_COLUMNS + (["error"] if failed else [])), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="trained run directory or checkpoint (default: random weights)")
    parser.add_argument("--samples", type=int, help="test images compared (default: all 10,000; 1,000 with --zoo)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the highest onnxruntime runs)")
    parser.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ops", action="store_true", help="the per-op table instead of the ResNet-20 policies")
    mode.add_argument("--zoo", action="store_true", help="every zoo model at every opset instead")
    parser.add_argument("--models", type=lambda v: v.split(","), help="with --zoo: these models only (comma-separated)")
    args = parser.parse_args()
    args.samples = args.samples or (1000 if args.zoo else 10000)
    train_loader, _, test_loader, _ = build_loaders(DataConfig(root=args.data_dir, eval_batch_size=500), 0)
    if args.zoo:
        rows = zoo_rows(args, train_loader, test_loader)
        text = zoo_markdown(rows, args.samples)
        print(text)
        if args.models:  # a subset is printed, never written over the whole table
            return
        (RESULTS / "export-zoo.md").write_text(text)
        payload = {"samples": args.samples, "opsets": list(ZOO_OPSETS), "zoo_options": ZOO, "rows": rows}
        print(f"wrote {write_result('export-zoo', payload)}")
        return
    if args.ops:
        rows = op_rows(args, train_loader, test_loader)
        text = ops_markdown(rows, args.samples, metadata())
        print(text)
        (RESULTS / "export-ops.md").write_text(text)
        print(f"wrote {write_result('export-ops', {'samples': args.samples, 'rows': rows})}")
        return
    source, models = models_to_export(args, train_loader)
    print(f"weights: {source}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, m, test_loader, args.samples, args.opset, Path(tmp)) for name, m in models.items()]
    print(markdown_table(rows, COLUMNS))
    path = write_result("export", {"model": "resnet20", "weights": source, "samples": args.samples, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
