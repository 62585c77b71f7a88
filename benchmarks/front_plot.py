"""The front benchmark's picture: test top-1 against BitOPs, the uniform front as a line, each method's points
with their 95 % intervals."""

from __future__ import annotations

import math
from pathlib import Path


def plot_front(rows: list[dict], summary: list[dict], float_top1: float, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary = [s for s in summary if s["test_top1"] is not None]  # a point whose every run diverged has none
    refs = sorted((s["bitops"] / 1e6, s["test_top1"]) for s in summary if s["method"] == "uniform-ref")
    if refs:
        ax.plot(*zip(*refs, strict=True), color="black", marker="s", label="uniform front (W2A2, W3A3, W4A4)")
    methods = sorted({s["method"] for s in summary} - {"uniform-ref"})
    for i, method in enumerate(methods):
        pts = sorted((s["bitops"] / 1e6, s["test_top1"], s["top1_ci95"]) for s in summary if s["method"] == method)
        x, y, err = zip(*pts, strict=True)
        err = [0.0 if math.isnan(e) else e for e in err]
        shift = 1 + 0.01 * (i - len(methods) / 2)  # side by side at the same budget
        ax.errorbar([v * shift for v in x], y, yerr=err, marker="o", linestyle="", capsize=3, label=method, alpha=0.85)
    ax.axhline(float_top1, color="gray", linestyle="--", label="float")
    ax.set_xscale("log")
    ax.set_xlabel("BitOPs (M, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Accuracy vs BitOPs: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
