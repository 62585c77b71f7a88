"""Where each method spends its bits on a front: mean weight and activation bits per kind of layer.

    python benchmarks/policy_layers.py --model mobilenetv2 --preset medium

Reads the finished rows of ``benchmarks/front.py`` (no training) and groups each policy's layers by kind:
depthwise convolutions (groups = input channels > 1), pointwise (1x1) convolutions, other convolutions and
linear layers. Per method, budget and kind it gives the mean weight and activation bits over layers and
seeds, the share of the kind's layers with 2-bit weights or activations, the kind's share of the model's
MACs and of each policy's BitOPs (MACs·w·a) and weight bits (params·w), all layers counted, and the method's
mean top-1. A depthwise convolution holds few MACs, so low bits there buy little
BitOPs; a method that puts them at 2 bits pays accuracy for almost nothing. Writes
benchmarks/results/policy-layers-<model>-<preset>.json and .md (with ``--state-dir`` another directory:
...-<preset>-<its name>).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS, STATE  # noqa: E402

from mixbits.cost import profile  # noqa: E402
from mixbits.models import create  # noqa: E402

KINDS = ("depthwise", "pointwise", "conv", "linear")


def layer_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if module.kernel_size == (1, 1) else "conv"


def layer_kinds(model: torch.nn.Module, names) -> dict[str, str]:
    return {name: layer_kind(model.get_submodule(name)) for name in names}


def bit_shares(policy: dict, names: list[str], macs: dict[str, int], params: dict[str, int]) -> tuple[float, float]:
    """The share of the policy's BitOPs (MACs·w·a) and of its quantized weight bits (params·w) spent on ``names``,
    over every layer the policy holds (fixed ones included)."""
    ops = {n: macs[n] * b["w"] * b["a"] for n, b in policy.items()}
    size = {n: params[n] * b["w"] for n, b in policy.items()}
    return sum(ops[n] for n in names) / sum(ops.values()), sum(size[n] for n in names) / sum(size.values())


def summarise(rows: list[dict], kinds: dict[str, str], macs: dict[str, int],
              params: dict[str, int] | None = None) -> list[dict]:
    """One line per (method, budget, kind present in the model), over the rows' seeds; with ``params``, also the
    kind's mean share of each policy's BitOPs and weight bits."""
    total_macs = sum(macs.values())
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("policy") and row.get("test_top1") is not None:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    for (method, budget), finished in sorted(groups.items()):
        for kind in KINDS:
            names = [n for n, k in kinds.items() if k == kind]
            if not names:
                continue
            bits = [(r["policy"][n]["w"], r["policy"][n]["a"]) for r in finished for n in names]
            shares = {}
            if params is not None:
                pairs = [bit_shares(r["policy"], names, macs, params) for r in finished]
                shares = {"bitops_share": statistics.mean(o for o, _ in pairs),
                          "size_share": statistics.mean(z for _, z in pairs)}
            out.append({"method": method, "budget": budget, "kind": kind, "layers": len(names),
                        "macs_share": sum(macs[n] for n in names) / total_macs,
                        "mean_w": statistics.mean(w for w, _ in bits), "mean_a": statistics.mean(a for _, a in bits),
                        "w2_share": sum(w == 2 for w, _ in bits) / len(bits),
                        "a2_share": sum(a == 2 for _, a in bits) / len(bits),
                        **shares, "top1": statistics.mean(r["test_top1"] for r in finished), "n": len(finished)})
    return out


def front_arguments(description: str, default_model: str, argv=None) -> argparse.Namespace:
    """--model, --preset, --state-dir: which finished front's rows to read (shared by the front's readers)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default=default_model)
    p.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    p.add_argument("--state-dir", default=str(STATE), help="the front benchmark's state (its rows)")
    return p.parse_args(argv)


def front_rows_file(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) / f"{args.model}-{args.preset}" / "rows.jsonl"


def report_name(prefix: str, args: argparse.Namespace) -> str:
    """<prefix>-<model>-<preset>, and -<state dir's name> for another directory (an experiment's rows get their
    own report, not the committed front's)."""
    state = Path(args.state_dir)
    suffix = "" if state.resolve() == STATE.resolve() else f"-{state.name}"
    return f"{prefix}-{args.model}-{args.preset}{suffix}"


def main(argv=None) -> None:
    args = front_arguments(__doc__, "mobilenetv2", argv)
    rows_file = front_rows_file(args)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    model = create(args.model, num_classes=10, in_chans=1, width=PRESETS[args.preset]["width"][args.model],
                   **MODELS[args.model])
    stats = profile(model, (1, 28, 28))
    macs = {name: layer.macs for name, layer in stats.layers.items()}
    params = {name: layer.params for name, layer in stats.layers.items()}
    summary = summarise(rows, layer_kinds(model, macs), macs, params)
    columns = ["method", "budget", "kind", "layers", "macs_share", "bitops_share", "size_share", "mean_w", "mean_a",
               "w2_share", "a2_share", "top1", "n"]
    header = (f"bits per kind of layer on the {args.model} {args.preset} front ({rows_file}); means over the "
              "kind's layers and the seeds; w2/a2_share: share of those layers at 2-bit weights / activations; "
              "bitops/size_share: the kind's share of each policy's BitOPs / weight bits (every layer counted), mean "
              "over seeds.")
    write_report(report_name("policy-layers", args), header, markdown_table(summary, columns),
                 {"args": vars(args), "codes": sorted({str(r.get("code")) for r in rows}), "summary": summary})


if __name__ == "__main__":
    main()
