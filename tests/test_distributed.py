"""Data-parallel training with real processes on gloo: `torchrun -m mixbits train` on two ranks trains the
same weights as one process with the global batch, and only rank 0 writes; the collectives behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_resume_kill import write_fashion_mnist
from torch import nn

from mixbits.quant import apply_policy, calibrate, quant_layers, quantize_model
from mixbits.rundir import MARKER
from mixbits.space import Policy, SearchSpace
from mixbits.train import (
    DistContext,
    all_reduce_mean,
    broadcast_module_state,
    broadcast_object,
    init_from_env,
    unwrap,
    wrap_ddp,
)

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PER_RANK_BATCH = 16

# Runs the real CLI with a BatchNorm-free model registered: per-rank BatchNorm statistics are the one thing
# that legitimately differs from one process, so without BN the two runs must agree up to float rounding.
# Every atomic file write (os.replace) is logged per rank, to show which ranks write.
LAUNCHER = textwrap.dedent('''
    import os
    import sys

    from torch import nn

    from mixbits.__main__ import main
    from mixbits.models import MODELS


    @MODELS.register("tiny_convnet")
    def tiny_convnet(num_classes=10, in_chans=1):
        return nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


    def logged_replace(src, dst, _replace=os.replace):
        with open(os.path.join(os.environ["WRITES_LOG"], "rank" + os.environ.get("RANK", "0")), "a") as f:
            f.write(os.path.basename(dst) + "\\n")
        return _replace(src, dst)


    os.replace = logged_replace
    sys.exit(main())
''')


def cli_args(launcher: Path, data_dir: Path, out: Path, batch_size: int) -> list[str]:
    """One epoch of W4A4 QAT (first and last layer at 8 bits) without augmentation, which draws per rank.

    From LSQ's initial steps: what is compared is the two loops, to float rounding. Fitted steps give the head's
    8-bit input a step of 8e-4, whose gradient amplifies the all-reduce's other summation order past
    that tolerance within one epoch (the head's weights 4.4e-6 apart at most, of 0.26)."""
    return [str(launcher), "train", "--model", "tiny_convnet", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", str(batch_size), "--policy", "uniform:4", "--out", str(out),
            "--set", "quant.fused=false", "--set", "data.augment=false", "--set", "quant.init=lsq"]


def start(args: list[str], writes_log: Path) -> subprocess.Popen:
    writes_log.mkdir()
    return subprocess.Popen(args, env={**ENV, "WRITES_LOG": str(writes_log)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside the Python interpreter")
def test_torchrun_two_ranks_train_as_one_process_with_the_global_batch(tmp_path):
    # 540 training samples after the validation split: even, so no rank pads its slice, and rank r's batch k
    # holds permutation positions k*2B + r, k*2B + r + 2, ...: together exactly one process's batch k of 2B.
    data_dir = write_fashion_mnist(tmp_path / "data", n_train=600, n_test=100)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single = start([sys.executable, *cli_args(launcher, data_dir, single_out, 2 * PER_RANK_BATCH)], tmp_path / "w1")
    ddp = start([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                 *cli_args(launcher, data_dir, ddp_out, PER_RANK_BATCH)], tmp_path / "w2")
    finish(single)
    ddp_stdout = finish(ddp)

    want, got = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (single_out, ddp_out))
    assert got["model"].keys() == want["model"].keys()  # the plain module's keys: no "module." prefix
    for name, tensor in want["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert got["step"] == want["step"] == 540 // (2 * PER_RANK_BATCH)
    single_metrics, ddp_metrics = want["history"][0], got["history"][0]
    assert ddp_metrics["train_loss"] == pytest.approx(single_metrics["train_loss"], rel=1e-5)  # all ranks' samples
    assert ddp_metrics["train_top1"] == single_metrics["train_top1"]
    assert ddp_metrics["val_top1"] == single_metrics["val_top1"]
    single_result, ddp_result = (json.loads((d / "result.json").read_text()) for d in (single_out, ddp_out))
    assert ddp_result["test_top1"] == single_result["test_top1"]

    written = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "result.json", MARKER}
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["rank0"]  # rank 1 wrote nothing
    assert set((tmp_path / "w2" / "rank0").read_text().split()) == written
    assert ddp_stdout.count('"test_top1"') == 1  # one result printed, by rank 0


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside the Python interpreter")
def test_torchrun_search_chooses_on_rank_0_and_fine_tunes_as_one_process(tmp_path):
    data_dir = write_fashion_mnist(tmp_path / "data", n_train=600, n_test=100)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    common = ["--model", "tiny_convnet", "--data-dir", str(data_dir), "--set", "quant.fused=false",
              "--set", "data.augment=false"]
    fp = tmp_path / "fp"
    finish(start([sys.executable, str(launcher), "train", *common, "--epochs", "1", "--out", str(fp)],
                 tmp_path / "w0"))
    search = [str(launcher), "search", *common, "--method", "random", "--init", str(fp), "--budget",
              "bitops<=uniform:3,uniform:4", "--finetune-epochs", "1", "--lr", "0.01",
              "--set", "search.options={samples: 4, eval_batches: 1, bn_batches: 1}"]
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single = start([sys.executable, *search, "--batch-size", str(2 * PER_RANK_BATCH), "--out", str(single_out)],
                   tmp_path / "w1")
    ddp = start([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *search,
                 "--batch-size", str(PER_RANK_BATCH), "--out", str(ddp_out)], tmp_path / "w2")
    finish(single)
    ddp_stdout = finish(ddp)

    want, got = (json.loads((d / "search.json").read_text()) for d in (single_out, ddp_out))
    assert got["policies"] == want["policies"]  # rank 0 searched on the global batch, as the single process did
    for i in range(2):
        single_ckpt, ddp_ckpt = (torch.load(d / "finetune" / f"budget{i}" / "checkpoint.pt", weights_only=True)
                                 for d in (single_out, ddp_out))
        for name, tensor in single_ckpt["model"].items():
            torch.testing.assert_close(ddp_ckpt["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    single_rows, ddp_rows = (json.loads((d / "result.json").read_text()) for d in (single_out, ddp_out))
    assert [r["test_top1"] for r in ddp_rows] == [r["test_top1"] for r in single_rows]
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["rank0"]  # rank 1 wrote nothing
    assert ddp_stdout.count('"search_seconds"') == 2  # one row per budget, printed once, by rank 0


# --- the collectives, on two processes joined by a FileStore -----------------------------------------------------


def tiny_quantized_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return quantize_model(model, SearchSpace.from_model(model, (2, 4), (4, 8), "none"))


def collectives_worker(rank: int, store_path: str) -> None:
    """What each rank checks; an assertion error here fails the spawning test."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        # A policy chosen on rank 0 only (a search result) reaches rank 1 intact.
        chosen = Policy({"0": (2, 8), "2": (4, 4), "4": (2, 4)}) if rank == 0 else None
        policy = broadcast_object(chosen)
        assert isinstance(policy, Policy) and policy == Policy({"0": (2, 8), "2": (4, 4), "4": (2, 4)})

        # Rank 0 calibrates on its data; rank 1 never calibrates and must end up with rank 0's state.
        model = tiny_quantized_model()
        with torch.no_grad():
            model[0].weight.add_(rank)
        if rank == 0:
            calibrate(model, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5)
        broadcast_module_state(model)
        apply_policy(model, policy)
        gathered = [None, None]
        dist.all_gather_object(gathered, {k: v.clone() for k, v in model.state_dict().items()})
        for name, tensor in gathered[0].items():
            assert torch.equal(tensor, gathered[1][name]), name
        for layer in quant_layers(model).values():  # caches refreshed: no re-initialisation on the next forward
            assert layer.w_quant._ready and layer.a_quant._ready and layer.a_quant._signed is not None
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model(torch.randn(2, 1, 8, 8))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

        mean = all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
        assert mean.tolist() == [0.5, 5.0]
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_processes(tmp_path):
    mp.spawn(collectives_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env("cpu")
    assert ctx == DistContext() and ctx.is_main() and not ctx.distributed
    model = tiny_quantized_model()
    assert wrap_ddp(model, ctx) is model and unwrap(model) is model
    obj = {"policy": Policy({"0": (4, 4)})}
    assert broadcast_object(obj) is obj
    assert all_reduce_mean(torch.tensor([3.0])).item() == 3.0
    broadcast_module_state(model)  # refreshes caches only: an uncalibrated quantizer stays not ready
    assert not quant_layers(model)["0"].a_quant._ready
