"""Outputs: no command writes over files it did not write for the same job (unless --force), an output that
cannot be written is one message before any work, and every file gets the mode a plain open() would give it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import TINY_RUN, cli_fails, snapshot

from mixbits.__main__ import main
from mixbits.errors import MixbitsError
from mixbits.rundir import MARKER, job_of
from mixbits.train import save_checkpoint
from mixbits.utils import atomic_write_text

EXPORT = ["--format", "packed", "--check-samples", "0"]  # the fast part of an export


def _unchanged_after_failure(argv: list[str], directory: Path, capsys) -> str:
    before = snapshot(directory)
    err = cli_fails(argv, capsys)
    assert snapshot(directory) == before
    return err


# overwrite ------------------------------------------------------------------------------------------------------------
def test_search_onto_a_training_run_is_refused(tiny_fp_run, fp_copy, capsys):
    argv = ["search", *TINY_RUN, "--init", str(tiny_fp_run.dir), "--method", "uniform", "--finetune-epochs", "0",
            "--out", str(fp_copy)]
    err = _unchanged_after_failure(argv, fp_copy, capsys)
    assert f"--out {str(fp_copy)!r} already holds the output of `train`, not of `search`" in err
    assert "pass --force to write into it anyway" in err


def test_train_onto_foreign_files_is_refused(tiny_fp_run, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "result.json").write_text('{"mine": true}\n')
    err = _unchanged_after_failure([*tiny_fp_run.argv, "--out", str(notes)], notes, capsys)
    assert "already holds files of another job (result.json), not of `train`" in err


def test_export_onto_another_runs_export(tiny_q_run, q_copy, tmp_path, capsys):
    out, other = tmp_path / "exp1", q_copy
    assert main(["export", str(tiny_q_run.dir), "--out", str(out), *EXPORT]) == 0
    assert main(["export", str(tiny_q_run.dir), "--out", str(out), *EXPORT]) == 0  # the same job again: fine
    err = _unchanged_after_failure(["export", str(other), "--out", str(out), *EXPORT], out, capsys)
    assert f"already holds the output of `export of {(tiny_q_run.dir / 'checkpoint.pt').resolve()}`" in err

    (out / "notes.txt").write_text("kept\n")
    before = snapshot(out)
    assert main(["export", str(other), "--out", str(out), *EXPORT, "--force"]) == 0
    after = snapshot(out)
    assert set(after) == set(before) and after["notes.txt"] == before["notes.txt"]  # nothing deleted
    assert after["model.mxb"][1] != before["model.mxb"][1]  # replaced
    assert job_of(out) == f"export of {(other / 'checkpoint.pt').resolve()}"
    assert json.loads((out / "export_report.json").read_text())["run"] == str(other)


def test_report_and_lut_outputs(q_copy, tmp_path, capsys):
    run = q_copy
    assert main(["report", str(run)]) == 0
    assert main(["report", str(run)]) == 0  # refreshing its own report
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.md").write_text("# mine\n")
    err = _unchanged_after_failure(["report", str(run), "--out", str(foreign)], foreign, capsys)
    assert "already holds files of another job (report.md)" in err

    benchmark = tmp_path / "bench.json"
    benchmark.write_text(json.dumps({"table": "| a |", "rows": []}))
    assert main(["report", str(benchmark)]) == 0
    err = _unchanged_after_failure(["report", str(benchmark)], tmp_path, capsys)
    assert f"--out {str(tmp_path / 'bench.md')!r} already exists" in err and "--force" in err
    assert main(["report", str(benchmark), "--force"]) == 0

    table = tmp_path / "lut.json"
    table.write_text("{}\n")
    err = cli_fails(["lut", "--model", "small_cnn", "--out", str(table)], capsys)
    assert f"--out {str(table)!r} already exists" in err and "timing" not in err
    assert table.read_text() == "{}\n"


# permissions: an output that cannot be written fails first, in one line -----------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", *TINY_RUN],
    ["export", "{q}", *EXPORT],
    ["report", "{q}"],
    ["lut", "--model", "small_cnn"],
])
def test_unwritable_output(argv, tiny_q_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    argv = [a.format(q=tiny_q_run.dir) for a in argv] + ["--out", str(blocker / "out")]
    err = cli_fails(argv, capsys)
    assert f"{str(blocker)!r} is a file, not a directory" in err and "timing" not in err
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_directory(tiny_fp_run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = cli_fails([*tiny_fp_run.argv, "--out", str(locked / "run")], capsys)
        assert f"{str(locked)!r} is not writable by you" in err
    finally:
        locked.chmod(0o755)


def test_a_failed_write_is_one_message(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MixbitsError, match="cannot write .*a-file/x.json'.*choose an output path"):
        atomic_write_text(tmp_path / "a-file" / "x.json", "{}")


# file modes ---------------------------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_ordinary_mode(tiny_fp_run, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    atomic_write_text(tmp_path / "new.txt", "x")
    save_checkpoint(tmp_path / "checkpoint.pt", {"w": 1})
    assert _mode(tmp_path / "new.txt") == _mode(tmp_path / "checkpoint.pt") == expected
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "result.json", MARKER):
        assert _mode(tiny_fp_run.dir / name) == expected, name
    (tmp_path / "new.txt").chmod(0o640)  # an existing file keeps the mode its owner gave it
    atomic_write_text(tmp_path / "new.txt", "y")
    assert _mode(tmp_path / "new.txt") == 0o640
