"""The sharded front: shards' rows merged into the front's state, a deadline that keeps what finished."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sharded_front  # noqa: E402
from sharded_front import Shards, read_rows, write_rows  # noqa: E402


def row(method: str, seed: int, top1: float) -> dict:
    return {"method": method, "budget": "uniform:3", "seed": seed, "test_top1": top1,
            "key": f"{method}|uniform:3|{seed}", "code": "c"}


def args_for(state_dir: Path, **extra) -> argparse.Namespace:
    return argparse.Namespace(model="resnet20", preset="quick", device="cuda", data_dir=None, state_dir=str(state_dir),
                              jobs=2, threads=1, merge_every=60.0, **extra)


def test_a_line_cut_short_by_a_stopped_shard_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row("hawq", 0, 70.0)) + "\n" + json.dumps(row("hawq", 1, 71.0))[:25])
    assert list(read_rows(path)) == ["hawq|uniform:3|0"]


def test_merge_tags_only_this_runs_rows_with_the_device(tmp_path):
    main = tmp_path / "resnet20-quick"
    main.mkdir()
    earlier = row("uniform-ref", 0, 80.0)  # made by front.py on another machine: no device of its own
    write_rows(main / "rows.jsonl", {earlier["key"]: earlier})
    shards = Shards(args_for(tmp_path))
    shard = shards.root / "hawq-s0" / "resnet20-quick"
    shard.mkdir(parents=True)
    new = row("hawq", 0, 75.0)
    write_rows(shard / "rows.jsonl", {earlier["key"]: {**earlier, "test_top1": 1.0}, new["key"]: new})
    assert shards.merge() == 2
    merged = read_rows(main / "rows.jsonl")
    assert merged[earlier["key"]] == earlier  # the shard's copy of an earlier row never replaces it
    assert merged[new["key"]] == {**new, "device": "cuda"}


def test_the_deadline_stops_running_shards_and_keeps_the_rows_they_finished(tmp_path, monkeypatch):
    # A stand-in for front.py: finishes one row at once, then would run for a minute.
    fake = tmp_path / "fake_front.py"
    fake.write_text(textwrap.dedent("""
        import json, sys, time
        from pathlib import Path
        args = sys.argv[1:]
        state = Path(args[args.index("--state-dir") + 1]) / "resnet20-quick"
        method, seed = args[args.index("--methods") + 1], int(args[args.index("--seeds") + 1])
        key = f"{method}|uniform:3|{seed}"
        row = {"method": method, "budget": "uniform:3", "seed": seed, "test_top1": 50.0, "key": key, "code": "c"}
        (state / "rows.jsonl").write_text(json.dumps(row) + "\\n")
        print("row written", flush=True)
        time.sleep(60)
    """))
    monkeypatch.setattr(sharded_front, "FRONT", fake)
    main = tmp_path / "state" / "resnet20-quick"
    main.mkdir(parents=True)
    (main / "float.pt").write_bytes(b"weights")
    shards = Shards(args_for(tmp_path / "state"))
    finished = shards.run([[(0, "hawq"), (1, "hawq")]], deadline=time.monotonic() + 4)
    assert not finished and not shards.running and not shards.failed
    assert sorted(read_rows(main / "rows.jsonl")) == ["hawq|uniform:3|0", "hawq|uniform:3|1"]
    assert (shards.root / "hawq-s0" / "resnet20-quick" / "float.pt").read_bytes() == b"weights"
