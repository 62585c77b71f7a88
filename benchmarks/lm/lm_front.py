"""Held-out perplexity of the tiny LM (benchmarks/lm/train_tiny_lm.py) under weight-only quantization.

Rows: the float model; one bit-width on every layer (``uniform-rtn``, ``uniform-hqq``, ``uniform-gptq``) at 2,
3, 4 bits; then, with the hqq and with the gptq quantizer (the suffix), at 2.5, 3.0 and 3.5 bits per weight: a
llama.cpp-style rule of thumb (``rule``: ``v_proj``/``down_proj`` one step higher in the layers llama.cpp's
Q4_K_M picks, the rest at the most bits that fit), seeded ``random`` allocations (3 seeds) and the searched
allocations (``ilp``, ``greedy``, KL score; ``ilp-hqq-output``: the output-error score); and uniform HQQ at
group sizes 32/64/128. Each in two storage formats: a float16 zero point
(``fp16-zero``) and an integer zero point of the weight's bits (``int-zero``). ``bpw`` counts scales and zeros.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lm/lm_front.py --run runs/tiny-lm
Writes benchmarks/results/lm-front.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import markdown_table, write_report  # noqa: E402

import mixbits  # noqa: E402
from mixbits.errors import MixbitsError  # noqa: E402
from mixbits.lm.corpus import fixed_windows, load_split, random_windows  # noqa: E402
from mixbits.lm.evaluate import perplexity  # noqa: E402
from mixbits.lm.tiny import TinyCausalLM, TinyLMConfig  # noqa: E402

BUDGETS = ("bpw<=2.5", "bpw<=3.0", "bpw<=3.5")
NEXT = {2: 3, 3: 4, 4: 8}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/tiny-lm", help="the training script's --out")
    p.add_argument("--calibration", type=int, default=16, help="calibration windows (context tokens each)")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--cache", default=None, help="measurement cache (default: <run>/measurements)")
    return p.parse_args()


def more_bits_layers(n: int) -> list[int]:
    """llama.cpp's use_more_bits(i, n): the first and last eighth of the layers and every third in between."""
    return [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]


def rule(model, calibration, budget: str, layers: int, **kw):
    """The rule of thumb at the most base bits that fit: picked layers' v_proj/down_proj one step higher."""
    picked = "|".join(map(str, more_bits_layers(layers)))
    for base in (4, 3, 2):
        overrides = {rf"blocks\.({picked})\.(attn\.v_proj|mlp\.down_proj)": NEXT[base]}
        try:
            result = mixbits.quantize_weights(model, calibration, budget, "uniform", bits=(base,),
                                              overrides=overrides, **kw)
        except MixbitsError:
            continue
        return result
    return None


def table(rows: list[dict]) -> str:
    """The Markdown table; perplexities to 4 decimals (the rows differ in the second or third)."""
    shown = [{**r, "ppl": f"{r['ppl']:.4f}"} for r in rows]
    return markdown_table(shown, ["method", "format", "budget", "bpw", "seed", "ppl", "search_seconds"])


def main() -> None:
    args = parse()
    run = Path(args.run)
    saved = torch.load(run / "model.pt", weights_only=False)
    cfg = TinyLMConfig(**saved["config"])
    model = TinyCausalLM(cfg)
    model.load_state_dict(saved["model"])
    model.eval()
    train, held = load_split()
    held_windows = fixed_windows(held, args.eval_windows, cfg.context)
    calibration = [random_windows(train, args.calibration, cfg.context, torch.Generator().manual_seed(0))[:, :-1]]
    cache = args.cache or run / "measurements"
    rows = [{"method": "float", "format": "", "budget": "", "bpw": 16.0, "ppl": perplexity(model, held_windows)}]

    def add(method, fmt, budget, result, seed=None, **extra):
        rows.append({"method": method, "format": fmt, "budget": budget, "bpw": round(result.bpw, 4), "seed": seed,
                     "ppl": perplexity(result.model, held_windows),
                     "search_seconds": round(result.measure_seconds + result.solve_seconds, 2), **extra})
        print(json.dumps(rows[-1]), flush=True)

    for fmt, integer_zero in (("fp16-zero", False), ("int-zero", True)):
        kw = {"integer_zero": integer_zero, "cache_dir": cache}
        for q in ("rtn", "hqq", "gptq"):
            for b in (2, 3, 4):
                add(f"uniform-{q}", fmt, f"{b} bits",
                    mixbits.quantize_weights(model, calibration, "bpw<=16", "uniform", quantizer=q, bits=(b,), **kw))
        for budget in BUDGETS:
            for q in ("hqq", "gptq"):
                qkw = {**kw, "quantizer": q}
                result = rule(model, calibration, budget, cfg.layers, **qkw)
                if result is not None:
                    add(f"rule-{q}", fmt, budget, result)
                for seed in (0, 1, 2):
                    add(f"random-{q}", fmt, budget,
                        mixbits.quantize_weights(model, calibration, budget, "random", seed=seed, **qkw), seed=seed)
                for method in ("ilp", "greedy"):
                    add(f"{method}-{q}", fmt, budget, mixbits.quantize_weights(model, calibration, budget, method,
                                                                               **qkw))
            add("ilp-hqq-output", fmt, budget,
                mixbits.quantize_weights(model, calibration, budget, "ilp", quantizer="hqq", score="output", **kw))
    for g in (32, 64, 128):
        for b in (3, 4):
            add(f"uniform-hqq-g{g}", "fp16-zero", f"{b} bits", mixbits.quantize_weights(
                model, calibration, "bpw<=16", "uniform", quantizer="hqq", bits=(b,), group_size=g, cache_dir=cache))
    header = (f"# Tiny LM weight-only quantization: held-out perplexity\n\nModel {run / 'model.pt'} "
              f"({sum(p.numel() for p in model.parameters())} parameters, trained by benchmarks/lm/train_tiny_lm.py); "
              f"held-out: {args.eval_windows} windows of {cfg.context} bytes of the standard library's held-out files; "
              f"calibration: {args.calibration} windows from the training files. Groups of 64 unless named; "
              "search_seconds = the measurement's seconds (measured once per format, quantizer and score, then "
              "read back from the cache) + the allocation's.")
    write_report("lm-front", header, table(rows),
                 {"rows": rows, "run": str(run), "model_config": cfg.to_dict(), "calibration_windows": args.calibration,
                  "eval_windows": args.eval_windows, "seconds": round(time.process_time(), 1)})


if __name__ == "__main__":
    main()
