"""The accuracy-vs-BitOPs front of front.py, run as parallel shards on one machine, its rows merged.

    python benchmarks/sharded_front.py --model mobilenetv2 --preset medium --device cuda \\
        --state-dir benchmarks/experiments/front-state/cuda --deadline 480

front.py runs every (seed, method) in turn in one process, which leaves a GPU mostly idle on models this
small. Here each seed's uniform references run first (one process per seed), then one front.py process per
(seed, method), at most --jobs at a time, the longest methods first. A shard keeps its rows in a state dir of
its own (a copy of the rows finished so far and of the float weights); every --merge-every seconds, and at
the end, the shards' new rows are merged into <state-dir>/<model>-<preset>/rows.jsonl, so what finished
before --deadline (where the shards still running are stopped) is kept and the next run resumes from it.
The report is then written from the merged rows as results/front-<model>-<preset>-<label>.{md,json,png}.

Rows merged here record the device they ran on ("device"). Their seconds were measured in processes
sharing one machine: compare their passes, not their seconds, with front.py's own rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402
from front import DEFAULT_METHODS, PRESETS  # noqa: E402

FRONT = Path(__file__).parent / "front.py"
# The order shards start in: the longest first (seconds per seed on the MobileNetV2 medium front, 2 CPU cores).
LONGEST_FIRST = ("dnas", "oneshot", "dmpq", "ssps", "random", "sdq", "hawq")


def read_rows(path: Path) -> dict[str, dict]:
    """The rows of a rows.jsonl by key; a line cut short by a stopped shard is skipped."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["key"]] = row
    return rows


def write_rows(path: Path, rows: dict[str, dict]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    temporary.replace(path)  # never a half-written file, whenever this process is stopped


class Shards:
    def __init__(self, args):
        self.args = args
        self.name = f"{args.model}-{args.preset}"
        self.main = Path(args.state_dir) / self.name
        self.root = Path(args.state_dir) / "shards" / self.name
        self.known = set(read_rows(self.main / "rows.jsonl"))  # rows made before this run keep their device
        self.running: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.failed: list[str] = []

    def start(self, label: str, seed: int, method: str) -> None:
        state = self.root / label / self.name
        state.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.main / "float.pt", state / "float.pt")
        write_rows(state / "rows.jsonl", read_rows(self.main / "rows.jsonl"))
        command = [sys.executable, str(FRONT), "--model", self.args.model, "--preset", self.args.preset,
                   "--device", self.args.device, "--state-dir", str(self.root / label), "--methods", method,
                   "--seeds", str(seed)] + (["--data-dir", self.args.data_dir] if self.args.data_dir else [])
        env = {"OMP_NUM_THREADS": str(self.args.threads), "MKL_NUM_THREADS": str(self.args.threads), **os.environ}
        log = open(self.root / f"{label}.log", "w")  # noqa: SIM115 (closed with its process)
        self.running[label] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        print(f"started {label}", flush=True)

    def poll(self) -> None:
        for label, (process, log) in list(self.running.items()):
            if process.poll() is not None:
                log.close()
                del self.running[label]
                if process.returncode != 0:
                    self.failed.append(label)
                    tail = (self.root / f"{label}.log").read_text().splitlines()[-15:]
                    print(f"{label} failed (exit {process.returncode}):\n  " + "\n  ".join(tail), flush=True)
                else:
                    print(f"finished {label}", flush=True)

    def stop_all(self) -> None:
        for process, _ in self.running.values():
            process.send_signal(signal.SIGTERM)
        for label, (process, log) in self.running.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
            print(f"stopped {label} at the deadline", flush=True)
        self.running.clear()

    def merge(self) -> int:
        rows = read_rows(self.main / "rows.jsonl")
        for path in sorted(self.root.glob(f"*/{self.name}/rows.jsonl")):
            for key, row in read_rows(path).items():
                if key not in self.known:
                    rows[key] = {**row, "device": self.args.device}
        write_rows(self.main / "rows.jsonl", rows)
        return len(rows)

    def run(self, batches: list[list[tuple[int, str]]], deadline: float) -> bool:
        """Each batch's shards, at most --jobs at a time; False where the deadline stopped the run."""
        last_merge = time.monotonic()
        for batch in batches:
            pending = list(batch)
            while pending or self.running:
                self.poll()
                while pending and len(self.running) < self.args.jobs:
                    seed, method = pending.pop(0)
                    self.start(f"{method}-s{seed}", seed, method)
                if time.monotonic() > deadline:
                    self.stop_all()
                    self.merge()
                    print(f"deadline: {len(pending)} shards not started", flush=True)
                    return False
                if time.monotonic() - last_merge > self.args.merge_every:
                    print(f"{self.merge()} rows merged", flush=True)
                    last_merge = time.monotonic()
                time.sleep(1)
            self.merge()
        return True


def report(args, label: str) -> None:
    """front.py's report from the merged rows, renamed to carry ``label``; every shard also wrote the unlabelled
    report of its own rows, so that one is put back as it was."""
    name = f"front-{args.model}-{args.preset}"
    command = [sys.executable, str(FRONT), "--model", args.model, "--preset", args.preset, "--device", args.device,
               "--state-dir", args.state_dir, "--report-only", "--methods", *args.methods]
    subprocess.run(command + (["--data-dir", args.data_dir] if args.data_dir else []), check=True)
    for suffix in (".md", ".json", ".png"):
        (RESULTS / f"{name}{suffix}").replace(RESULTS / f"{name}-{label}{suffix}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--state-dir", required=True, help="holds <model>-<preset>/float.pt; the merged rows go there")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="shards running at once")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per shard")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which running shards are stopped")
    p.add_argument("--merge-every", type=float, default=30.0)
    p.add_argument("--label", help="the report's suffix (default: the device type)")
    args = p.parse_args(argv)
    shards = Shards(args)
    if not (shards.main / "float.pt").is_file():
        p.error(f"{shards.main / 'float.pt'} does not exist: train the float model first, with front.py "
                f"--model {args.model} --preset {args.preset} --methods uniform --seeds 0 --state-dir {args.state_dir}")
    seeds = args.seeds or PRESETS[args.preset]["seeds"]
    order = sorted(args.methods, key=lambda m: LONGEST_FIRST.index(m) if m in LONGEST_FIRST else len(LONGEST_FIRST))
    kept = {p: p.read_bytes() for p in RESULTS.glob(f"front-{args.model}-{args.preset}.*")}
    started = time.monotonic()
    deadline = started + args.deadline if args.deadline else float("inf")
    try:
        finished = shards.run([[(s, "uniform") for s in seeds], [(s, m) for m in order for s in seeds]], deadline)
    finally:
        shards.stop_all()
        print(f"{shards.merge()} rows in {shards.main / 'rows.jsonl'} after {time.monotonic() - started:.0f} s",
              flush=True)
    report(args, args.label or args.device.split(":")[0])
    for path, content in kept.items():
        path.write_bytes(content)
    if shards.failed or not finished:
        sys.exit(f"shards failed: {shards.failed}" if shards.failed else "stopped at the deadline; run again to resume")


if __name__ == "__main__":
    main()
