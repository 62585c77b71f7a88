"""One owner per run directory: a second writer (or a second resume of a running run) is refused while the first
holds it, a dead owner's lock is taken over, a resume must ask for the run that was started, the library verbs
that write follow the command line's rules, and a failed job leaves the directory as it found it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, cli_fails, snapshot, toy_batches, toy_net
from test_resume_kill import write_fashion_mnist

import mixbits
from mixbits.__main__ import main
from mixbits.rundir import MARKER, SETTINGS
from mixbits.runlock import LOCK
from mixbits.utils import TEMP_SUFFIX

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOLD = """
import sys, time
from mixbits.rundir import claim_output_dir
with claim_output_dir(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"`` as a training run's directory, until the test kills it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.communicate()


def test_a_second_writer_and_a_second_resume_are_refused_while_the_owner_lives(holder, capsys):
    out, proc = holder
    before = snapshot(out)
    for extra in ([], ["--resume"]):
        err = cli_fails(["train", *TINY_RUN, "--out", str(out), *extra], capsys)
        assert f"--out {str(out)!r} is in use by another mixbits process (pid {proc.pid} on " in err
        assert "`train`" in err and "choose another --out" in err
    assert snapshot(out) == before


def test_the_lock_of_a_killed_owner_is_stale_and_taken_over(holder, capsys):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK).exists()  # left behind by the killed owner
    assert main(["train", *TINY_RUN, "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / LOCK).exists()


def test_two_runs_started_at_once_into_one_directory_one_wins_whole(tmp_path):
    data = write_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mixbits", "train", "--model", "small_cnn", "--data-dir", str(data), "--epochs", "2",
            "--batch-size", "32", "--set", "model.kwargs.channels=8", "--set", "quant.fused=false", "--out", str(out)]
    procs = [subprocess.Popen([*args, "--seed", str(seed)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    done = [(proc.wait(timeout=300), *proc.communicate()) for proc in procs]
    assert sorted(code for code, _, _ in done) == [0, 2], [err[-500:] for _, _, err in done]
    (winner,) = [json.loads(stdout) for code, stdout, _ in done if code == 0]
    (loser,) = [err for code, _, err in done if code == 2]
    assert "Traceback" not in loser
    assert "is in use by another mixbits process" in loser or "already holds a checkpoint" in loser
    seed = int(next(line.split(":")[1] for line in (out / "config.yaml").read_text().splitlines()
                    if line.strip().startswith("seed:")))
    assert json.loads((out / "result.json").read_text()) == winner
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train_config"]["seed"] == seed


# resume asks for the run that was started --------------------------------------------------------------------------
def test_resume_alone_reads_the_runs_own_config(tiny_q_run, q_copy, capsys):
    expected = json.loads((tiny_q_run.dir / "result.json").read_text())
    capsys.readouterr()
    assert main(["train", "--out", str(q_copy), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["test_top1"] == expected["test_top1"]


@pytest.mark.parametrize("extra,named", [
    (["--policy", "uniform:2"], "quant.policy 'uniform:4' -> 'uniform:2'"),
    (["--set", "data.augment=false", "--epochs", "3"], "data.augment True -> False, train.epochs 1 -> 3"),
])
def test_resume_with_changed_settings_names_each_one(extra, named, tiny_q_run, q_copy, capsys):
    before = snapshot(q_copy)
    err = cli_fails(["train", "--out", str(q_copy), "--resume", *extra], capsys)
    assert f"cannot resume {str(q_copy)!r}" in err and "from the run's config.yaml (recorded -> asked)" in err
    assert named in err and "start a new run with another --out" in err
    assert snapshot(q_copy) == before


@pytest.fixture(scope="module")
def search_run(tiny_fp_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search") / "run"
    assert main(["search", *TINY_RUN, "--init", str(tiny_fp_run.dir), "--method", "uniform", "--finetune-epochs", "0",
                 "--budget", "bitops<=uniform:4", "--out", str(out)]) == 0
    return out


def test_search_resume_with_another_budget_or_method_is_refused(search_run, capsys):
    before = snapshot(search_run)
    err = cli_fails(["search", "--out", str(search_run), "--resume", "--method", "random", "--budget",
                     "bitops<=uniform:3"], capsys)
    assert "search.method 'uniform' -> 'random'" in err
    assert "search.budget 'bitops<=uniform:4' -> 'bitops<=uniform:3'" in err
    assert snapshot(search_run) == before
    assert main(["search", "--out", str(search_run), "--resume"]) == 0  # as it was started: fine


def test_truncated_search_json_on_resume_is_one_message(search_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(search_run, run)
    text = (run / "search.json").read_text()
    (run / "search.json").write_text(text[: len(text) // 2])
    err = cli_fails(["search", "--out", str(run), "--resume"], capsys)
    assert f"search result {str(run / 'search.json')!r} is not valid JSON" in err and "remove it" in err


# the library verbs that write ---------------------------------------------------------------------------------------
def test_api_export_keeps_a_users_files_unless_forced(tmp_path):
    qmodel = mixbits.quantize(toy_net(), "uniform:4", toy_batches(1)[0][0])
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.onnx").write_text("the user's own model\n")
    with pytest.raises(mixbits.MixbitsError, match="already holds files of another job .*model.onnx.*force=True"):
        mixbits.export(qmodel, out, toy_batches(1)[0][0], formats=["packed"])
    assert (out / "model.onnx").read_text() == "the user's own model\n" and not (out / "model.mxb").exists()
    mixbits.export(qmodel, out, toy_batches(1)[0][0], formats=["packed"], force=True)
    assert (out / "model.mxb").is_file()
    mixbits.export(qmodel, out, toy_batches(1)[0][0], formats=["packed"])  # its own export again: fine


def test_api_search_into_a_training_run_is_refused(fp_copy):
    before = snapshot(fp_copy)
    with pytest.raises(mixbits.MixbitsError, match="run_dir .* already holds the output of `train`, not of `search`"):
        mixbits.search(toy_net(), toy_batches(2), "bitops<=uniform:4", method="uniform", run_dir=fp_copy)
    assert snapshot(fp_copy) == before


def test_api_search_resume_under_another_budget_is_refused(tmp_path):
    run = tmp_path / "search"
    mixbits.search(toy_net(), toy_batches(2), "bitops<=uniform:4", method="uniform", run_dir=run)
    assert json.loads((run / SETTINGS).read_text())["budgets"] == ["bitops<=uniform:4"]
    with pytest.raises(mixbits.MixbitsError, match=r"already holds a run \(its settings.json\); pass resume=True"):
        mixbits.search(toy_net(), toy_batches(2), "bitops<=uniform:3", method="uniform", run_dir=run)
    with pytest.raises(mixbits.MixbitsError, match=r"budgets \['bitops<=uniform:4'\] -> \['bitops<=uniform:3'\]"):
        mixbits.search(toy_net(), toy_batches(2), "bitops<=uniform:3", method="uniform", run_dir=run, resume=True)


def test_api_finetune_resume_at_another_policy_is_refused(tmp_path):
    run = tmp_path / "ft"
    mixbits.finetune(toy_net(), "uniform:4", toy_batches(2), epochs=1, run_dir=run, progress=False)
    changed = "cannot resume .* policy.layers.3.w 4 -> 2, policy.layers.3.a 4 -> 2"
    with pytest.raises(mixbits.MixbitsError, match=changed):
        mixbits.finetune(toy_net(), "uniform:2", toy_batches(2), epochs=1, run_dir=run, resume=True, progress=False)


# what a job leaves behind -------------------------------------------------------------------------------------------
def test_a_killed_writes_temporary_file_is_removed_by_the_next_owner(fp_copy, tiny_fp_run):
    leftover = fp_copy / f".checkpoint.pt.x1y2z3{TEMP_SUFFIX}"
    leftover.write_bytes(b"\0" * 1024)
    assert main(["train", "--out", str(fp_copy), "--resume"]) == 0
    assert not leftover.exists() and not (fp_copy / LOCK).exists()


def test_a_failed_report_leaves_no_directory_and_no_marker(q_copy, capsys):
    (q_copy / "result.json").write_text("{broken")
    err = cli_fails(["report", str(q_copy)], capsys)
    assert "is not valid JSON" in err
    assert not (q_copy / "report").exists()


def test_a_failed_first_batch_leaves_a_new_run_directory_absent(tmp_path):
    run = tmp_path / "new" / "ft"
    bad = [(x, y + 10) for x, y in toy_batches(2)]
    with pytest.raises(mixbits.MixbitsError, match="label 1[0-2] is outside the 3 classes"):
        mixbits.finetune(toy_net(), "uniform:4", bad, epochs=1, run_dir=run, progress=False)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("target,why", [("missing", "which does not exist"), ("self", "loops")])
def test_out_symlink_that_dangles_or_loops(target, why, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing" if target == "missing" else link)
    err = cli_fails(["train", *TINY_RUN, "--out", str(link)], capsys)
    assert f"--out {str(link)!r} is a symbolic link" in err and why in err and "File exists" not in err
    assert not (tmp_path / "missing").exists()


def test_marker_and_lock_are_the_only_bookkeeping_left(tiny_fp_run):
    names = {p.name for p in tiny_fp_run.dir.iterdir() if p.name.startswith(".")}
    assert names == {MARKER}
