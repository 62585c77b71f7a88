"""Does the demo's verdict hold over seeds? `mixbits demo` at seeds 0, 1 and 2, each from scratch.

    python benchmarks/demo_seeds.py                # the default demo (bitops<=uniform:2.25, HAWQ)
    python benchmarks/demo_seeds.py --bits 2.5 --method oneshot

Each seed runs the whole demo (float model, every uniform-like policy that fits, the search and its fine-tune) in
benchmarks/cache/demo/<bits>-<method>-s<seed>/; a finished stage is reused when rerun, so an interrupted run
resumes. Writes benchmarks/results/demo-seeds.json and .md: per seed the test top-1 of every policy, the mixed
policy's margin over the best uniform-like one, and the demo's wall seconds (a resumed seed's are not comparable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_report  # noqa: E402

CACHE = Path(__file__).parent / "cache" / "demo"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2.25")
    p.add_argument("--method", default="hawq")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        out = CACHE / f"{args.bits}-{args.method}-s{seed}"
        fresh = not out.exists()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mixbits", "demo", "--bits", args.bits, "--method", args.method,
                        "--seed", str(seed), "--out", str(out)], check=True)
        seconds = time.perf_counter() - started
        summary = json.loads((out / "demo.json").read_text())
        rows.append({"seed": seed, **{f"top1 {k}": v for k, v in summary["top1"].items()},
                     "best_uniform_like": summary["best_uniform_like"], "gain": summary["gain"],
                     "seconds": seconds if fresh else None})
    wins = sum(r["gain"] > 0 for r in rows)
    header = (f"`mixbits demo --bits {args.bits} --method {args.method}` at seeds {args.seeds}: the mixed policy beats "
              f"the best uniform-like policy that fits at {wins} of {len(rows)} seeds. gain: its test top-1 minus "
              "that policy's (10,000 test images); seconds: the whole demo from scratch (empty where resumed).")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_report("demo-seeds", header, markdown_table(rows, columns), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
