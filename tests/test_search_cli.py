"""`mixbits search` and `mixbits report` end to end on the tiny float run."""

import json

import pytest
from conftest import TINY_RUN

from mixbits import Policy, SearchSpace
from mixbits.__main__ import main
from mixbits.budget import parse_budgets
from mixbits.cost import profile
from mixbits.models import create

BUDGETS = "bitops<=uniform:3,uniform:5"


@pytest.fixture(scope="module")
def hawq_run(tiny_fp_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "hawq"
    argv = ["search", *TINY_RUN, "--method", "hawq", "--init", str(tiny_fp_run.dir), "--budget", BUDGETS,
            "--finetune-epochs", "1", "--lr", "0.01", "--set", "search.options={probes: 2, batches: 1}"]
    assert main([*argv, "--out", str(out)]) == 0
    return out, argv


def test_search_writes_policies_within_budget_and_finetunes_each(hawq_run):
    out, _ = hawq_run
    search = json.loads((out / "search.json").read_text())
    rows = json.loads((out / "result.json").read_text())
    assert search["method"] == "hawq" and len(search["budgets"]) == len(rows) == 2
    model = create("small_cnn", 10, 1)
    stats = profile(model, (1, 28, 28))
    space = SearchSpace.from_model(model)
    for i, budget in enumerate(parse_budgets(BUDGETS)):
        policy = Policy.load(out / "policies" / f"budget{i}.json")
        assert budget.satisfied(stats, policy, space)
        assert (out / "finetune" / f"budget{i}" / "checkpoint.pt").is_file()
        assert rows[i]["policy"] == policy.describe() and 0 <= rows[i]["test_top1"] <= 100
        epochs = [json.loads(line) for line in (out / "finetune" / f"budget{i}" / "metrics.jsonl").open()]
        assert rows[i]["train_seconds"] == pytest.approx(sum(m["seconds"] for m in epochs)) and epochs
    assert (out / "hawq_traces.json").is_file() and (out / "front.json").is_file()


def test_search_refuses_to_overwrite_and_resumes(hawq_run, capsys):
    out, argv = hawq_run
    before = (out / "search.json").read_bytes()
    assert main([*argv, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    rows = json.loads((out / "result.json").read_text())
    assert main([*argv, "--out", str(out), "--resume"]) == 0  # reuses the search and the finished fine-tunes
    assert (out / "search.json").read_bytes() == before
    resumed = json.loads((out / "result.json").read_text())  # the training time of the runs, not of the reload
    assert [r["train_seconds"] for r in resumed] == pytest.approx([r["train_seconds"] for r in rows])


def test_infeasible_budget_fails_before_anything_is_written(tiny_fp_run, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["search", *TINY_RUN, "--method", "uniform", "--init", str(tiny_fp_run.dir),
                 "--budget", "bitops<=0.0001G", "--out", str(out)])
    assert code == 2 and "infeasible" in capsys.readouterr().err
    assert not out.exists()


def test_search_without_init_or_with_unknown_method(tiny_fp_run, tmp_path, capsys):
    assert main(["search", *TINY_RUN, "--method", "uniform", "--out", str(tmp_path / "a")]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["search", *TINY_RUN, "--method", "hawk", "--init", str(tiny_fp_run.dir),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown search method 'hawk'" in err and "hawq" in err


def test_report_for_a_search_and_a_train_run(hawq_run, tiny_q_run, tmp_path):
    out, _ = hawq_run
    assert main(["report", str(out), "--out", str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    assert "hawq search" in text and "## Budget bitops<=uniform:3" in text and "| conv2 |" in text
    assert (tmp_path / "s" / "policy0.png").stat().st_size > 1000
    assert main(["report", str(tiny_q_run.dir), "--out", str(tmp_path / "t")]) == 0
    text = (tmp_path / "t" / "report.md").read_text()
    assert "## Training" in text and "## Policy and cost" in text
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_oneshot_without_fine_tuning_tests_each_policy_on_the_supernet(tiny_fp_run, tmp_path, capsys):
    out = tmp_path / "oneshot"
    options = "search.options={epochs: 2, policies_per_step: 1, eval_batches: 1, bn_batches: 1}"
    assert main(["search", *TINY_RUN, "--method", "oneshot", "--init", str(tiny_fp_run.dir), "--budget", BUDGETS,
                 "--finetune-epochs", "0", "--set", options, "--out", str(out)]) == 0
    capsys.readouterr()
    rows = json.loads((out / "result.json").read_text())
    assert (out / "oneshot_supernet.pt").is_file() and not (out / "finetune").exists()
    for i, row in enumerate(rows):
        run = out / "subnets" / f"budget{i}"
        assert row["retraining_free"] and row["train_seconds"] == 0.0 and row["run_dir"] == str(run)
        assert row["policy"] == Policy.load(out / "policies" / f"budget{i}.json").describe()
        # the subnet checkpoint is an ordinary run: eval rebuilds it and measures the same accuracy
        assert main(["eval", str(run)]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert evaluated["policy"] == row["policy"] and evaluated["top1"] == pytest.approx(row["test_top1"])
    # a resumed run re-tests the subnets on the same recalibration batches, so it reports the same figures
    assert main(["search", *TINY_RUN, "--method", "oneshot", "--init", str(tiny_fp_run.dir), "--budget", BUDGETS,
                 "--finetune-epochs", "0", "--set", options, "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert [r["test_top1"] for r in again] == [r["test_top1"] for r in rows]
