"""Cost of one-shot's information distortion mitigation (IDM, Eq. 8) in one sandwich step, forward and backward.

    python benchmarks/experiments/idm_cost.py [--pairs 15] [--batch 128]

On ResNet-20's 18 searchable conv outputs at 28 px (batch 128): the smallest policy's pass aligns all 18
layers and the sampled pass, on average, a fifth of them (those drawn at their smallest weight bits). Timed
three ways, interleaved in one process: Eq. 8 written out step by step (``alignment_loss_reference``, each
pass normalising the targets again) against the library's form (targets made once per step, a hand-written
backward), run as eager ops and as the compiled kernels the quantizers also use (``set_fused``, the default
where a C compiler is found). Writes benchmarks/experiments/results/idm-cost.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS as RESULTS  # noqa: E402
from common import markdown_table, metadata, write_result

from mixbits.quant import set_fused  # noqa: E402
from mixbits.search.oneshot.idm import alignment_loss_reference, alignment_target, target_distance  # noqa: E402

# ResNet-20's searchable convolutions on 28 px images: three stages of six, (channels, side)
STAGES = ((16, 28), (32, 14), (64, 7))
SAMPLED_SHARE = 0.2  # a sampled policy puts a layer at its smallest weight bits with 1 of 5 candidates


def step_inputs(batch: int) -> tuple[list, list[list], list, list]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, c, s, s) for c, s in STAGES for _ in range(6)]
    highs = [torch.randn(shape, generator=gen) for shape in shapes]
    aligned = [len(shapes), round(SAMPLED_SHARE * len(shapes))]  # layers aligned in each of the step's two passes
    lows = [[torch.randn(shape, generator=gen).requires_grad_() for shape in shapes[:n]] for n in aligned]
    etas = [torch.ones(shape[1], requires_grad=True) for shape in shapes]
    xis = [torch.zeros(shape[1], requires_grad=True) for shape in shapes]
    return highs, lows, etas, xis


def reference_step(highs, lows, etas, xis) -> None:
    for low in lows:  # a pass aligns its first len(low) layers
        terms = [alignment_loss_reference(x, h, e, b) for x, h, e, b in zip(low, highs, etas, xis, strict=False)]
        torch.stack(terms).mean().backward()


def library_step(highs, lows, etas, xis) -> None:
    targets = [alignment_target(h) for h in highs]
    for low in lows:
        terms = [target_distance(x, t, e, b) for x, t, e, b in zip(low, targets, etas, xis, strict=False)]
        torch.stack(terms).mean().backward()


def library_with(fused: bool):
    def step(*inputs) -> None:
        set_fused(fused)
        library_step(*inputs)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    inputs = step_inputs(args.batch)
    steps = {"Eq. 8 written out": reference_step, "mixbits, eager ops": library_with(False),
             "mixbits, compiled kernels": library_with(True)}
    seconds = {name: [] for name in steps}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step(*inputs)
    for _ in range(args.pairs):
        for name, step in steps.items():
            started = time.perf_counter()
            step(*inputs)
            seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["Eq. 8 written out"])
    rows = [{"form": name, "ms": round(1e3 * statistics.median(s), 1), "ratio": round(statistics.median(s) / base, 3)}
            for name, s in seconds.items()]
    meta = metadata()
    text = "\n".join(["# IDM cost in one sandwich step", "",
                      f"`python benchmarks/experiments/idm_cost.py` at {meta['commit']} ({meta['date']}), "
                      f"{torch.get_num_threads()} threads, batch {args.batch}, median of {args.pairs} interleaved "
                      "steps; forward and backward of the alignment terms only.", "",
                      markdown_table(rows, ["form", "ms", "ratio"]), ""])
    print(text)
    (RESULTS / "idm-cost.md").write_text(text)
    path = write_result('idm-cost', {'batch': args.batch, 'pairs': args.pairs, 'rows': rows}, directory=RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
