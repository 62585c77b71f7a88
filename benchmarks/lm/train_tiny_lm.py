"""Train the tiny causal LM (mixbits.lm.tiny) on the Python standard library's source, bytes as tokens.

Resumable: a checkpoint every ``--save-every`` steps in ``--out``; a run stopped by ``--max-minutes`` (or
killed) continues from it when started again with the same settings, and a finished run is a cache hit
(it only prints its record). Writes ``<out>/model.pt`` (weights and config) and ``<out>/record.json``
(held-out perplexity, steps, seconds, corpus).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lm/train_tiny_lm.py --out runs/tiny-lm --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mixbits.lm.corpus import describe, fixed_windows, load_split, random_windows
from mixbits.lm.evaluate import next_token_loss, perplexity
from mixbits.lm.tiny import TinyCausalLM, TinyLMConfig

EVAL_WINDOWS = 256


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tiny-lm")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=TinyLMConfig.width)
    p.add_argument("--layers", type=int, default=TinyLMConfig.layers)
    p.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help="held-out windows for the perplexity")
    p.add_argument("--corpus-root", default=None, help="a directory of .py files (default: the standard library)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=20.0, help="stop (checkpointed) after this long")
    return p.parse_args()


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # what decides the weights and the record; a run with other settings does not reuse them
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "save_every", "max_minutes")}
    record_path, ckpt_path = out / "record.json", out / "checkpoint.pt"
    if record_path.exists() and json.loads(record_path.read_text())["settings"] == settings:
        print(record_path.read_text())  # finished before with these settings: nothing to do
        return
    torch.manual_seed(args.seed)
    cfg = TinyLMConfig(width=args.width, layers=args.layers)
    model = TinyCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    step, seconds = 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["settings"] != settings:
            raise SystemExit(f"{ckpt_path} was written with {ckpt['settings']}, not {settings}; use another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, seconds = ckpt["step"], ckpt["seconds"]
        print(f"resuming at step {step}")
    train, held = load_split(args.corpus_root)
    print(describe(train, held), f"params={sum(p.numel() for p in model.parameters())}")

    def save() -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                    "seconds": seconds, "settings": settings}, ckpt_path)

    start = time.perf_counter() - seconds
    began = time.perf_counter()
    model.train()
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = next_token_loss(model, random_windows(train, args.batch, cfg.context, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seconds = time.perf_counter() - start
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {seconds:.0f}s", flush=True)
        if step % args.save_every == 0:
            save()
        if time.perf_counter() - began > 60 * args.max_minutes and step < args.steps:
            save()
            print(f"stopped at step {step} after --max-minutes {args.max_minutes}; run again to continue")
            return
    ppl = perplexity(model, fixed_windows(held, args.eval_windows, cfg.context))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, out / "model.pt")
    record = {"settings": settings, "config": cfg.to_dict(), "held_out_ppl": ppl, "steps": step,
              "train_seconds": round(seconds, 1), "eval_windows": args.eval_windows, **describe(train, held)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
