"""Reports: Markdown tables and PNG plots of policies, costs, accuracy and fronts.

Plots need matplotlib (``pip install 'mixbits[plot]'``); without it the Markdown is written alone and
says so. Nothing here trains or evaluates: it reads what runs and benchmarks wrote.
"""

from __future__ import annotations

from pathlib import Path

from .cost import ModelStats, cost_summary, cost_table, profile
from .errors import MixbitsError
from .pipeline import ModelCard, read_card, resolve_checkpoint
from .space import Policy
from .train import load_checkpoint
from .utils import atomic_write_text, parse_json, read_text


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def policy_chart(policy: Policy, path: Path, title: str) -> bool:
    """Grouped bars of weight and activation bits per layer."""
    plt = _pyplot()
    if plt is None:
        return False
    names = list(policy.bits)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    ax.bar([x - 0.2 for x in xs], [policy[n][0] for n in names], width=0.4, label="weight bits")
    ax.bar([x + 0.2 for x in xs], [policy[n][1] for n in names], width=0.4, label="activation bits")
    ax.set_xticks(list(xs), names, rotation=75, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def front_chart(points: list[dict], path: Path, x: str, y: str, title: str, group: str | None = None) -> bool:
    """Scatter of ``y`` against ``x`` (e.g. val loss vs BitOPs), one series per ``group`` value."""
    plt = _pyplot()
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    if plt is None or not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({str(p.get(group, "")) for p in pts}):
        sel = [p for p in pts if str(p.get(group, "")) == key]
        ax.scatter([p[x] for p in sel], [p[y] for p in sel], s=14, alpha=0.7, label=key or None)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if group:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _policy_section(card: ModelCard, stats: ModelStats, policy: Policy, out: Path, stem: str) -> list[str]:
    summary = cost_summary(stats, policy)
    lines = [f"BitOPs {summary['bitops'] / 1e9:.4f} G, size {summary['size_bits'] / 8e3:.2f} KB, "
             f"compression x{summary['compression_bitops']:.1f} BitOPs / x{summary['compression_size']:.1f} size", ""]
    if policy_chart(policy, out / f"{stem}.png", f"{card.name}: bits per layer"):
        lines += [f"![bits per layer]({stem}.png)", ""]
    lines.append(_md_table(cost_table(stats, policy), ["name", "macs", "params", "w", "a", "bitops", "share"]))
    return lines + [""]


def report_run(run_dir: Path, out: Path) -> Path:
    """report.md (and PNGs) for a `mixbits train` or `mixbits search` run directory."""
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / "search.json").is_file():
        lines = _search_report(run_dir, out)
    else:
        lines = _train_report(run_dir, out)
    if _pyplot() is None:
        lines.append("_Plots skipped: install matplotlib (`pip install 'mixbits[plot]'`)._")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _train_report(run_dir: Path, out: Path) -> list[str]:
    source = resolve_checkpoint(run_dir)
    card = read_card(load_checkpoint(source), source)
    result = _json(run_dir / "result.json", dict)
    lines = [f"# {run_dir.name}: {card.name}", "", f"Test top-1: {result.get('test_top1', 'n/a')} %", ""]
    metrics = run_dir / "metrics.jsonl"
    history = _records([_parse(line, metrics) for line in read_text(metrics, "metrics file").splitlines()
                        if line.strip()], metrics)
    lines += ["## Training", "", _md_table(history, ["epoch", "lr", "train_loss", "train_top1", "val_loss",
                                                       "val_top1", "seconds"]), ""]
    if card.policy is not None:
        stats = profile(card.float_model(), card.example_input())
        lines += ["## Policy and cost", ""] + _policy_section(card, stats, card.policy, out, "policy")
    return lines


def _search_report(run_dir: Path, out: Path) -> list[str]:
    search = _json(run_dir / "search.json", dict)
    missing = [k for k in ("method", "seconds", "budgets", "policies") if k not in search]
    if missing:
        raise MixbitsError(f"{run_dir / 'search.json'} lacks {', '.join(missing)}; it is corrupt or was not "
                           "written by `mixbits search`")
    rows = _optional_rows(run_dir / "result.json")
    lines = [f"# {run_dir.name}: {search['method']} search", "",
             f"Search time {search['seconds']:.1f} s for {len(search['budgets'])} budget(s).", ""]
    if rows:
        lines += ["## Results", "", _md_table(rows, ["budget", "test_top1", "bitops", "size_bytes", "avg_w_bits",
                                                      "avg_a_bits", "train_seconds"]), ""]
    front = _optional_rows(run_dir / "front.json")
    if front and front_chart(front, out / "front.png", "bitops", "loss", "evaluated policies", group="budget"):
        lines += ["## Front", "", "![front](front.png)", ""]
    finetune = run_dir / "finetune"
    for i, (budget, policy) in enumerate(zip(search["budgets"], search["policies"], strict=True)):
        run = finetune / f"budget{i}"
        if (run / "checkpoint.pt").is_file():
            card = read_card(load_checkpoint(run / "checkpoint.pt"), run)
            stats = profile(card.float_model(), card.example_input())
            lines += [f"## Budget {budget}", ""]
            lines += _policy_section(card, stats, Policy.from_dict(policy), out, f"policy{i}")
    return lines


def benchmark_outputs(path: Path, out: Path) -> tuple[Path, Path]:
    """The Markdown and the plot :func:`report_benchmark` writes for ``path`` into ``out``."""
    return out / f"{path.stem}.md", out / f"{path.stem}.png"


def report_benchmark(path: Path, out: Path) -> Path:
    """<stem>.md for a benchmark result JSON (e.g. front-resnet20-medium.json): its table and, for fronts, the plot."""
    data = _json(path, dict)
    report, plot = benchmark_outputs(path, out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {path.stem}", "", f"{data.get('meta', {})}", "", str(data.get("table", ""))]
    rows = _records(data.get("rows", []), path)
    if rows and "bitops" in rows[0] and front_chart(rows, plot, "bitops", "test_top1", "accuracy vs BitOPs",
                                                    group="method"):
        lines += ["", f"![front]({plot.name})"]
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _json(path: Path, expected: type):
    """The JSON ``expected`` (dict or list) that a run or benchmark wrote to ``path``; anything else is an error."""
    if not path.is_file():
        raise MixbitsError(f"{path} is missing; is this a finished mixbits run or benchmark result?")
    data = _parse(read_text(path, "result file"), path)
    if not isinstance(data, expected):
        raise MixbitsError(f"{path} holds a JSON {type(data).__name__} where mixbits writes a JSON "
                           f"{'object' if expected is dict else 'array'}; it is corrupt or was not written by mixbits")
    return data


def _parse(text: str, path: Path):
    return parse_json(text, str(path), "it is corrupt or was not written by mixbits")


def _optional_rows(path: Path) -> list[dict]:
    """The list of JSON objects in ``path``, or none when the file does not exist (yet)."""
    return _records(_json(path, list), path) if path.is_file() else []


def _records(rows, path: Path) -> list[dict]:
    """``rows`` when it is a list of JSON objects (table rows, front points, metric lines)."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MixbitsError(f"{path} should hold a list of JSON objects (one per row); it is corrupt or was not "
                           "written by mixbits")
    return rows
