"""What every benchmark shares: interleaved A/B timing, run metadata, and writing results.

Timings on small shared machines are noisy, so a speed figure is always a ratio of two steps run
alternately in one process (A B A B ...), reported as the median of the pairwise ratios with its
inter-quartile range.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"  # the benchmarks of record
# The comparisons that chose a default (benchmarks/experiments/): kept apart from the results of record.
EXPERIMENT_RESULTS = Path(__file__).parent / "experiments" / "results"


def metadata() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def write_result(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"meta": metadata(), **payload}, indent=2) + "\n")
    return path


def write_report(name: str, header: str, table: str, payload: dict, directory: Path = RESULTS) -> Path:
    """Print a result's header and Markdown table, and write them as <directory>/<name>.md beside <name>.json."""
    print(f"\n{header}\n\n{table}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.md").write_text(f"{header}\n\n{table}\n")
    return write_result(name, payload, directory)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[], None]) -> float:
    _sync()
    start = time.perf_counter()
    step()
    _sync()
    return time.perf_counter() - start


def ratio(base: Callable[[], None], other: Callable[[], None], pairs: int = 20, warmup: int = 3) -> dict:
    """Median and IQR of other/base over ``pairs`` adjacent runs, alternating which goes first."""
    for _ in range(warmup):
        base(), other()
    ratios, base_s, other_s = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            b, o = timed(base), timed(other)
        else:
            o, b = timed(other), timed(base)
        ratios.append(o / b)
        base_s.append(b)
        other_s.append(o)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"ratio": statistics.median(ratios), "iqr": [q1, q3], "base_ms": 1e3 * statistics.median(base_s),
            "other_ms": 1e3 * statistics.median(other_s), "pairs": pairs}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def front_float_model(name: str) -> torch.nn.Module | None:
    """The float weights the front benchmark trained for ``name`` at the medium preset (front-state/<name>-medium/
    float.pt), in the model as the front builds it, in eval mode; None when they were not kept. Raises
    RuntimeError when the kept weights do not fit that model."""
    from front import MODELS, PRESETS, STATE  # the front imports this module

    from mixbits.models import create

    path = STATE / f"{name}-medium" / "float.pt"
    if name not in MODELS or not path.is_file():
        return None
    model = create(name, num_classes=10, in_chans=1, width=PRESETS["medium"]["width"][name], **MODELS[name])
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval()
